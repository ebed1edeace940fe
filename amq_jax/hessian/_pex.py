"""Per-example weight-gradient norms from a layer's input and its output's gradient.

For a layer ``y = op(x, W)`` linear in ``W`` (a convolution or a matrix product), the
gradient of example ``n`` is a product of two tensors the backward pass already has:

    dW_n = P_n^T g_n,    P_n = the input patches of example n  [T, K],
                         g_n = dL/dy of example n              [T, O],

``T`` the output positions (pixels, tokens; 1 for a plain Dense), ``K`` the weights that
one output reads (``C_in x kernel window``), ``O`` the output channels. So
``||dW_n||^2`` is a batched matrix product, ``N`` GEMMs of ``[K, T] x [T, O]``, instead of
what ``vmap(grad)`` makes of it: a convolution with one group per example, which XLA:CPU
runs ~4x slower (ResNet20 stage-1 layer, 128 examples, 10 cotangents: 0.23 s vs 0.89 s).
Where ``T`` is small against ``K`` and ``O`` (late, low-resolution layers) the same norm
is cheaper through the Gram matrices, ``||P^T g||_F^2 = <P P^T, g g^T>_F``: ``T^2 (K + O)``
multiply-adds instead of ``T K O``. Grouped convolutions split ``K`` and ``O`` into groups,
one product per group. Several cotangents (the columns of a GGN factor) ride along as
extra output channels: one GEMM per example for all of them.

:func:`tapped_runner` wires this to a model with input and output hooks
(:attr:`amq_jax.adapters.Model.act_apply`): one forward pass records every layer's input
and adds a zero perturbation to its output; one VJP per cotangent w.r.t. those
perturbations gives every ``g``. The layer table says the geometry
(:attr:`amq_jax.adapters.Layer.op`). Layers it cannot handle (called twice, a transposed
operand, batch groups) make :func:`unsupported` say why, and the caller falls back to
``vmap(grad)``.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["unsupported", "sum_sq_norms"]


def unsupported(layer) -> str | None:
  """Why :func:`sum_sq_norms` cannot handle ``layer`` (None if it can)."""
  op = tuple(layer.op or ())
  if layer.calls != 1:
    return f"layer {layer.name!r} runs {layer.calls} times per forward pass"
  if not op:
    return f"layer {layer.name!r} has no recorded geometry (a table from an older version)"
  if op[0] == "conv":
    return f"layer {layer.name!r} uses batch groups" if op[10] != 1 else None
  if op[0] == "dense":
    _, k, x_contract, x_batch, _, _ = op
    ndim = len(layer.in_shape) + 1
    if k != 1 or x_batch or tuple(x_contract) != tuple(range(ndim - len(x_contract), ndim)):
      return (f"layer {layer.name!r}: a matrix product whose activation is not the left "
              "operand contracted on its trailing axes")
    return None
  return f"layer {layer.name!r}: unknown operation {op[0]!r}"


def _patches(op, x):
  """``[N, T, C_in * window]`` input patches of a convolution, channel-major (a group's
  channels are contiguous, as in the weight). Built from strided slices of the padded
  input: ``lax.conv_general_dilated_patches`` is a convolution with a one-hot kernel, as
  costly here as the products it feeds."""
  (_, fshape, strides, padding, lhs_dil, rhs_dil, lhs_spec, *_) = op
  x = jnp.transpose(x, (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))  # [N, *sp, C]
  zero = jnp.zeros((), x.dtype)
  cfg = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dil)] + [(0, 0, 0)]
  x = lax.pad(x, zero, cfg)
  sp = x.shape[1:-1]
  out = [(n - (f - 1) * r - 1) // s + 1 for n, f, r, s in zip(sp, fshape, rhs_dil, strides)]
  cols = []
  for offs in itertools.product(*(range(f) for f in fshape)):
    start = [0] + [o * r for o, r in zip(offs, rhs_dil)] + [0]
    limit = ([x.shape[0]] + [st + (m - 1) * s + 1 for st, m, s in zip(start[1:], out, strides)]
             + [x.shape[-1]])
    cols.append(lax.slice(x, start, limit, [1] + list(strides) + [1]))
  p = jnp.stack(cols, axis=-1)  # [N, *out, C, window]: channel-major once flattened
  return p.reshape(x.shape[0], math.prod(out), -1)


def _rows(op, x, g):
  """``(P [N, T, G, Kg], g [N, T, G, J])`` for one layer; ``g`` arrives ``[J0, N, ...out]``
  (``J0`` cotangents), leaves with ``J = J0 * O / G`` columns per group."""
  J0, N = g.shape[0], g.shape[1]
  if op[0] == "conv":
    out_spec, groups = op[8], op[9]
    g = jnp.transpose(g, (0, 1 + out_spec[0]) + tuple(1 + a for a in out_spec[2:])
                      + (1 + out_spec[1],))
    p = _patches(op, x)
  else:
    groups = 1
    kin = math.prod(x.shape[a] for a in op[2])
    p = x.reshape(N, -1, kin)  # [N, T (positions: tokens, ...), K]
  T = p.shape[1]
  p = p.reshape(N, T, groups, -1)
  # Output channels are last (conv: transposed above; dot_general: the weight's free axes
  # come after the activation's), split into groups contiguously.
  g = g.reshape(J0, N, T, groups, -1)
  g = jnp.transpose(g, (1, 2, 3, 0, 4)).reshape(N, T, groups, -1)
  return p, g


def sq_norms(op, x, g) -> jax.Array:
  """``[J]``: ``sum_n ||dW_{n,j}||^2`` for each of the ``J`` cotangents (float32).

  Args:
    op: the layer's :attr:`~amq_jax.adapters.Layer.op`.
    x: the layer's input, batch first as the operation reads it (``[N, ...]``).
    g: the gradient w.r.t. its output for ``J`` cotangents, ``[J, N, ...out]``.
  """
  J0 = g.shape[0]
  p, g = _rows(op, x.astype(jnp.float32), g.astype(jnp.float32))
  N, T, G, K = p.shape
  g = g.reshape(N, T, G, J0, -1)
  O = g.shape[-1]
  if T * T * (K + J0 * O) < T * K * J0 * O:  # Gram form: cheaper where positions are few
    pp = jnp.einsum("ntgk,nsgk->ngts", p, p)
    gg = jnp.einsum("ntgjo,nsgjo->ngjts", g, g)
    return jnp.einsum("ngts,ngjts->j", pp, gg)
  dw = jnp.einsum("ntgk,ntgjo->ngkjo", p, g)
  return jnp.sum(jnp.square(dw), axis=(0, 1, 2, 4))


def sum_sq_norms(op, x, g) -> jax.Array:
  """``sum_n sum_j ||dW_{n,j}||^2`` (float32 scalar) for one layer (:func:`sq_norms`)."""
  return jnp.sum(sq_norms(op, x, g))


def apply_op(op, x, w) -> jax.Array:
  """The layer's operation itself, ``op(x, W)`` with the weight ``w`` as stored (no bias)."""
  w = jnp.transpose(w, op[-1]).astype(jnp.float32)
  x = x.astype(jnp.float32)
  if op[0] == "conv":
    (_, _, strides, padding, lhs_dil, rhs_dil, lhs_spec, rhs_spec, out_spec, groups, bg,
     _) = op
    dn = lax.ConvDimensionNumbers(lhs_spec=tuple(lhs_spec), rhs_spec=tuple(rhs_spec),
                                  out_spec=tuple(out_spec))
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil, dn,
                                    feature_group_count=groups, batch_group_count=bg,
                                    precision=lax.Precision.HIGHEST)
  _, _, x_contract, _, w_contract, _ = op
  return lax.dot_general(x, w, ((tuple(x_contract), tuple(w_contract)), ((), ())),
                         precision=lax.Precision.HIGHEST)


