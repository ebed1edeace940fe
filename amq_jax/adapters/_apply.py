"""The plain-JAX adapter: any ``apply_fn`` and its params pytree.

Two calling conventions, chosen by whether ``state`` is given:

* stateless (``state=None``): ``apply_fn(params, x) -> out``;
* stateful: ``apply_fn(params, state, x, train) -> (out, new_state)``, ``train`` a Python
  bool (e.g. BatchNorm statistics in ``state``).

The layers are traced from ``apply_fn`` (every matrix product or convolution whose weight
is a leaf of ``params``, named by its path: ``{'w1': ...}`` gives layer ``'w1'``), or given:
a :class:`Layers` table you built, or a list of the names / param paths to keep.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from amq_jax import _paths
from amq_jax.adapters._layers import Layers, trace_layers
from amq_jax.adapters._model import Model
from amq_jax.errors import LayerError

__all__ = ["from_apply"]


def _check_layers(layers: Layers, params) -> Layers:
  flat = _paths.flatten(params)
  for l in layers.values():
    if l.param not in flat:
      raise LayerError(f"layer {l.name!r}: weight path {l.param!r} is not in the params; "
                       f"params paths are {list(flat)}")
    shape = tuple(np.shape(flat[l.param]))
    if shape != tuple(l.shape) or not 0 <= l.channel_axis < len(shape):
      raise LayerError(f"layer {l.name!r}: the table says shape {tuple(l.shape)}, channel "
                       f"axis {l.channel_axis}; the weight {l.param!r} has shape {shape}")
  return layers


def from_apply(apply_fn: Callable, params, sample, *, state=None,
               layers: Layers | Sequence[str] | None = None,
               names: Mapping[str, str] | Callable[[str], str] | None = None) -> Model:
  """A plain function and its parameters (see the module docstring for the conventions).

  Args:
    apply_fn: ``apply_fn(params, x)`` (when ``state`` is None) or
      ``apply_fn(params, state, x, train) -> (out, new_state)``.
    params: the trainable pytree (nested dicts, lists, any pytree).
    sample: an input batch (or ``jax.ShapeDtypeStruct``) to trace the layers with.
    state: the non-trainable pytree, or None for a stateless ``apply_fn``.
    layers: None (trace them), a :class:`Layers` table (checked against ``params``), or the
      names / param paths of the layers to keep (traced, then selected).
    names: optional layer names for tracing (see :func:`amq_jax.adapters.trace_layers`).

  Returns:
    A :class:`Model` with ``apply(params, state, x, *, train=False) -> (out, new_state)``;
    no activation hooks (weight quantization only).

  >>> def mlp(p, x):
  ...   return jax.nn.relu(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
  >>> m = adapters.from_apply(mlp, params, x[:2])
  >>> m.layers.names
  ['w1', 'w2']
  """
  if not callable(apply_fn):
    raise LayerError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  if state is None:
    def apply(params, state, x, *, train=False):
      del train
      return apply_fn(params, x), state
    state = {}
  else:
    def apply(params, state, x, *, train=False):
      out = apply_fn(params, state, x, bool(train))
      if not (isinstance(out, tuple) and len(out) == 2):
        raise LayerError("with state=, apply_fn(params, state, x, train) must return "
                         f"(out, new_state); it returned {type(out).__name__}")
      return out

  if isinstance(layers, Layers):
    table = _check_layers(layers, params)
  else:
    table = trace_layers(lambda p, x: apply(p, state, x)[0], params, sample, names=names,
                         include=None if layers is None else list(layers))
  return Model("apply", params, state, table, apply, None,
               rebuild=lambda p, s: (p, s), module=apply_fn)
