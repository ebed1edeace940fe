"""Placement of batches and parameters on a device mesh: a re-export of :mod:`amq_jax._sharding`.

The estimators of this package run their math under ``jax.jit`` with the batch sharded over
every device of a 1-D mesh and parameters, probes and results replicated; the helpers live
in the package-wide home :mod:`amq_jax._sharding` (training uses the same ones).
"""
from amq_jax._sharding import (_batch_spec, as_batch_list, batch_size, batch_sharding,  # noqa: F401
                               data_mesh, default_mesh, process_slice, replicate, replicated,
                               serial_on_cpu, shard_batch, to_host)

__all__ = ["default_mesh", "shard_batch", "replicate", "to_host", "as_batch_list",
           "batch_size"]
