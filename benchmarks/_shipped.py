"""The shipped ResNet20 (Fashion-MNIST) that the curvature benchmarks measure."""
import jax
import jax.numpy as jnp

from amq_jax import models, train


def shipped_resnet20(ap):
  """``(model, variables)`` of ``amq_jax/assets/resnet20_fmnist.msgpack``; ``ap.error`` (exit 2,
  one line) when the checkpoint is missing."""
  path = train.shipped_checkpoint("resnet20_fmnist")
  if path is None:
    ap.error("the shipped ResNet20 checkpoint is missing (amq_jax/assets/resnet20_fmnist.msgpack)")
  variables = jax.tree.map(jnp.asarray, train.restore_variables(path))
  return models.get_model("resnet20", num_classes=10), variables
