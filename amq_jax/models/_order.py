"""Forward (execution) order of a model's quantizable layers."""
from __future__ import annotations


def layer_order(model, variables, sample) -> list[str]:
  """Weight paths ('.../kernel') of every Conv/Dense of a Linen model in the order the
  forward pass calls them: a view of :func:`amq_jax.adapters.trace_layers`."""
  from amq_jax.adapters import from_linen
  return from_linen(model, variables, sample).layers.params_paths
