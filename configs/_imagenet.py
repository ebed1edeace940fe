"""Shared ImageNet settings for the *_imagenet.py configs (not a config itself).

Prepare the data once, on a machine with internet:
  tfds build imagenet2012 --data_dir DIR --file_format array_record
(with the ImageNet tar files in DIR/downloads/manual/). No pretrained weights are shipped:
'run' first trains the FP32 model, or put your own trained variables (a flax msgpack of
{'params', 'batch_stats'}) at WORKDIR/fp32/variables.msgpack.
"""
import importlib.util
import os

import ml_collections


def _default():
  spec = importlib.util.spec_from_file_location(
      "_resnet20_fmnist", os.path.join(os.path.dirname(__file__), "resnet20_fmnist.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def imagenet_config(model: str, image_size: int, base_lr: float, variant: str = ""):
  """The default config's fields, set for ``model`` on ImageNet at ``image_size``."""
  if variant:
    raise ValueError(f"unknown variant {variant!r}")
  c = _default()
  c.model = model
  c.model_kwargs = ml_collections.ConfigDict({"num_classes": 1000})
  c.input_shape = (image_size, image_size, 3)
  c.image_size = image_size
  c.dataset = "tfds:imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.preprocess = "imagenet"
  c.worker_count = 8
  c.pretrained = ""
  # CPU devices to split every batch over: 1 = JAX's single CPU device; 'auto' = one
  # per core (~0.7x the QAT step time on 2 cores; opt-in, see amq_jax/_hostdev.py).
  c.host_devices = ml_collections.FieldReference(1, field_type=object)  # 1 | "auto" | N
  # Optimization sections, same fields as every config (see resnet20_fmnist.py): train is
  # the 90-epoch SGD schedule with the learning rate scaled by batch / 256; fine-tuning
  # uses the same batch and periods, no augmentation, and its own rate and epochs.
  bs = 256                       # global batch; a multiple of the device count
  c.train.update(dict(
      learning_rate=base_lr * bs / 256, weight_decay=1e-4, warmup_steps=5 * 5000,
      batch_size=bs, num_epochs=90.0,
      augment=False,             # augmentation is part of the TFDS preprocessing
      checkpoint_every_steps=2000, log_every_steps=100, eval_batch_size=500))
  c.hessian.num_examples = 1024
  c.hessian.batch_size = 128
  c.hessian.max_probes = 50
  c.hessian.rtol = 0.05
  c.hessian.eig_layers = ()
  c.search.budget = "avg:4"
  c.finetune.update(dict(
      learning_rate=1e-3 * bs / 256, batch_size=bs, num_epochs=10.0, augment=False,
      checkpoint_every_steps=2000, log_every_steps=100, eval_batch_size=500,
      calib_examples=1024))
  return c
