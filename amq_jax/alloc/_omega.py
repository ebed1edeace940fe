"""Omega tables: the perturbation ``Omega[l, b]`` of quantizing layer l to bit choice b.

HAWQ-V2 (Dong et al. 2020, Sec. 3): ``Omega_l(b) = (Tr(H_l) / n_l) * ||Q_b(W_l) - W_l||_2^2``,
the average Hessian trace times the squared quantization error, and the total perturbation
of a configuration is ``sum_l Omega_l(b_l)``. Methods:

* ``'hawq_v2'``: ``avg_trace_l * err_l(b)`` (``avg_trace = Tr(H_l) / n_l``);
* ``'weight_norm'``: ``err_l(b)`` alone (the ablation without second-order information);
* ``'hawq_v1'``: ``(max(lambda_max_l, 0) / n_l) * err_l(b)`` (the largest algebraic Hessian
  eigenvalue, the V1 sensitivity, turned into the same additive form; never negative).

``err_l(b) = ||Q_b(W_l) - W_l||^2`` uses :func:`amq_jax.quant.quant_error` (per output
channel by default, the quantizer used for fine-tuning). For activations, pass your own
errors and traces to :func:`omega_from`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from amq_jax import _paths

__all__ = ["omega_table", "quant_errors", "omega_from"]


def _layer(path: str) -> str:
  p = str(path).strip("/")
  return p[: -len("/kernel")] if p.endswith("/kernel") else p


def _value(v) -> float:
  """A float from a float or an estimate object (``avg_trace`` / ``value`` / ``mean``)."""
  for attr in ("avg_trace", "value"):
    if hasattr(v, attr):
      return float(getattr(v, attr))
  if isinstance(v, Mapping):
    for k in ("avg_trace", "value", "mean"):
      if k in v:
        return float(v[k])
  return float(np.asarray(v).reshape(()))


def _names(layers) -> tuple[list[str], Any]:
  """Layer names, and the ``adapters.Layers`` table when one was given (else None)."""
  if hasattr(layers, "by_param"):
    return list(layers), layers
  return [_layer(l) for l in layers], None


def _key(k, table) -> str:
  """A layer name from a layer name or weight path ('fc/weight' -> 'fc' with a table)."""
  if table is not None:
    try:
      return table[k].name
    except ValueError:
      pass
  return _layer(k)


def _per_layer(values, layers: Sequence[str], name: str, table=None) -> np.ndarray:
  """``values`` (mapping keyed by layer or weight path, or a sequence in layer order)."""
  if isinstance(values, Mapping):
    d = {_key(k, table): v for k, v in values.items()}
    missing = [l for l in layers if l not in d]
    if missing:
      raise ValueError(f"{name} missing for layers {missing}; given for {sorted(d)}")
    return np.array([_value(d[l]) for l in layers], np.float64)
  arr = np.array([_value(v) for v in values], np.float64)
  if arr.shape != (len(layers),):
    raise ValueError(f"{name} has {arr.shape[0]} values for {len(layers)} layers")
  return arr


def _kernels(params, layers: Sequence[str], table=None) -> dict[str, Any]:
  if table is not None:
    flat = _paths.flatten(params)
    missing = [l for l in layers if table[l].param not in flat]
    if missing:
      raise ValueError(f"the weights of layers {missing} are not in the params")
    return {l: flat[table[l].param] for l in layers}
  by_layer = {}
  for p, v in _paths.flatten(params).items():
    if p == "kernel" or p.endswith("/kernel"):
      by_layer[_layer(p)] = v
    elif getattr(v, "ndim", 0) >= 2:  # a flat {layer_path: kernel} mapping
      by_layer.setdefault(p, v)
  missing = [l for l in layers if l not in by_layer]
  if missing:
    raise ValueError(f"unknown layers {missing}; kernels present: {sorted(by_layer)}")
  return {l: by_layer[l] for l in layers}


def quant_errors(params, layers: Sequence[str], bit_choices: Sequence[int] = (2, 3, 4, 8), *,
                 symmetric: bool = True, axis=-1, scale_method: str = "minmax",
                 grid: str = "amq") -> np.ndarray:
  """``[L, B]`` squared quantization errors ``||Q_b(W_l) - W_l||^2`` (float64 on host).

  Args:
    params: params pytree (or a flat ``{path: kernel}``).
    layers: layer or kernel paths (Linen kernels, channels last), or the model's
      ``adapters.Layers`` table: each layer's weight leaf, and its own channel axis for
      the per-channel quantizer (``axis=-1`` then means "the layer's output channel").
    bit_choices: widths. symmetric, axis, scale_method: the quantizer (see ``amq_jax.quant``).
    grid: 'amq', or 'qwix' for the errors of the grid a qwix-deployed model uses.
  """
  from amq_jax.quant._math import quant_error_jit  # the array math only (JAX, no Flax use)
  import jax

  layers, table = _names(layers)
  ks = _kernels(params, layers, table)
  axes = {l: table[l].channel_axis if table is not None and axis == -1 else axis
          for l in layers}
  out = np.zeros((len(layers), len(bit_choices)), np.float64)
  for j, b in enumerate(bit_choices):
    errs = jax.device_get([quant_error_jit(ks[l], bits=int(b), symmetric=symmetric, axis=axes[l],
                                           scale_method=scale_method, grid=grid)
                           for l in layers])
    out[:, j] = np.asarray(errs, np.float64)
  return out


def omega_from(weights, errors) -> np.ndarray:
  """``Omega[l, b] = weights[l] * errors[l, b]`` (e.g. activation avg traces x act errors)."""
  w = np.asarray(weights, np.float64).reshape(-1, 1)
  e = np.asarray(errors, np.float64)
  if e.ndim != 2 or e.shape[0] != w.shape[0]:
    raise ValueError(f"errors must be [L, B] with L = {w.shape[0]}, got {e.shape}")
  return w * e


def omega_table(params, layers: Sequence[str], bit_choices: Sequence[int] = (2, 3, 4, 8), *,
                avg_traces=None, method: str = "hawq_v2", top_eigs=None, errors=None,
                symmetric: bool = True, axis=-1, scale_method: str = "minmax",
                grid: str = "amq") -> tuple[list[str], tuple[int, ...], np.ndarray]:
  """The ``[L, B]`` Omega table of a model's layers (see module docstring for methods).

  Args:
    params: params pytree (kernels read from it; param counts n_l = kernel sizes).
    layers: layer or kernel paths (rows, in this order), or the model's ``adapters.Layers``
      (rows in execution order; weights and channel axes from the table, and trace or
      eigenvalue mappings may be keyed by weight path, e.g. ``layer_traces``' output).
    bit_choices: widths (columns).
    avg_traces: ``{path: Tr(H_l)/n_l}`` (floats or ``hessian.TraceEstimate``, whose
      ``avg_trace`` is used) or a sequence in layer order; required for 'hawq_v2'.
    method: 'hawq_v2' | 'weight_norm' | 'hawq_v1'.
    top_eigs: ``{path: lambda_max}`` or sequence; required for 'hawq_v1'.
    errors: precomputed ``[L, B]`` errors (skips :func:`quant_errors`).
    symmetric, axis, scale_method: the weight quantizer for the errors.
    grid: 'amq' or 'qwix' (the grid qwix deploys with: the table then ranks the
      configurations the deployed model will actually run).

  Returns:
    ``(layers, bit_choices, Omega)``: normalized layer paths, the widths, float64 ``[L, B]``.
  """
  layers, table = _names(layers)
  bits = tuple(int(b) for b in bit_choices)
  if method not in ("hawq_v2", "weight_norm", "hawq_v1"):
    raise ValueError(f"method must be 'hawq_v2', 'weight_norm' or 'hawq_v1', got {method!r}")
  if errors is None:
    errors = quant_errors(params, layers if table is None else table, bits,
                          symmetric=symmetric, axis=axis,
                          scale_method=scale_method, grid=grid)
  errors = np.asarray(errors, np.float64)
  if errors.shape != (len(layers), len(bits)):
    raise ValueError(f"errors must be {(len(layers), len(bits))}, got {errors.shape}")
  if method == "weight_norm":
    return layers, bits, errors.copy()
  if method == "hawq_v2":
    if avg_traces is None:
      raise ValueError("method='hawq_v2' needs avg_traces (Tr(H_l) / n_l per layer)")
    return layers, bits, omega_from(_per_layer(avg_traces, layers, "avg_traces", table),
                                    errors)
  if top_eigs is None:
    raise ValueError("method='hawq_v1' needs top_eigs (top Hessian eigenvalue per layer)")
  n = np.array([np.size(k) for k in _kernels(params, layers, table).values()], np.float64)
  # A negative top eigenvalue would make quantization error LOWER Omega. The largest
  # algebraic eigenvalue is negative only if the layer has no direction of positive
  # curvature (then V1's sensitivity is 0); a negative value may also be a largest-MAGNITUDE
  # eigenvalue (power iteration with which='LM'). Either way it is floored at 0.
  top = np.maximum(_per_layer(top_eigs, layers, "top_eigs", table), 0.0)
  return layers, bits, omega_from(top / n, errors)