def misfit(op, x, w, y) -> jax.Array:
  """How far the hooked output ``y`` is from ``op(x, W) + a constant per channel`` (a
  bias), relative to ``max |y|``: ~1e-6 when the hooks see the operation's own input and
  output, O(1) when the module transforms either (scales, pads, activates inside)."""
  r = y.astype(jnp.float32) - apply_op(op, x, w)
  ch = op[8][1] if op[0] == "conv" else r.ndim - 1
  axes = tuple(a for a in range(r.ndim) if a != ch)
  r = r - jnp.mean(r, axis=axes, keepdims=True)
  return jnp.max(jnp.abs(r)) / (jnp.max(jnp.abs(y.astype(jnp.float32))) + 1e-30)


def tapped_forward(model, input_fn: Callable) -> Callable:
  """``f(params, state, batch, eps) -> (logits, {name: (layer input, layer output)})`` with
  ``eps[name]`` added to each named layer's output (zeros: the model unchanged)."""

  def f(params, state, batch, eps):
    taken, ins = {}, {}

    def in_hook(name, a):
      if name in eps:
        ins[name] = a
      return a

    def out_hook(name, y):
      if name not in eps:
        return y
      taken[name] = (ins[name], y)
      return y + eps[name].astype(y.dtype)

    out, _ = model.act_apply(params, state, input_fn(batch), in_hook, out_hook=out_hook,
                             train=False)
    return out, taken

  return f


def io_shapes(model, input_fn: Callable, params, state, batch, names):
  """``({name: input shape}, {name: output ShapeDtypeStruct})`` of the named layers on
  ``batch``, as the hooks see them (abstract: no FLOPs; works on tracers too)."""
  names = set(names)
  ins: dict[str, tuple] = {}
  outs: dict[str, Any] = {}

  def run(params, state, batch):
    def in_hook(name, a):
      if name in names:
        ins[name] = tuple(a.shape)
      return a

    def out_hook(name, y):
      if name in names:
        outs[name] = jax.ShapeDtypeStruct(y.shape, y.dtype)
      return y
    return model.act_apply(params, state, input_fn(batch), in_hook, out_hook=out_hook,
                           train=False)[0]

  jax.eval_shape(run, params, state, batch)
  return ins, outs

