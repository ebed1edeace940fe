"""The Equinox adapter: a module split into its float arrays and the rest.

``eqx.partition(module, eqx.is_inexact_array)`` gives ``params`` (the module's pytree with
every float array kept and everything else ``None``) and ``static`` (the complement);
``eqx.combine(params, static)`` is the module again. Parameter paths read like attributes:
``'conv/weight'``, ``'layers/0/weight'``, so layers are named ``'conv'``, ``'layers/0'``.

Equinox weights are ``[out, in]`` (Linear) and ``[out, in, kh, kw]`` (Conv): the layer table
records output-channel axis 0, and everything downstream (per-channel quantizer, sizes,
export) reads it from there.

Equinox layers take ONE example; the adapter maps the model over the batch with
``jax.vmap`` unless ``batched=True`` (a model that already takes batches). ``train``
switches ``inference`` off on every sub-module that has it (``eqx.nn.inference_mode``), so
``Dropout`` is active in training (it then needs a key: pass a model whose dropout you
drive yourself, or use ``batched=True`` with your own wrapper).

Stateful layers (``eqx.nn.BatchNorm`` with ``eqx.nn.State``) are not supported: ``state`` is
always ``{}``.

No activation hooks (``act_apply`` is None): Equinox layers run on one example at a time
(under ``vmap``, the user's or ours), where a hook cannot observe the batch that a
calibration needs. Weight quantization, QAT and export work as for any model.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax

from amq_jax.adapters._layers import Layers, trace_layers
from amq_jax.adapters._model import Model

__all__ = ["from_equinox"]


def from_equinox(module, sample, *, batched: bool = False,
                 names: Mapping[str, str] | Callable[[str], str] | None = None) -> Model:
  """An Equinox module (``eqx.Module``), called as ``module(x)`` on one example.

  Args:
    module: the model. sample: an input batch (or ``jax.ShapeDtypeStruct``) with a leading
      batch axis, whatever ``batched`` is.
    batched: the module already takes a batch (no ``vmap``).
    names: optional layer names (see :func:`amq_jax.adapters.trace_layers`).

  Returns:
    A :class:`Model`: ``params`` the float arrays of the module (a module pytree),
    ``state == {}``, ``apply(params, state, x, *, train=False) -> (out, {})`` and
    ``rebuild(params, state) -> eqx.Module``; no activation hooks.

  >>> m = adapters.from_equinox(eqx_cnn, images[:2])     # images [N, C, H, W]
  >>> m.layers['conv'].channel_axis                      # 0: weights are [out, in, kh, kw]
  """
  import equinox as eqx

  params, static = eqx.partition(module, eqx.is_inexact_array)

  def model_of(params, train):
    return eqx.nn.inference_mode(eqx.combine(params, static), value=not train)

  def run(model, x):
    return model(x) if batched else jax.vmap(model)(x)

  def apply(params, state, x, *, train=False):
    return run(model_of(params, train), x), state

  def rebuild(params, state):
    del state
    return eqx.combine(params, static)

  layers: Layers = trace_layers(lambda p, x: apply(p, {}, x)[0], params, sample, names=names)
  return Model("equinox", params, {}, layers, apply, None, rebuild=rebuild, module=static)
