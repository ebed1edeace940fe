"""Model adapters: Flax Linen, Flax NNX, Equinox and plain ``apply_fn`` + params.

Each returns a :class:`Model` (params, state, a pure apply, the layer table in execution
order, optional activation hooks); everything downstream reads only that.

>>> from amq_jax import adapters
>>> m = adapters.from_linen(module, variables, sample)
>>> m.layers.names                       # execution order
"""
from amq_jax.adapters._layers import Layer, Layers, layer_name, trace_layers
from amq_jax.adapters._model import Model, from_linen, sample_like

__all__ = ["Layer", "Layers", "layer_name", "trace_layers", "Model", "from_linen",
           "sample_like"]
