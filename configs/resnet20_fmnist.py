"""ResNet20 on Fashion-MNIST: the embedded default, end to end on a laptop.

  amq-jax run   --config configs/resnet20_fmnist.py --workdir runs/default
  amq-jax train --config configs/resnet20_fmnist.py --workdir runs/default   # FP32 only

Variants: ``--config configs/resnet20_fmnist.py:tiny`` is a seconds-long version for tests.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "resnet20"
  c.model_kwargs = ml_collections.ConfigDict({"num_classes": 10})
  c.input_shape = (28, 28, 1)
  c.dataset = "fashion_mnist"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_limit = ml_collections.FieldReference(None, field_type=int)
  c.test_limit = ml_collections.FieldReference(None, field_type=int)
  # Shipped FP32 checkpoint (amq_jax/assets/<name>.msgpack) used when the workdir has none.
  c.pretrained = "resnet20_fmnist"
  c.seed = 0

  # FP32 training (reproduces the shipped checkpoint).
  c.optimizer = "sgd"
  c.batch_size = 128
  c.num_epochs = 10
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.warmup_steps = 200
  c.augment = True
  c.eval_batch_size = 1000
  c.checkpoint_every_steps = 200
  c.log_every_steps = 50
  c.progress = True

  if variant == "tiny":
    c.model = "resnet_tiny"
    c.pretrained = ""
    c.train_limit = 512
    c.test_limit = 256
    c.batch_size = 64
    c.num_epochs = 2
    c.warmup_steps = 0
    c.learning_rate = 0.05
    c.checkpoint_every_steps = 4
    c.log_every_steps = 4
    c.eval_batch_size = 128
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of resnet20_fmnist; use '' or 'tiny'")
  return c
