"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2): 6n+2 layers, widths 16/32/64.

Every quantizable layer has a readable path: ``stem_conv``, ``stage{s}_block{b}/conv1``,
``.../conv2``, ``.../proj_conv`` (1x1 projection shortcut where shape changes), ``head``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from amq_jax.models._registry import register


class BasicBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.features, (3, 3), (self.strides,) * 2, padding=1, use_bias=False,
                name="conv1")(x)
    y = nn.relu(bn(name="bn1")(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv2")(y)
    y = bn(name="bn2", scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), (self.strides,) * 2, use_bias=False,
                  name="proj_conv")(x)
      x = bn(name="proj_bn")(x)
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for small images. ``width`` multiplies the 16/32/64 channel widths."""
  depth: int = 20
  num_classes: int = 10
  width: float = 1.0
  stage_widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
    n = (self.depth - 2) // 6
    widths = [max(1, int(round(w * self.width))) for w in self.stage_widths]
    x = nn.Conv(widths[0], (3, 3), padding=1, use_bias=False, name="stem_conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x)
    x = nn.relu(x)
    for s, w in enumerate(widths):
      for b in range(n):
        strides = 2 if (s > 0 and b == 0) else 1
        x = BasicBlock(w, strides, name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


_SMALL = (28, 28, 1)
for _d in (20, 32, 56):
  register(f"resnet{_d}", input_shape=_SMALL)(functools.partial(CifarResNet, depth=_d))
# Tiny variant for tests: 8 layers, a quarter of the width.
register("resnet_tiny", input_shape=_SMALL)(functools.partial(CifarResNet, depth=8, width=0.25))
