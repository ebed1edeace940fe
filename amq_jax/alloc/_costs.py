"""Layer costs: parameter counts, MACs, model size in bytes, BOPs, budget conversions.

Size convention (the same as ``amq_jax.quant.export_packed``'s payload):

* a quantized kernel of ``n`` weights at ``b`` bits costs ``ceil(n * b / 8)`` bytes, plus
  one float32 scale per output channel (``C_out = kernel.shape[channel_axis]``: the last
  axis for Linen kernels, the layer table's axis with ``layers=``, e.g. 0 for Equinox),
  plus one float32 zero-point per channel when asymmetric;
* every other parameter (BatchNorm, biases, kernels of layers not in the configuration) is
  float32 (4 bytes); BatchNorm running statistics are not ``params`` and are not counted;
* MB means 10^6 bytes (as papers report model sizes), never MiB.

Compute: ``BOPs = MACs * w_bits * a_bits`` (Baskin et al.; HAWQ-V3), MACs per example.

Everything here except :func:`layer_costs` is NumPy on host data; :func:`layer_costs` runs
the model abstractly (``jax.eval_shape``) to read layer shapes and imports Flax only there.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from amq_jax import _paths

__all__ = ["LayerCost", "layer_costs", "size_bits", "bops", "model_size_bytes", "model_size_mb",
           "fixed_size_bytes", "size_cost_table", "bops_cost_table", "mb_to_budget",
           "avg_bits_to_budget", "average_bits", "MB"]

MB = 1_000_000  # bytes in a megabyte (decimal)


class LayerCost(NamedTuple):
  """Static costs of one Conv/Dense layer (per example).

  ``path``: layer path; ``params``: kernel elements n; ``macs``: multiply-accumulates per
  example (summed over calls); ``channels``: output channels (one scale each);
  ``kernel_shape``, ``out_shape`` (per call, without batch); ``calls``: forward calls.
  """
  path: str
  params: int
  macs: int
  channels: int
  kernel_shape: tuple
  out_shape: tuple
  calls: int = 1


def _layer(path: str) -> str:
  p = str(path).strip("/")
  return p[: -len("/kernel")] if p.endswith("/kernel") else p


def layer_costs(model, variables, sample, layers: Sequence[str] | None = None, *,
                train_kwarg: bool = True) -> dict[str, LayerCost]:
  """Parameter count and MACs of each Conv/Dense layer of a Linen model, from shapes.

  A view of the layer table (:func:`amq_jax.adapters.trace_layers`): ``MACs =
  out_elements * kernel.size / C_out`` per call (``out * in`` for Dense, and only the real
  products of a transposed convolution), summed over calls, per example.

  Args:
    model: a Linen module; variables: its variables; sample: an input batch (or
      ``jax.ShapeDtypeStruct``). layers: layer or kernel paths to report (default: every
      quantizable layer), returned in forward order.
    train_kwarg: call the model with ``train=False`` (set False for models without it).

  Returns:
    ``{layer_path: LayerCost}`` in forward-call order.
  """
  from amq_jax.adapters import from_linen  # only this function needs a model

  table = from_linen(model, variables, sample, train_kwarg=train_kwarg).layers
  want = None if layers is None else {_layer(l) for l in layers}
  if want is not None:
    unknown = sorted(want - set(table.names))
    if unknown:
      raise ValueError(f"unknown layer paths {unknown}; valid layer paths: {table.names}")
  return {l.name: LayerCost(l.name, l.params, l.macs, l.channels, tuple(l.shape),
                            tuple(l.out_shape), l.calls)
          for l in table.values() if want is None or l.name in want}


def size_bits(params, bits):
  """Weight storage in bits: ``params * bits`` (element-wise on arrays)."""
  return np.asarray(params, np.float64) * np.asarray(bits, np.float64)


def bops(macs, w_bits, a_bits):
  """Bit operations ``macs * w_bits * a_bits`` (element-wise on arrays)."""
  return np.asarray(macs, np.float64) * np.asarray(w_bits) * np.asarray(a_bits)


def _w_bits(config) -> dict[str, int]:
  """``{layer: w_bits}`` from a BitConfig/mapping of ints or {'w', 'a'} dicts."""
  out = {}
  for k, v in (config or {}).items():
    b = v.get("w") if isinstance(v, Mapping) else v
    if b is not None:
      out[_layer(k)] = int(b)
  return out


def _quantized(params, config, layers) -> dict[str, tuple[int, int]]:
  """``{weight path: (w_bits, channel axis)}`` of ``config``'s layers."""
  wb = _w_bits(config)
  if layers is not None:  # an adapters.Layers table: names or weight paths as keys
    valid = list(layers)
    out, unknown = {}, []
    for k, b in wb.items():
      try:
        l = layers[k]
      except ValueError:
        unknown.append(k)
        continue
      out[l.param] = (b, l.channel_axis)
  else:
    flat = _paths.flatten(params)
    kernels = {_layer(p): p for p, v in flat.items()
               if p.rsplit("/", 1)[-1] == "kernel" and getattr(v, "ndim", 0) >= 2}
    valid = list(kernels)
    unknown = [l for l in wb if l not in kernels]
    out = {kernels[l]: (b, -1) for l, b in wb.items() if l in kernels}
  if unknown:
    from amq_jax.errors import BitsError
    raise BitsError(f"unknown layer paths {sorted(unknown)}; valid layer paths: {valid}")
  return out


