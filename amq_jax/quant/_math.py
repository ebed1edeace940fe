"""Uniform quantizers on arrays: quantize, dequantize, fake-quant with straight-through gradients.

Math only: no Flax here (CONVENTIONS 4). A b-bit uniform quantizer maps a real value w to
an integer level ``q`` and back to ``w_hat = (q - z) * s`` with scale ``s`` and zero-point
``z``:

* symmetric, b >= 2: ``q = clip(round(w / s), -(2^(b-1)-1), 2^(b-1)-1)``, ``z = 0``,
  ``s = max|w| / (2^(b-1)-1)`` ('minmax'). The level ``-2^(b-1)`` is left unused so that the
  grid is symmetric around zero (and 2 bits means the three levels {-s, 0, s}).
* symmetric, b = 1 (binary): ``q = sign(w)`` with sign(0) = +1, so ``w_hat = s * sign(w)``;
  ``s = mean|w|``, the least-squares optimal scale for fixed signs (XNOR-Net), for both scale
  methods. There is no zero level with one bit; an all-zero channel gets ``s = 0`` and stays 0.
* asymmetric: ``q = clip(round(w / s) + z, 0, 2^b - 1)`` over the range
  ``[lo, hi] = [min(min w, 0), max(max w, 0)]`` (zero always inside, so 0 is exact),
  ``s = (hi - lo) / (2^b - 1)``, integer ``z = round(-lo / s)``.

Ranges are per tensor (``axis=None``) or per channel: ``axis`` names the axes to KEEP, e.g.
``axis=-1`` gives one scale per output channel of a Conv (HWIO) or Dense (IO) kernel.
``scale_method='mse'`` searches a small grid of clipping ratios ``r`` (range ``r * range``)
per channel and keeps the one minimizing ``||Q(W) - W||^2``.

Rounding is to nearest (``jnp.round``: half to even). Bits are Python ints in 1..16.
Integer levels are returned as int32 whatever the width.

``grid='qwix'`` uses the grid qwix deploys with (``qwix/_src/core/qarray.py`` and
``numerics.py``), so that Omega tables and fake-quant agree with a model quantized by qwix:

* symmetric ('absmax'): all ``2^b`` levels ``-2^(b-1) .. 2^(b-1)-1`` and
  ``s = max|w| / (2^(b-1) - 1/2)``, ``q = clip(round(w / s), -2^(b-1), 2^(b-1)-1)``: the
  range is stretched by half a step so the top level is used as often as the others
  (2 bits: the four levels {-2s, -s, 0, s} where the default grid has three).
* asymmetric ('minmax', qwix allows it at 4 and 8 bits only): signed levels
  ``[-2^(b-1), 2^(b-1)-1]`` over ``[lo, hi]`` (zero inside), ``s = (hi - lo) / (2^b - 1)``,
  integer ``z = round(-2^(b-1) - lo / s)``, ``q = clip(round(w / s + z))``.

Scales below ``sqrt(float32 tiny)`` are replaced by 1 (an all-zero channel), as qwix does.
Widths 2..8 only (qwix has no 1-bit or wider-than-8-bit integer type) and
``scale_method='minmax'`` only (qwix has no per-channel clipping search).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["QTensor", "quantize", "dequantize", "fake_quant", "fake_quant_act", "quant_error",
           "check_bits", "MIN_BITS", "MAX_BITS", "MSE_RATIOS", "GRIDS", "QWIX_BITS"]

MIN_BITS, MAX_BITS = 1, 16
# Quantizer grids: amq-jax's own, and the one qwix deploys with (see module docstring).
GRIDS = ("amq", "qwix")
# Widths qwix has integer types for ('int2' .. 'int8').
QWIX_BITS = range(2, 9)
# Clipping ratios tried by scale_method='mse' (1.0 = plain min/max range).
MSE_RATIOS = tuple(float(r) for r in np.linspace(1.0, 0.3, 36))


class QTensor(NamedTuple):
  """A quantized tensor: ``dequantize(qt) = (q - zero_point) * scale``.

  ``q``: int32 levels, same shape as the input. ``scale``, ``zero_point``: float32, shaped to
  broadcast against ``q`` (size-1 on reduced axes). ``bits``: the width (Python int).
  """
  q: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  bits: int


def check_bits(bits) -> int:
  """Validates a bit width; returns it as an int. Raises ValueError outside 1..16."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (
      MIN_BITS <= int(bits) <= MAX_BITS):
    raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
  return int(bits)


