"""Curvature engine: HVPs, per-layer Hessian/GGN/Fisher traces, top eigenvalues, activations.

Everything works on any ``loss_fn(params, batch) -> scalar`` (the batch MEAN loss), a
params pytree and one batch or a list of batches; layers are addressed by '/'-joined
parameter paths (``'stage1_block1/conv1/kernel'``). Computations run under ``jax.jit`` with
the batch sharded over all devices (``mesh=None``: a 1-D mesh over ``jax.devices()``),
on one host or, after ``jax.distributed.initialize()``, several.

>>> from amq_jax import hessian, models
>>> loss_fn = hessian.linen_loss_fn(model, variables)
>>> est = hessian.layer_traces(loss_fn, variables['params'], batch, key=jax.random.key(0))
>>> est['head/kernel']          # trace +- stderr, probes, status
>>> sens = hessian.sensitivity_traces(est)      # what Omega uses (negative -> floored)
>>> ggn = hessian.layer_traces(loss_fn, variables['params'], batch, key=key,
...                            curvature='ggn',
...                            logits_fn=hessian.linen_logits_fn(model, variables))
>>> ev = hessian.top_eigenvalues(loss_fn, variables['params'], batch, key=key, k=20,
...                              layer='head/kernel')

Default estimator for :func:`layer_traces`: ``DEFAULT_ESTIMATOR`` (see
``benchmarks/bench_hessian.py`` and ``benchmarks/bench_curvature.py`` for the measurements).
"""
from amq_jax.hessian._activation import activation_traces
from amq_jax.hessian._eigen import EigenResult, SpectralDensity, spectral_density, top_eigenvalues
from amq_jax.hessian._ggn import OUTPUT_LOSSES, exact_ggn_traces
from amq_jax.hessian._hvp import HVP, linen_logits_fn, linen_loss_fn, make_hvp
from amq_jax.hessian._sensitivity import POLICIES, Sensitivity, sensitivity_traces
from amq_jax.hessian._sharding import default_mesh, shard_batch
from amq_jax.hessian._trace import (CURVATURES, DEFAULT_ESTIMATOR, ESTIMATORS, STATUSES,
                                    TraceEstimate, estimates_from_json, estimates_to_json,
                                    layer_traces)

__all__ = [
    "make_hvp", "HVP", "linen_loss_fn", "linen_logits_fn",
    "layer_traces", "TraceEstimate", "estimates_to_json", "estimates_from_json",
    "ESTIMATORS", "DEFAULT_ESTIMATOR", "CURVATURES", "STATUSES", "OUTPUT_LOSSES",
    "exact_ggn_traces", "sensitivity_traces", "Sensitivity", "POLICIES",
    "top_eigenvalues", "EigenResult", "spectral_density", "SpectralDensity",
    "activation_traces",
    "default_mesh", "shard_batch",
]
