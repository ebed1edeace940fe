"""The Flax NNX adapter: a stateful ``nnx.Module`` seen as pure functions over pytrees.

``nnx.split(module, nnx.Param, ...)`` separates the graph (static structure) from two
states: the parameters and everything else (``BatchStat`` running statistics, RNG
counters). Both become plain nested dicts (``nnx.to_pure_dict``), so paths read like the
module's attributes (``'conv1/kernel'``, ``'layers/0/kernel'``) and optax, the Hessian
estimators and the quantizer handle them like any pytree.

Every call merges a fresh module from the graph and the two states, so the user's module is
never mutated:

    apply(params, state, x, *, train) = merge -> set train/eval mode -> call -> split

``train`` sets ``deterministic`` / ``use_running_average`` on every sub-module that has
them (``nnx.view``), the attributes ``Dropout`` and ``BatchNorm`` read; the new state holds
the updated running statistics (unchanged in eval mode).

Activation hooks: on the merged copy, each quantizable layer's sub-module is swapped for a
small wrapper that passes its input through ``hook(name, x)`` and calls the layer; the
originals are put back before splitting, so the state keeps its structure.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from amq_jax.adapters._layers import Layers, trace_layers
from amq_jax.adapters._model import Hook, Model
from amq_jax.errors import LayerError

__all__ = ["from_nnx"]


class _Hooked:
  """Stands in for a layer module during one call: ``out_hook(name, layer(hook(name, x)))``."""

  def __init__(self, inner, name: str, hook: Hook, out_hook: Hook | None = None):
    self.inner, self.name, self.hook, self.out_hook = inner, name, hook, out_hook

  def __call__(self, x, *args, **kwargs):
    y = self.inner(self.hook(self.name, x), *args, **kwargs)
    return y if self.out_hook is None else self.out_hook(self.name, y)


def _set_child(parent, key, value) -> None:
  if isinstance(key, str) and not isinstance(parent, Mapping) and hasattr(parent, key):
    setattr(parent, key, value)
  else:
    parent[key] = value


def from_nnx(module, sample, *, names: Mapping[str, str] | Callable[[str], str] | None = None
             ) -> Model:
  """A Flax NNX module (its parameters and state are taken from it, as they are now).

  Args:
    module: an ``nnx.Module`` called as ``module(x)``.
    sample: an input batch (or ``jax.ShapeDtypeStruct``) to trace the layers with.
    names: optional layer names (see :func:`amq_jax.adapters.trace_layers`).

  Returns:
    A :class:`Model` whose ``params`` / ``state`` are nested dicts (``nnx.to_pure_dict``),
    ``apply(params, state, x, *, train=False) -> (out, new_state)``, ``act_apply`` with a
    hook on each quantizable layer's input (and optionally its output), and ``rebuild(params, state) -> nnx.Module``.

  >>> m = adapters.from_nnx(nnx_cnn, images[:2])
  >>> logits, _ = m.apply(m.params, m.state, images)
  """
  from flax import nnx

  if not isinstance(module, nnx.Module):
    raise LayerError(f"from_nnx needs an nnx.Module, got {type(module).__name__}; use "
                     "from_linen for Linen modules and from_equinox for Equinox ones")
  graphdef, param_state, rest_state = nnx.split(module, nnx.Param, ...)
  params = nnx.to_pure_dict(param_state)
  state = nnx.to_pure_dict(rest_state)

  def merged(params, state, train):
    m = nnx.merge(graphdef, params, state)
    return nnx.view(m, deterministic=not train, use_running_average=not train,
                    raise_if_not_found=False)

  def finish(m, out):
    _, _, rest = nnx.split(m, nnx.Param, ...)
    return out, nnx.to_pure_dict(rest)

  def apply(params, state, x, *, train=False):
    m = merged(params, state, train)
    return finish(m, m(x))

  def act_apply(params, state, x, hook: Hook, *, train=False, out_hook: Hook | None = None):
    m = merged(params, state, train)
    nodes = {"/".join(str(k) for k in path): (path, node)
             for path, node in nnx.graph.iter_graph(m) if isinstance(node, nnx.Module)}
    swapped, whole = [], None
    try:
      for layer in layers.values():
        owner = layer.param.rpartition("/")[0]
        if owner not in nodes:
          raise LayerError(f"layer {layer.name!r}: its weight {layer.param!r} is not an "
                           "attribute of a sub-module, so its input cannot be hooked")
        path, node = nodes[owner]
        if not path:  # the module itself is the layer
          x = hook(layer.name, x)
          whole = layer.name
          continue
        parent = nodes["/".join(str(k) for k in path[:-1])][1]
        _set_child(parent, path[-1], _Hooked(node, layer.name, hook, out_hook))
        swapped.append((parent, path[-1], node))
      out = m(x)
      if whole is not None and out_hook is not None:
        out = out_hook(whole, out)
    finally:
      for parent, key, node in reversed(swapped):
        _set_child(parent, key, node)
    return finish(m, out)

  def rebuild(params, state):
    return nnx.merge(graphdef, params, state)

  layers: Layers = trace_layers(lambda p, x: apply(p, state, x, train=False)[0], params,
                                sample, names=names)
  return Model("nnx", params, state, layers, apply, act_apply, rebuild=rebuild,
               module=graphdef)