def model_size_bytes(params, config=None, *, symmetric: bool = True, layers=None) -> int:
  """Bytes to store ``params`` with ``config``'s weight widths (module docstring convention).

  Equals the payload of ``amq_jax.quant.export_packed(params, config, path, layers=...,
  symmetric=...)``.

  Args:
    params: a params pytree. config: ``{layer_path: bits | {'w': bits, 'a': ...}}`` (None:
      everything float32). symmetric: asymmetric adds one float32 zero-point per channel.
    layers: the model's ``adapters.Layers``: each layer's weight leaf and output-channel
      axis (any framework). Without it: leaves named ``kernel``, channels last.
  """
  quantized = _quantized(params, config, layers)
  total = 0
  for p, v in _paths.flatten(params).items():
    n = int(np.prod(np.shape(v)))
    if p in quantized:
      b, axis = quantized[p]
      c = int(np.shape(v)[axis])
      total += (n * b + 7) // 8 + 4 * c * (1 if symmetric else 2)
    else:
      total += 4 * n
  return total


def model_size_mb(params, config=None, *, symmetric: bool = True, layers=None) -> float:
  """:func:`model_size_bytes` in MB (10^6 bytes)."""
  return model_size_bytes(params, config, symmetric=symmetric, layers=layers) / MB


def fixed_size_bytes(params, layers, *, symmetric: bool = True) -> int:
  """Bytes that do not depend on the widths of ``layers``: everything else in float32 plus
  the per-channel scales (and zero-points) of ``layers``.

  ``layers``: layer paths (Linen kernels), or an ``adapters.Layers`` table (all its layers,
  each with its own weight leaf and channel axis; ``table.select(names)`` for a subset).

  So ``model_size_bytes(params, cfg) ~= fixed + sum_l n_l * b_l / 8`` (exact up to the
  per-layer rounding up to whole bytes, under 1 byte per layer).
  """
  table = layers if hasattr(layers, "by_param") else None
  # At 0 bits model_size_bytes counts the scales and zero-points but no weight bytes.
  return model_size_bytes(params, {l: 0 for l in layers}, symmetric=symmetric, layers=table)


def size_cost_table(param_counts: Sequence[int], bit_choices: Sequence[int]) -> np.ndarray:
  """``[L, B]`` weight bits ``n_l * b`` (the frontier's size cost)."""
  return np.outer(np.asarray(param_counts, np.float64), np.asarray(bit_choices, np.float64))


def bops_cost_table(macs: Sequence[int], bit_choices: Sequence[int], a_bits=8) -> np.ndarray:
  """``[L, B]`` BOPs ``macs_l * b * a_bits_l`` (``a_bits`` a scalar or one per layer)."""
  a = np.broadcast_to(np.asarray(a_bits, np.float64), (len(macs),))
  return np.asarray(macs, np.float64)[:, None] * np.asarray(bit_choices, np.float64)[None] * a[:, None]


def mb_to_budget(mb: float, fixed_bytes: float = 0.0) -> float:
  """A size budget in MB -> a budget on the frontier's cost ``sum n_l b_l`` (bits)."""
  return (float(mb) * MB - float(fixed_bytes)) * 8.0


def avg_bits_to_budget(avg_bits: float, param_counts: Sequence[int]) -> float:
  """Average bits ``sum(n_l b_l) / sum(n_l)`` -> a budget on ``sum n_l b_l`` (bits)."""
  return float(avg_bits) * float(np.sum(np.asarray(param_counts, np.float64)))


def average_bits(param_counts: Sequence[int], bits: Sequence[int]) -> float:
  """``sum(n_l * b_l) / sum(n_l)``."""
  n = np.asarray(param_counts, np.float64)
  return float(np.sum(n * np.asarray(bits, np.float64)) / np.sum(n))
