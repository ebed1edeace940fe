"""Flax Linen model zoo with a registry by name.

>>> from amq_jax import models
>>> model = models.get_model('resnet20', num_classes=10)
"""
from amq_jax.models._order import layer_order
from amq_jax.models._registry import default_input_shape, get_model, list_models, register
from amq_jax.models import resnet_cifar  # noqa: F401  (registers resnet20/32/56)
from amq_jax.models import resnet_imagenet  # noqa: F401  (registers resnet18/50, *_tiny)
from amq_jax.models import inception  # noqa: F401  (registers inception_v3, *_tiny)
from amq_jax.models import squeezenext  # noqa: F401  (registers squeezenext, _v5, _tiny)
from amq_jax.models import retinanet  # noqa: F401  (registers retinanet_resnet18/50, _tiny)
from amq_jax.models.resnet_cifar import CifarResNet

__all__ = ["layer_order", "get_model", "list_models", "register", "default_input_shape", "CifarResNet"]
