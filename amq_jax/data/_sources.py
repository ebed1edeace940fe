"""Training/evaluation data behind one small interface, so the loop is data-agnostic.

A source has ``num_examples``, ``steps_per_epoch(batch_size)``,
``train_batches(batch_size, *, seed, epoch, start)`` (shuffled by (seed, epoch); ``start``
skips batches to resume mid-epoch with the same order) and ``eval_batches(batch_size)``
(every example once, the last batch possibly short).
"""
from __future__ import annotations

import zlib
from typing import Iterator

from amq_jax.data import fashion_mnist


class InMemorySource:
  """A :class:`fashion_mnist.Dataset` (NumPy arrays) with optional crop/flip augmentation."""

  def __init__(self, ds: fashion_mnist.Dataset, *, augment: bool = False):
    self.ds = ds
    self.augment = augment
    self.num_examples = len(ds.labels)

  def steps_per_epoch(self, batch_size: int) -> int:
    return fashion_mnist.num_batches(self.ds, batch_size)

  def train_batches(self, batch_size, *, seed, epoch, start=0) -> Iterator[dict]:
    return fashion_mnist.batches(self.ds, batch_size, seed=seed, epoch=epoch, start=start,
                                 augment_data=self.augment)

  def eval_batches(self, batch_size) -> Iterator[dict]:
    return fashion_mnist.batches(self.ds, batch_size, seed=None, drop_remainder=False)


class TfdsSource:
  """A prepared TFDS split through :func:`amq_jax.data.load_tfds` (grain, no TensorFlow)."""

  def __init__(self, name: str, split: str, *, data_dir=None, image_size=None,
               preprocess="imagenet", worker_count=0):
    from amq_jax.data.tfds_reader import load_tfds
    self._load = load_tfds
    self.kw = dict(name=name, split=split, data_dir=data_dir, image_size=image_size,
                   preprocess=preprocess, worker_count=worker_count)
    probe = load_tfds(batch_size=1, train=False, **self.kw)
    self.num_examples = probe.num_examples

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.num_examples // batch_size

  def train_batches(self, batch_size, *, seed, epoch, start=0) -> Iterator[dict]:
    # One pass per epoch with its own shuffle seed, so (seed, epoch) fixes the order.
    epoch_seed = zlib.crc32(f"{seed}/{epoch}".encode())
    it = iter(self._load(batch_size=batch_size, train=True, seed=epoch_seed, num_epochs=1,
                         **self.kw))
    for i, b in enumerate(it):
      if i >= start:
        yield b

  def eval_batches(self, batch_size) -> Iterator[dict]:
    return iter(self._load(batch_size=batch_size, train=False, num_epochs=1, **self.kw))


def as_source(data, *, augment: bool = False):
  """A source from a Dataset (wrapped) or a source (returned as is)."""
  if isinstance(data, fashion_mnist.Dataset):
    return InMemorySource(data, augment=augment)
  return data
