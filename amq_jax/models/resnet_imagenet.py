"""ImageNet ResNets (He et al. 2016) in the torchvision layout ("ResNet v1.5").

The network is a 7x7/2 stem convolution, a 3x3/2 max-pool, four stages of residual blocks
with base widths 64/128/256/512 (the first block of stages 2-4 halves the resolution), a
global average pool and a fully connected layer with bias. Two block types:

* ``BasicBlock`` (ResNet-18/34): ``3x3 conv -> BN -> ReLU -> 3x3 conv -> BN``, output width
  ``w``.
* ``Bottleneck`` (ResNet-50/101/152): ``1x1 (w) -> 3x3 (w) -> 1x1 (4w)``, each followed by
  BN. The stride sits on the 3x3 convolution (v1.5, as torchvision; the original paper put
  it on the first 1x1), which costs no parameters and gains about 0.5% top-1.

The residual branch is added to the identity, or to a ``1x1 conv + BN`` projection
(``downsample_conv``/``downsample_bn``) when the shape changes; then ReLU.
Convolutions have no bias (a BN follows each). With 1000 classes and 224x224x3 inputs the
parameter counts (BatchNorm scale/bias included, running statistics excluded) equal
torchvision's: ResNet-18 11,689,512 and ResNet-50 25,557,032.

Module paths are stable and readable, so a bit configuration can address them:
``stem_conv``, ``stem_bn``, ``layer{s}_block{b}/conv{1,2,3}``, ``.../bn{1,2,3}``,
``.../downsample_conv``, ``.../downsample_bn``, ``fc`` (stages count from 1, blocks from 0).

>>> from amq_jax import models
>>> model = models.get_model('resnet18', num_classes=1000)
>>> # variables = model.init(key, jnp.zeros((1, 224, 224, 3)))
>>> # logits = model.apply(variables, images, train=False)
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from amq_jax.models._registry import register

__all__ = ["ImageNetResNet", "BasicBlock", "Bottleneck"]

# torchvision initializes convolutions with Kaiming-normal, fan-out mode.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(train: bool, name: str, zero_scale: bool = False) -> nn.BatchNorm:
  # torch momentum 0.1 on the new batch == Flax momentum 0.9 on the running average.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      name=name)


def _conv(features: int, kernel: int, strides: int, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection; output width ``features``.

  Attributes:
    features: output channels ``w``.
    strides: stride of the first 3x3 convolution (and of the projection).
    zero_init_residual: start the last BN's scale at 0, so each block begins as identity.
  """
  features: int
  strides: int = 1
  zero_init_residual: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = _conv(self.features, 3, self.strides, "conv1")(x)
    y = nn.relu(_bn(train, "bn1")(y))
    y = _conv(self.features, 3, 1, "conv2")(y)
    y = _bn(train, "bn2", self.zero_init_residual)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.strides, "downsample_conv")(x)
      x = _bn(train, "downsample_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4; output width ``4 * features``.

  Attributes:
    features: bottleneck width ``w`` (the block outputs ``4w`` channels).
    strides: stride of the 3x3 convolution (and of the projection).
    zero_init_residual: start the last BN's scale at 0.
  """
  features: int
  strides: int = 1
  zero_init_residual: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out = self.features * self.expansion
    y = _conv(self.features, 1, 1, "conv1")(x)
    y = nn.relu(_bn(train, "bn1")(y))
    y = _conv(self.features, 3, self.strides, "conv2")(y)
    y = nn.relu(_bn(train, "bn2")(y))
    y = _conv(out, 1, 1, "conv3")(y)
    y = _bn(train, "bn3", self.zero_init_residual)(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = _conv(out, 1, self.strides, "downsample_conv")(x)
      x = _bn(train, "downsample_bn")(x)
    return nn.relu(x + y)


class ImageNetResNet(nn.Module):
  """ResNet for ImageNet-sized inputs (torchvision layout).

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18,
      ``(3, 4, 6, 3)`` for ResNet-50.
    block: ``BasicBlock`` or ``Bottleneck``.
    num_classes: width of the final ``fc`` layer.
    width: multiplier on every channel count (stem 64 and stage widths); 1.0 is the paper's.
    base_widths: per-stage block widths before ``width`` is applied.
    zero_init_residual: zero-initialize each block's last BN scale (torchvision option).

  Call: ``model.apply(variables, x, train=False)`` with ``x`` of shape ``[N, H, W, C]``
  (any C; Flax infers it) returns logits ``[N, num_classes]``. With ``train=True`` BN uses
  batch statistics and updates ``'batch_stats'`` (pass ``mutable=['batch_stats']``).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: type = BasicBlock
  num_classes: int = 1000
  width: float = 1.0
  base_widths: Sequence[int] = (64, 128, 256, 512)
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    scale = lambda c: max(1, int(round(c * self.width)))  # noqa: E731
    x = _conv(scale(64), 7, 2, "stem_conv")(x)
    x = nn.relu(_bn(train, "stem_bn")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for s, (n_blocks, w) in enumerate(zip(self.stage_sizes, self.base_widths)):
      for b in range(n_blocks):
        strides = 2 if (s > 0 and b == 0) else 1
        x = self.block(scale(w), strides, self.zero_init_residual,
                       name=f"layer{s + 1}_block{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


_IMAGENET = (224, 224, 3)
register("resnet18", input_shape=_IMAGENET)(
    functools.partial(ImageNetResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock))
register("resnet50", input_shape=_IMAGENET)(
    functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck))
# Tiny variants for tests: one block per stage, an eighth of the width, 32x32 inputs.
_TINY = (32, 32, 3)
register("resnet18_tiny", input_shape=_TINY)(
    functools.partial(ImageNetResNet, stage_sizes=(1, 1, 1, 1), block=BasicBlock, width=0.125,
                      num_classes=10))
register("resnet50_tiny", input_shape=_TINY)(
    functools.partial(ImageNetResNet, stage_sizes=(1, 1, 1, 1), block=Bottleneck, width=0.125,
                      num_classes=10))
