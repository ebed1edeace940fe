"""Inception-V3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") in the
torchvision layout.

Every convolution is a ``BasicConv2d``: ``conv`` (no bias) -> ``bn`` (BatchNorm with scale
and bias, epsilon 1e-3) -> ReLU. The network on a 299x299 input:

====================  ==========================================  ===========
module                what                                        output
====================  ==========================================  ===========
Conv2d_1a_3x3         3x3/2 conv, 32                              149x149x32
Conv2d_2a_3x3         3x3 conv, 32                                147x147x32
Conv2d_2b_3x3         3x3 conv (padded), 64; then 3x3/2 max-pool  73x73x64
Conv2d_3b_1x1         1x1 conv, 80                                73x73x80
Conv2d_4a_3x3         3x3 conv, 192; then 3x3/2 max-pool          35x35x192
Mixed_5b/5c/5d        InceptionA (pool features 32/64/64)         35x35x288
Mixed_6a              InceptionB (grid reduction)                 17x17x768
Mixed_6b/6c/6d/6e     InceptionC (7x7 factorized, c7=128/160/160/192)  17x17x768
AuxLogits (optional)  InceptionAux on Mixed_6e's output           num_classes
Mixed_7a              InceptionD (grid reduction)                 8x8x1280
Mixed_7b/7c           InceptionE (expanded 3x3 splits)            8x8x2048
fc                    global average pool, dropout, dense         num_classes
====================  ==========================================  ===========

Parameter counts for 1000 classes (BN scale/bias included, running statistics excluded):
23,834,568 without the auxiliary head; the head (``aux_logits=True``) adds 3,326,696
(1x1 conv 768->128 + BN: 98,560; 5x5 conv 128->768 + BN: 2,459,136; fc 768->1000 with
bias: 769,000), 27,161,264 in all -- the same as torchvision.

Module paths follow torchvision's names: ``Conv2d_1a_3x3/conv``, ``Mixed_5b/branch1x1/conv``,
``Mixed_6b/branch7x7dbl_3/bn``, ``AuxLogits/conv0/conv``, ``AuxLogits/fc``, ``fc``.

The smallest input that fits is 75x75 (the auxiliary head needs about 299x299).

>>> from amq_jax import models
>>> model = models.get_model('inception_v3', num_classes=1000)
>>> # variables = model.init(key, jnp.zeros((1, 299, 299, 3)))
>>> # logits = model.apply(variables, images, train=False)
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from amq_jax.models._registry import register

__all__ = ["InceptionV3", "BasicConv2d", "InceptionA", "InceptionB", "InceptionC",
           "InceptionD", "InceptionE", "InceptionAux"]


def _scaled(c: int, width: float) -> int:
  return max(1, int(round(c * width)))


class BasicConv2d(nn.Module):
  """``conv`` (no bias) -> ``bn`` (epsilon 1e-3) -> ReLU.

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    strides: one stride for both spatial axes.
    padding: ``(ph, pw)`` zeros added on each side (torch-style symmetric padding).
  """
  features: int
  kernel_size: Sequence[int] = (1, 1)
  strides: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x, train: bool):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel_size), (self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    # torch momentum 0.1 on the new batch == Flax momentum 0.9 on the running average.
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x):
  # torch AvgPool2d(3, stride=1, padding=1), count_include_pad=True.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1, concatenated."""
  pool_features: int
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    c = functools.partial(_scaled, width=self.width)
    b1 = BasicConv2d(c(64), name="branch1x1")(x, train)
    b5 = BasicConv2d(c(48), name="branch5x5_1")(x, train)
    b5 = BasicConv2d(c(64), (5, 5), padding=(2, 2), name="branch5x5_2")(b5, train)
    b3 = BasicConv2d(c(64), name="branch3x3dbl_1")(x, train)
    b3 = BasicConv2d(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3, train)
    b3 = BasicConv2d(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3, train)
    bp = BasicConv2d(c(self.pool_features), name="branch_pool")(_avg_pool_3x3_same(x), train)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    c = functools.partial(_scaled, width=self.width)
    b3 = BasicConv2d(c(384), (3, 3), strides=2, name="branch3x3")(x, train)
    bd = BasicConv2d(c(64), name="branch3x3dbl_1")(x, train)
    bd = BasicConv2d(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd, train)
    bd = BasicConv2d(c(96), (3, 3), strides=2, name="branch3x3dbl_3")(bd, train)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with 7x7 convolutions factorized into 1x7 and 7x1 (width ``c7``)."""
  channels_7x7: int
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    c = functools.partial(_scaled, width=self.width)
    c7 = c(self.channels_7x7)
    b1 = BasicConv2d(c(192), name="branch1x1")(x, train)
    b7 = BasicConv2d(c7, name="branch7x7_1")(x, train)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7, train)
    b7 = BasicConv2d(c(192), (7, 1), padding=(3, 0), name="branch7x7_3")(b7, train)
    bd = BasicConv2d(c7, name="branch7x7dbl_1")(x, train)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd, train)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd, train)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd, train)
    bd = BasicConv2d(c(192), (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd, train)
    bp = BasicConv2d(c(192), name="branch_pool")(_avg_pool_3x3_same(x), train)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    c = functools.partial(_scaled, width=self.width)
    b3 = BasicConv2d(c(192), name="branch3x3_1")(x, train)
    b3 = BasicConv2d(c(320), (3, 3), strides=2, name="branch3x3_2")(b3, train)
    b7 = BasicConv2d(c(192), name="branch7x7x3_1")(x, train)
    b7 = BasicConv2d(c(192), (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7, train)
    b7 = BasicConv2d(c(192), (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7, train)
    b7 = BasicConv2d(c(192), (3, 3), strides=2, name="branch7x7x3_4")(b7, train)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 outputs."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    c = functools.partial(_scaled, width=self.width)
    b1 = BasicConv2d(c(320), name="branch1x1")(x, train)
    b3 = BasicConv2d(c(384), name="branch3x3_1")(x, train)
    b3 = jnp.concatenate([
        BasicConv2d(c(384), (1, 3), padding=(0, 1), name="branch3x3_2a")(b3, train),
        BasicConv2d(c(384), (3, 1), padding=(1, 0), name="branch3x3_2b")(b3, train)], axis=-1)
    bd = BasicConv2d(c(448), name="branch3x3dbl_1")(x, train)
    bd = BasicConv2d(c(384), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd, train)
    bd = jnp.concatenate([
        BasicConv2d(c(384), (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd, train),
        BasicConv2d(c(384), (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd, train)], axis=-1)
    bp = BasicConv2d(c(192), name="branch_pool")(_avg_pool_3x3_same(x), train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionAux(nn.Module):
  """Auxiliary classifier on the 17x17 grid: 5x5/3 avgpool -> 1x1 (128) -> 5x5 (768) -> fc.

  Needs a grid of at least 17x17 (a 299x299 input), so the 5x5 convolution has room.
  """
  num_classes: int
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    c = functools.partial(_scaled, width=self.width)
    x = nn.avg_pool(x, (5, 5), (3, 3), padding="VALID")
    x = BasicConv2d(c(128), name="conv0")(x, train)
    x = BasicConv2d(c(768), (5, 5), name="conv1")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


class InceptionV3(nn.Module):
  """Inception-V3 classifier (torchvision layout).

  Attributes:
    num_classes: width of ``fc`` (and of ``AuxLogits/fc``).
    aux_logits: add the auxiliary head ``AuxLogits`` after ``Mixed_6e``. Its parameters
      exist whenever this is True; with ``train=True`` the call returns
      ``(logits, aux_logits)``, with ``train=False`` only ``logits`` (as torchvision).
    dropout_rate: dropout before ``fc`` in training (torchvision uses 0.5). The default 0
      needs no ``'dropout'`` RNG; with a positive rate pass ``rngs={'dropout': key}``.
    width: multiplier on every channel count; 1.0 is the published network.

  Call: ``model.apply(variables, x, train=False)`` with ``x`` of shape ``[N, H, W, C]``,
  H, W >= 75 (about 299 with ``aux_logits``), returns logits ``[N, num_classes]``.
  """
  num_classes: int = 1000
  aux_logits: bool = False
  dropout_rate: float = 0.0
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.width
    c = functools.partial(_scaled, width=w)
    x = BasicConv2d(c(32), (3, 3), strides=2, name="Conv2d_1a_3x3")(x, train)
    x = BasicConv2d(c(32), (3, 3), name="Conv2d_2a_3x3")(x, train)
    x = BasicConv2d(c(64), (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x, train)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(c(80), name="Conv2d_3b_1x1")(x, train)
    x = BasicConv2d(c(192), (3, 3), name="Conv2d_4a_3x3")(x, train)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, w, name="Mixed_5b")(x, train)
    x = InceptionA(64, w, name="Mixed_5c")(x, train)
    x = InceptionA(64, w, name="Mixed_5d")(x, train)
    x = InceptionB(w, name="Mixed_6a")(x, train)
    x = InceptionC(128, w, name="Mixed_6b")(x, train)
    x = InceptionC(160, w, name="Mixed_6c")(x, train)
    x = InceptionC(160, w, name="Mixed_6d")(x, train)
    x = InceptionC(192, w, name="Mixed_6e")(x, train)
    # Computed (so its parameters exist) whenever enabled; unused outputs are removed by XLA.
    aux = InceptionAux(self.num_classes, w, name="AuxLogits")(x, train) if self.aux_logits else None
    x = InceptionD(w, name="Mixed_7a")(x, train)
    x = InceptionE(w, name="Mixed_7b")(x, train)
    x = InceptionE(w, name="Mixed_7c")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
    logits = nn.Dense(self.num_classes, name="fc")(x)
    if self.aux_logits and train:
      return logits, aux
    return logits


register("inception_v3", input_shape=(299, 299, 3))(InceptionV3)
# Tiny variant for tests: an eighth of every width at the smallest input that fits.
register("inception_v3_tiny", input_shape=(75, 75, 3))(
    functools.partial(InceptionV3, width=0.125, num_classes=10))