def _reduce_axes(ndim: int, axis) -> tuple[int, ...]:
  """Axes to reduce over, given the axes to keep (None = per tensor)."""
  if axis is None:
    return tuple(range(ndim))
  keep = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  keep = {int(a) % ndim for a in keep} if ndim else set()
  return tuple(a for a in range(ndim) if a not in keep)


def _levels(bits: int, symmetric: bool) -> tuple[float, float]:
  if symmetric:
    qmax = float(2 ** (bits - 1) - 1) if bits > 1 else 1.0
    return -qmax, qmax
  return 0.0, float(2 ** bits - 1)


def _params_from_range(lo, hi, bits: int, symmetric: bool):
  """Scale and zero-point for the real range [lo, hi] (lo = -hi when symmetric)."""
  qlo, qhi = _levels(bits, symmetric)
  if symmetric:
    scale = hi / qhi
    zp = jnp.zeros_like(scale)
  else:
    scale = (hi - lo) / (qhi - qlo)
  scale = jnp.where(scale > 0, scale, 1.0)  # all-zero channel: any scale gives q = 0
  if not symmetric:
    zp = jnp.clip(jnp.round(-lo / scale), qlo, qhi)
  return scale.astype(jnp.float32), zp.astype(jnp.float32)


def _q(w, scale, zp, bits: int, symmetric: bool):
  if symmetric and bits == 1:
    return jnp.where(w >= 0, 1.0, -1.0)
  qlo, qhi = _levels(bits, symmetric)
  return jnp.clip(jnp.round(w / scale) + zp, qlo, qhi)


