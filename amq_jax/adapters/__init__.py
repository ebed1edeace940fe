"""Model adapters: Flax Linen, Flax NNX, Equinox and plain ``apply_fn`` + params.

Each returns a :class:`Model` (params, state, a pure apply, the layer table in execution
order, optional activation hooks); everything downstream reads only that.

>>> from amq_jax import adapters
>>> m = adapters.from_linen(module, variables, sample)
>>> m = adapters.from_nnx(nnx_module, sample)
>>> m = adapters.from_equinox(eqx_module, sample)          # vmapped over the batch
>>> m = adapters.from_apply(lambda p, x: x @ p['w1'] @ p['w2'], params, sample)
>>> m.layers.names                       # execution order
>>> out, new_state = m.apply(m.params, m.state, x, train=False)
"""
from amq_jax.adapters._layers import Layer, Layers, layer_name, trace_layers
from amq_jax.adapters._model import Model, from_linen, sample_like
from amq_jax.adapters._nnx import from_nnx
from amq_jax.adapters._equinox import from_equinox
from amq_jax.adapters._apply import from_apply

__all__ = ["Layer", "Layers", "layer_name", "trace_layers", "Model", "from_linen",
           "from_nnx", "from_equinox", "from_apply", "sample_like"]
