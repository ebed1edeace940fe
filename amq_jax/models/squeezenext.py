"""SqueezeNext (Gholami et al. 2018, "SqueezeNext: Hardware-Aware Neural Network Design").

Layout of 1.0-SqNxt-23, checked layer by layer against the authors' Caffe definition
(``amirgholami/SqueezeNext``, ``1.0-SqNxt-23/train_val.prototxt``):

* stem: 7x7/2 convolution (64, no padding) -> BN -> ReLU -> 3x3/2 max-pool;
* four stages of SqueezeNext blocks, output widths 32/64/128/256, with 6/6/8/1 blocks
  (23 = 1 stem + 21 blocks + 1 final conv, counting a block as one layer); the first block of
  stages 2-4 has stride 2;
* a final 1x1 convolution (128) -> BN -> ReLU, global average pooling, and ``fc``
  (no bias, as in the reference).

A block of output width ``C`` (Sec. 3 and Fig. 2 of the paper) is five convolutions, each
followed by BN and ReLU::

  conv1  1x1, C/2 (stride s: the block's downsampling)     two-stage squeeze
  conv2  1x1, C/4
  conv3  3x1, C/2  (1x3 in odd-numbered blocks)            separable 3x3
  conv4  1x3, C/2  (3x1 in odd-numbered blocks)
  conv5  1x1, C                                            expansion

plus the identity, or ``shortcut_conv`` (1x1, C, stride s) -> BN -> ReLU where the shape
changes (the first block of every stage); then ``relu(shortcut + main)``. The order of the
3x1/1x3 pair alternates from block to block as in the reference definition (the count of
parameters does not depend on it). All convolutions have no bias (each has a BN).

``squeezenext_v5`` (1.0-SqNxt-23v5) moves blocks to later, lower-resolution stages:
2/4/14/1 blocks instead of 6/6/8/1 (same depth, fewer MACs, more parameters); the first
two stages were checked against ``1.0-SqNxt-23v5/train_val.prototxt``, the other two follow
from the paper's distribution and the reference's 111 convolutions.

Parameter counts for 1000 classes (BN scale/bias included, running statistics excluded):
1.0-SqNxt-23: 717,280; 1.0-SqNxt-23v5: 913,632 (asserted by ``tests/test_models.py``;
111 convolutions + ``fc``, as in the reference). The paper reports 0.72M parameters for
1.0-SqNxt-23.

Module paths: ``stem_conv``, ``stem_bn``, ``stage{s}_block{b}/conv{1..5}``, ``.../bn{1..5}``,
``.../shortcut_conv``, ``.../shortcut_bn``, ``final_conv``, ``final_bn``, ``fc``
(stages count from 1, blocks from 0).

>>> from amq_jax import models
>>> model = models.get_model('squeezenext', num_classes=1000)
>>> # variables = model.init(key, jnp.zeros((1, 224, 224, 3)))
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from amq_jax.models._registry import register

__all__ = ["SqueezeNext", "SqueezeNextBlock"]


def _conv_bn_relu(x, features: int, kernel: tuple[int, int], strides: int, train: bool,
                  conv_name: str, bn_name: str):
  # Called inside a compact method, so the layers are named children of that module.
  ph, pw = kernel[0] // 2, kernel[1] // 2
  x = nn.Conv(features, kernel, (strides, strides), padding=((ph, ph), (pw, pw)),
              use_bias=False, name=conv_name)(x)
  x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=bn_name)(x)
  return nn.relu(x)


class SqueezeNextBlock(nn.Module):
  """One SqueezeNext block (see the module docstring).

  Attributes:
    features: output channels ``C``; the inner widths are ``C/2`` and ``C/4``.
    strides: stride of ``conv1`` and of the shortcut projection.
    vertical_first: 3x1 before 1x3 (True, even blocks) or the reverse (odd blocks).
  """
  features: int
  strides: int = 1
  vertical_first: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.features
    half, quarter = max(1, c // 2), max(1, c // 4)
    k3, k4 = ((3, 1), (1, 3)) if self.vertical_first else ((1, 3), (3, 1))
    y = _conv_bn_relu(x, half, (1, 1), self.strides, train, "conv1", "bn1")
    y = _conv_bn_relu(y, quarter, (1, 1), 1, train, "conv2", "bn2")
    y = _conv_bn_relu(y, half, k3, 1, train, "conv3", "bn3")
    y = _conv_bn_relu(y, half, k4, 1, train, "conv4", "bn4")
    y = _conv_bn_relu(y, c, (1, 1), 1, train, "conv5", "bn5")
    if self.strides != 1 or x.shape[-1] != c:
      x = _conv_bn_relu(x, c, (1, 1), self.strides, train, "shortcut_conv", "shortcut_bn")
    return nn.relu(x + y)


class SqueezeNext(nn.Module):
  """SqueezeNext classifier (defaults: 1.0-SqNxt-23).

  Attributes:
    stage_sizes: blocks per stage: ``(6, 6, 8, 1)`` for SqNxt-23, ``(2, 4, 14, 1)`` for v5.
    num_classes: width of ``fc``.
    stem_width: channels of the 7x7 stem (64 in every reference variant).
    stage_widths: output widths of the four stages; ``(64, 128, 256, 512)`` gives the
      2.0-SqNxt stage widths (the 2.0 head was not checked against the reference).
    final_width: channels of the final 1x1 convolution.

  Call: ``model.apply(variables, x, train=False)`` with ``x`` of shape ``[N, H, W, C]``
  (any C, H, W >= 23) returns logits ``[N, num_classes]``.
  """
  stage_sizes: Sequence[int] = (6, 6, 8, 1)
  num_classes: int = 1000
  stem_width: int = 64
  stage_widths: Sequence[int] = (32, 64, 128, 256)
  final_width: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.stem_width, (7, 7), (2, 2), padding="VALID", use_bias=False,
                name="stem_conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
    for s, (n_blocks, w) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for b in range(n_blocks):
        strides = 2 if (s > 0 and b == 0) else 1
        x = SqueezeNextBlock(w, strides, vertical_first=(b % 2 == 0),
                             name=f"stage{s + 1}_block{b}")(x, train)
    x = _conv_bn_relu(x, self.final_width, (1, 1), 1, train, "final_conv", "final_bn")
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=False, name="fc")(x)


_IMAGENET = (224, 224, 3)
register("squeezenext", input_shape=_IMAGENET)(
    functools.partial(SqueezeNext, stage_sizes=(6, 6, 8, 1)))
register("squeezenext_v5", input_shape=_IMAGENET)(
    functools.partial(SqueezeNext, stage_sizes=(2, 4, 14, 1)))
# Tiny variant for tests: 2/1/1/1 blocks (an identity block and both 3x1/1x3 orders),
# a quarter of the widths.
register("squeezenext_tiny", input_shape=(32, 32, 3))(
    functools.partial(SqueezeNext, stage_sizes=(2, 1, 1, 1), stem_width=16,
                      stage_widths=(8, 16, 32, 64), final_width=32, num_classes=10))