def _ranges(w, red, symmetric: bool):
  if symmetric:
    hi = jnp.max(jnp.abs(w), axis=red, keepdims=True)
    return -hi, hi
  lo = jnp.minimum(jnp.min(w, axis=red, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(w, axis=red, keepdims=True), 0.0)
  return lo, hi


def _scale_zp(w, bits: int, symmetric: bool, red, scale_method: str):
  if symmetric and bits == 1:
    # An all-zero channel keeps scale 0 (sign(0) = +1 times 0 is 0): replacing the scale
    # by 1, as for b >= 2 where q = 0, would turn the zeros into +1.
    s = jnp.mean(jnp.abs(w), axis=red, keepdims=True).astype(jnp.float32)
    return s, jnp.zeros_like(s)
  lo, hi = _ranges(w, red, symmetric)
  if scale_method == "minmax":
    return _params_from_range(lo, hi, bits, symmetric)
  if scale_method != "mse":
    raise ValueError(f"scale_method must be 'minmax' or 'mse', got {scale_method!r}")

  def err(r):
    s, z = _params_from_range(lo * r, hi * r, bits, symmetric)
    d = (_q(w, s, z, bits, symmetric) - z) * s - w
    return jnp.sum(d * d, axis=red, keepdims=True), s, z

  # A scan over the ratio grid keeps memory at one copy of w (vectorized over channels).
  e0, s0, z0 = err(1.0)

  def step(carry, r):
    be, bs, bz = carry
    e, s, z = err(r)
    better = e < be
    return (jnp.where(better, e, be), jnp.where(better, s, bs), jnp.where(better, z, bz)), None

  (_, s, z), _ = jax.lax.scan(step, (e0, s0, z0), jnp.asarray(MSE_RATIOS[1:], jnp.float32))
  return s, z


def _check_grid(grid: str, bits: int, symmetric: bool, scale_method: str) -> None:
  from amq_jax.errors import BitsError
  if grid not in GRIDS:
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
  if grid == "amq":
    return
  if bits not in QWIX_BITS:
    raise BitsError(f"grid='qwix' has no {bits}-bit integer type (qwix quantizes to int2..int8); "
                    "choose widths in 2..8 or use grid='amq'")
  if not symmetric and bits not in (4, 8):
    raise BitsError(f"grid='qwix' asymmetric ('minmax') quantization exists at 4 and 8 bits "
                    f"only, got {bits}; use symmetric=True or bits 4/8")
  if scale_method != "minmax":
    raise ValueError(f"grid='qwix' calibrates on the full range; scale_method must be "
                     f"'minmax', got {scale_method!r}")


def _qwix_quantize(w, bits: int, symmetric: bool, red) -> QTensor:
  """qwix's grid (module docstring), with its exact operations: scale by division, round half
  to even, clip; so levels agree with ``qwix.quantize`` bit for bit."""
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  tiny = jnp.sqrt(jnp.finfo(jnp.float32).tiny)
  if symmetric:
    s = jnp.max(jnp.abs(w), axis=red, keepdims=True) / (qmax + 0.5)
    s = jnp.where(s < tiny, 1.0, s).astype(jnp.float32)
    z = jnp.zeros_like(s)
  else:
    lo = jnp.minimum(jnp.min(w, axis=red, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(w, axis=red, keepdims=True), 0.0)
    s = (hi - lo) / float(qmax - qmin)
    s = jnp.where(s < tiny, 1.0, s).astype(jnp.float32)
    z = jnp.clip(jnp.round(qmin - lo / s), qmin, qmax)
  q = jnp.clip(jnp.round(w / s + z) if not symmetric else jnp.round(w / s), qmin, qmax)
  return QTensor(q.astype(jnp.int32), s, z.astype(jnp.float32), bits)


def quantize(w, bits: int, *, symmetric: bool = True, axis: int | Sequence[int] | None = None,
             scale_method: str = "minmax", grid: str = "amq") -> QTensor:
  """Quantizes ``w`` to ``bits``-bit integer levels (see module docstring for the grids).

  Args:
    w: real array.
    bits: width in 1..16 (Python int).
    symmetric: symmetric grid around 0 (zero_point 0) or asymmetric [0, 2^b-1] + zero-point.
    axis: None for one range per tensor; an int or tuple of the axes to keep for per-channel
      ranges (``-1``: output channel of a Conv/Dense kernel).
    scale_method: 'minmax' (the full range) or 'mse' (best clipping ratio from ``MSE_RATIOS``).
    grid: 'amq' (the grids above) or 'qwix' (the grid a qwix-deployed model uses; widths
      2..8, 'minmax' only).

  Returns:
    ``QTensor(q, scale, zero_point, bits)``.

  >>> quantize(jnp.array([-1., 0.2, 0.6]), 2).q
  Array([-1,  0,  1], dtype=int32)
  >>> quantize(jnp.array([-1., 0.2, 0.6]), 2, grid='qwix').q
  Array([-2,  0,  1], dtype=int32)
  """
  bits = check_bits(bits)
  _check_grid(grid, bits, symmetric, scale_method)
  w = jnp.asarray(w, jnp.float32)
  red = _reduce_axes(w.ndim, axis)
  if grid == "qwix":
    return _qwix_quantize(w, bits, symmetric, red)
  s, z = _scale_zp(w, bits, symmetric, red, scale_method)
  q = _q(w, s, z, bits, symmetric)
  return QTensor(q.astype(jnp.int32), s, z, bits)


_STATIC = ("bits", "symmetric", "axis", "scale_method", "grid")
# Jitted forms for host-side loops over many kernels (export, Omega tables): one compiled
# program per (shape, width) instead of one compilation per primitive per shape.
quantize_jit = jax.jit(quantize, static_argnames=_STATIC)


def dequantize(qt: QTensor) -> jax.Array:
  """Real values of a ``QTensor``: ``(q - zero_point) * scale`` (float32)."""
  return (qt.q.astype(jnp.float32) - qt.zero_point) * qt.scale


def _fq_value(w, bits, symmetric, axis, scale_method, grid="amq"):
  return dequantize(quantize(w, bits, symmetric=symmetric, axis=axis, scale_method=scale_method,
                             grid=grid)).astype(jnp.asarray(w).dtype)


@jax.custom_vjp
def _ste(w, w_hat):
  del w
  return w_hat


def _ste_fwd(w, w_hat):
  return w_hat, None


def _ste_bwd(_, g):
  # Straight-through: dL/dw = dL/dw_hat; nothing flows into the (rounded) w_hat path.
  return g, jnp.zeros_like(g)


_ste.defvjp(_ste_fwd, _ste_bwd)


def fake_quant(w, bits: int, *, symmetric: bool = True, axis=None,
               scale_method: str = "minmax", grid: str = "amq") -> jax.Array:
  """``dequantize(quantize(w))`` with a straight-through (identity) gradient for ``w``.

  Forward: the quantized-then-dequantized weights. Backward (``jax.custom_vjp``):
  ``dL/dw = dL/dw_hat`` everywhere (Bengio et al. 2013), the rule used for weights in QAT.
  Arguments as in :func:`quantize`.
  """
  w = jnp.asarray(w)
  w_hat = jax.lax.stop_gradient(_fq_value(w, check_bits(bits), symmetric, axis, scale_method,
                                          grid))
  return _ste(w, w_hat)


@jax.custom_vjp
def _act_ste(x, x_hat, lo, hi):
  del x, lo, hi
  return x_hat


def _act_fwd(x, x_hat, lo, hi):
  return x_hat, (x, lo, hi)


def _act_bwd(res, g):
  x, lo, hi = res
  inside = (x >= lo) & (x <= hi)
  return (jnp.where(inside, g, 0.0).astype(g.dtype), jnp.zeros_like(g), jnp.zeros_like(lo),
          jnp.zeros_like(hi))


_act_ste.defvjp(_act_fwd, _act_bwd)


def fake_quant_act(x, bits: int, lo, hi) -> jax.Array:
  """Activation fake-quant on the calibrated range [lo, hi], clipped straight-through gradient.

  Forward: asymmetric ``bits``-bit grid over ``[min(lo, 0), max(hi, 0)]`` (zero exact; an
  all-nonnegative range such as post-ReLU is an unsigned grid), values outside clipped.
  Backward: ``dL/dx = dL/dx_hat * 1[lo <= x <= hi]`` (PACT/DoReFa clipped STE); ``lo`` and
  ``hi`` are constants (zero gradient).

  Args:
    x: activations. bits: 1..16. lo, hi: scalars or arrays broadcasting against ``x``.
  """
  bits = check_bits(bits)
  x = jnp.asarray(x)
  lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
  hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
  s, z = _params_from_range(lo, hi, bits, symmetric=False)
  x_hat = ((_q(x, s, z, bits, False) - z) * s).astype(x.dtype)
  return _act_ste(x, jax.lax.stop_gradient(x_hat), lo, hi)


def quant_error(w, bits: int, *, symmetric: bool = True, axis=None,
                scale_method: str = "minmax", grid: str = "amq") -> jax.Array:
  """``||Q_b(W) - W||_2^2``: the squared quantization error (a float32 scalar).

  ``grid='qwix'`` measures the error of the grid qwix deploys with (see :func:`quantize`).
  """
  w = jnp.asarray(w, jnp.float32)
  d = _fq_value(w, check_bits(bits), symmetric, axis, scale_method, grid) - w
  return jnp.sum(d * d)


quant_error_jit = jax.jit(quant_error, static_argnames=_STATIC)
