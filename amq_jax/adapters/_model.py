"""A model as data: parameters, state, a pure apply, its layer table, optional hooks.

Every framework plugs in through one small record, :class:`Model`; the stages (analysis,
search, fake-quantized apply, QAT, export) read nothing else.

    apply(params, state, x, *, train) -> (output, new_state)

``state`` holds the non-trainable collections (Linen ``batch_stats``, NNX ``BatchStat``),
``{}`` when there are none; ``new_state`` has the same structure (unchanged in inference).
``act_apply`` is the same function with a hook on every quantizable layer's input,
``hook(layer_name, x) -> x``, and optionally one on its output, ``out_hook(layer_name, y) ->
y`` (the exact GGN taps both: :func:`amq_jax.hessian.exact_ggn_traces`); frameworks without
a way to intercept layer calls leave it None, and activation quantization then says so.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from amq_jax.adapters._layers import Layers, trace_layers
from amq_jax.errors import LayerError

__all__ = ["Model", "from_linen"]

Hook = Callable[[str, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A framework's model seen by amq-jax.

  framework: 'linen', 'nnx', 'equinox' or 'apply'. params: the trainable pytree.
  state: non-trainable pytree ({} if none). layers: :class:`Layers` in execution order.
  apply: ``apply(params, state, x, *, train) -> (out, new_state)``.
  act_apply: ``act_apply(params, state, x, hook, *, train, out_hook=None) -> (out,
    new_state)`` or None.
  rebuild: ``rebuild(params, state)`` -> the user's own object (Linen variables, an NNX
    module, an Equinox module), for handing results back.
  """
  framework: str
  params: Any
  state: Any
  layers: Layers
  apply: Callable
  act_apply: Callable | None = None
  rebuild: Callable | None = None
  module: Any = None

  def __repr__(self) -> str:
    n = sum(int(x.size) for x in jax.tree_util.tree_leaves(self.params))
    return (f"Model({self.framework}, {n:,} parameters, {len(self.layers)} quantizable layers"
            f"{', activation hooks' if self.act_apply else ''})")

  def replace(self, **kw) -> "Model":
    return dataclasses.replace(self, **kw)

  def require_act_hooks(self, what: str = "activation quantization") -> Callable:
    if self.act_apply is None:
      raise LayerError(
          f"{what} needs a hook on each layer's input, which the {self.framework!r} adapter "
          "does not provide (the Linen and NNX adapters have it); quantize weights only (set the "
          "activation widths to None, e.g. --config.search.act_bits=None)")
    return self.act_apply


def _takes_train(module) -> bool:
  try:
    sig = inspect.signature(type(module).__call__)
  except (TypeError, ValueError):
    return True
  return "train" in sig.parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def from_linen(module, variables, sample, *, train_kwarg: bool | None = None,
               apply_kwargs: dict | None = None) -> Model:
  """A Flax Linen module and its variables (``{'params': ..., 'batch_stats': ...}``).

  Args:
    module: the ``nn.Module``. variables: from ``module.init`` or a checkpoint.
    sample: an input batch (or ``jax.ShapeDtypeStruct``) to trace the layers with.
    train_kwarg: pass ``train=`` to ``__call__`` (default: if its signature takes it).
    apply_kwargs: extra keyword arguments for every ``module.apply``.

  Layer names are module paths ('stage1_block1/conv1'); activation hooks use
  ``nn.intercept_methods`` on those modules' ``__call__``.
  """
  import flax.linen as nn

  variables = dict(variables)
  params = variables.pop("params")
  state = variables
  use_train = _takes_train(module) if train_kwarg is None else train_kwarg
  extra = dict(apply_kwargs or {})
  mutable = [k for k in state]

  def call(params, state, x, train):
    kw = dict(extra)
    if use_train:
      kw["train"] = train
    v = dict(state, params=params)
    if train and mutable:
      out, upd = module.apply(v, x, mutable=mutable, **kw)
      return out, dict(state, **upd)
    return module.apply(v, x, **kw), state

  def apply(params, state, x, *, train=False):
    return call(params, state, x, train)

  def act_apply(params, state, x, hook: Hook, *, train=False, out_hook: Hook | None = None):
    names = set(layers.names)

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and args:
        path = "/".join(context.module.path)
        if path in names:
          args = (hook(path, args[0]),) + tuple(args[1:])
          out = next_fun(*args, **kwargs)
          return out if out_hook is None else out_hook(path, out)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return call(params, state, x, train)

  # Abstract variables (jax.eval_shape) trace too: the closed-over state needs values.
  concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype)
                          if isinstance(s, jax.ShapeDtypeStruct) else s, state)
  layers = trace_layers(lambda p, x: call(p, concrete, x, False)[0], params, sample)
  return Model("linen", params, state, layers, apply, act_apply,
               rebuild=lambda p, s: dict(s, params=p), module=module)


def sample_like(input_shape, dtype=jnp.float32):
  """A one-example abstract input of ``input_shape`` (no batch axis)."""
  return jax.ShapeDtypeStruct((1,) + tuple(input_shape), dtype)
