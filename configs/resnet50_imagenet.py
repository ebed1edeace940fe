"""resnet50 on ImageNet (prepared TFDS imagenet2012), for TPU/GPU runs.

  amq-jax run --config configs/resnet50_imagenet.py --workdir runs/resnet50 --config.data_dir=DIR

The batch is sharded over every local device (and every host after
jax.distributed.initialize()). Data preparation and weights: see configs/_imagenet.py.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_imagenet", os.path.join(os.path.dirname(__file__), "_imagenet.py"))
_imagenet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_imagenet)


def get_config(variant: str = ""):
  return _imagenet.imagenet_config("resnet50", 224, 0.1, variant)
