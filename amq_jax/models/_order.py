"""Forward (execution) order of a model's quantizable layers."""
from __future__ import annotations

import flax.linen as nn
import jax


def layer_order(model: nn.Module, variables, sample) -> list[str]:
  """Kernel paths ('.../kernel') of every Conv/Dense in the order the forward pass calls them.

  Runs ``model.apply`` abstractly (``jax.eval_shape``), so it costs no FLOPs.
  """
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(
        mod, (nn.Conv, nn.Dense, nn.ConvTranspose)):
      path = "/".join(mod.path) + "/kernel"
      if path not in order:
        order.append(path)
    return next_fun(*args, **kwargs)

  def run(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, sample)
  return order
