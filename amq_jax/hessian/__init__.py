"""Hessian engine: HVPs, per-layer traces, top eigenvalues, activation traces.

Everything works on any ``loss_fn(params, batch) -> scalar`` (the batch MEAN loss), a
params pytree and one batch or a list of batches; layers are addressed by '/'-joined
parameter paths (``'stage1_block1/conv1/kernel'``). Computations run under ``jax.jit`` with
the batch sharded over all devices (``mesh=None``: a 1-D mesh over ``jax.devices()``),
on one host or, after ``jax.distributed.initialize()``, several.

>>> from amq_jax import hessian, models
>>> loss_fn = hessian.linen_loss_fn(model, variables)
>>> est = hessian.layer_traces(loss_fn, variables['params'], batch, key=jax.random.key(0))
>>> est['head/kernel'].avg_trace
>>> ev = hessian.top_eigenvalues(loss_fn, variables['params'], batch, key=key, k=20,
...                              layer='head/kernel')

Default estimator for :func:`layer_traces`: ``DEFAULT_ESTIMATOR`` (see
``benchmarks/bench_hessian.py`` for the measurements behind the choice).
"""
from amq_jax.hessian._activation import activation_traces
from amq_jax.hessian._eigen import EigenResult, SpectralDensity, spectral_density, top_eigenvalues
from amq_jax.hessian._hvp import HVP, linen_loss_fn, make_hvp
from amq_jax.hessian._sharding import default_mesh, shard_batch
from amq_jax.hessian._trace import (DEFAULT_ESTIMATOR, ESTIMATORS, TraceEstimate,
                                    estimates_from_json, estimates_to_json, layer_traces)

__all__ = [
    "make_hvp", "HVP", "linen_loss_fn",
    "layer_traces", "TraceEstimate", "estimates_to_json", "estimates_from_json",
    "ESTIMATORS", "DEFAULT_ESTIMATOR",
    "top_eigenvalues", "EigenResult", "spectral_density", "SpectralDensity",
    "activation_traces",
    "default_mesh", "shard_batch",
]
