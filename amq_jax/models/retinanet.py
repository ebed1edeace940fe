"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection") in Flax Linen.

Architecture::

    image -> ResNet backbone -> C3, C4, C5 (strides 8, 16, 32)
          -> FPN: P5 = 1x1(C5); P4 = 1x1(C4) + up2(P5); P3 = 1x1(C3) + up2(P4);
                  each followed by a 3x3 output conv;
                  P6 = 3x3/2 conv of C5 (or of P5); P7 = 3x3/2 conv of relu(P6)
          -> on every level P_l (the same weights for all levels):
               class subnet: K x (3x3 conv, F ch, ReLU) -> 3x3 conv, A*C ch (logits)
               box subnet:   K x (3x3 conv, F ch, ReLU) -> 3x3 conv, A*4 ch (deltas)

``A`` anchors per location (3 scales x 3 aspect ratios), ``C`` classes (sigmoid, no
background class). The class output's bias starts at ``-log((1 - pi) / pi)`` with
``pi = 0.01``, so every anchor starts with foreground probability 0.01 and the focal loss
of the ~100k easy negatives does not swamp the first steps (paper Sec. 4.1, "Initialization").
Head convolutions start from N(0, 0.01^2) with zero bias.

Output of ``model.apply(variables, x, train=...)``: a dict

* ``'cls_logits'`` ``[N, total_anchors, C]``, ``'box_deltas'`` ``[N, total_anchors, 4]``:
  levels concatenated in order ``min_level..max_level``; inside a level, anchors are ordered
  row-major over ``(y, x, a)``. :func:`amq_jax.detection.generate_anchors` produces the
  anchors in exactly this order.

Module paths (so a bit configuration can address them): ``backbone/stem_conv``,
``backbone/layer{s}_block{b}/conv{1,2,3}`` (as :class:`ImageNetResNet`, whose weights can
therefore be copied in), ``fpn/lateral_c{3,4,5}``, ``fpn/output_p{3,4,5}``, ``fpn/p6``,
``fpn/p7``, ``class_net/conv{k}``, ``class_net/out``, ``box_net/conv{k}``, ``box_net/out``.

``head_mode``: ``'per_level'`` calls each head convolution once per level (the usual way).
``'packed'`` lays all levels out on one canvas (stacked vertically, zero-padded to the widest
level, a zero row between levels, re-masked after every convolution, so the result is
identical) and calls each head convolution ONCE per forward pass. Use it where a tool needs
each module's input activation to be unique, e.g. :func:`amq_jax.hessian.activation_traces`.
Each head conv zeroes the canvas padding of its input inside its own ``__call__``, so
perturbations or quantization applied to that input never reach the padding. (The input
size a tool sees is the canvas, ``sum_l (H_l + 1) x max_l W_l x F``, not the valid cells.)

>>> from amq_jax import models
>>> model = models.get_model('retinanet_tiny')                 # 96x96x1, 10 classes
>>> # out = model.apply(variables, images, train=False); out['cls_logits'].shape
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from amq_jax.models._registry import register
from amq_jax.models.resnet_imagenet import BasicBlock, Bottleneck, _bn, _conv

__all__ = ["RetinaNet", "ResNetBackbone", "FPN", "PRIOR_PROB"]

PRIOR_PROB = 0.01
_head_init = nn.initializers.normal(stddev=0.01)
_fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # Kaiming-uniform, a=1


class ResNetBackbone(nn.Module):
  """:class:`ImageNetResNet` without pooling and ``fc``; returns ``{'c2'..'c5'}``.

  Module names equal ``ImageNetResNet``'s (``stem_conv``, ``layer1_block0``...), so its
  ImageNet weights load into ``params['backbone']`` unchanged (drop ``fc``).
  ``c{l}`` has stride ``2**l``: spatial size ``ceil(H / 2**l)``.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: type = BasicBlock
  width: float = 1.0
  base_widths: Sequence[int] = (64, 128, 256, 512)

  @nn.compact
  def __call__(self, x, train: bool = False):
    scale = lambda c: max(1, int(round(c * self.width)))  # noqa: E731
    x = _conv(scale(64), 7, 2, "stem_conv")(x)
    x = nn.relu(_bn(train, "stem_bn")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    feats = {}
    for s, (n_blocks, w) in enumerate(zip(self.stage_sizes, self.base_widths)):
      for b in range(n_blocks):
        strides = 2 if (s > 0 and b == 0) else 1
        x = self.block(scale(w), strides, name=f"layer{s + 1}_block{b}")(x, train)
      feats[f"c{s + 2}"] = x
    return feats


def _upsample_to(x, shape_hw):
  """Nearest-neighbour x2 upsampling, cropped to ``shape_hw`` (odd sizes round up)."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, :shape_hw[0], :shape_hw[1]]


class _MaskedConv(nn.Conv):
  """``nn.Conv`` that first zeroes its input outside ``mask`` (packed head canvas).

  The mask is applied INSIDE the module's ``__call__``, so whatever an interceptor does to
  the module's input (fake-quantization, the perturbation of activation Hessians) is
  masked too and the padding between levels stays exactly zero.
  """

  # Not ``super().__call__``: that is a second intercepted call of the same module.
  # The same computation as nn.Conv for a stride-1 convolution with symmetric padding.
  @nn.compact
  def __call__(self, inputs, mask=None):
    if mask is not None:
      inputs = inputs * mask
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, inputs.shape[-1], self.features),
                        self.param_dtype)
    y = jax.lax.conv_general_dilated(inputs, kernel.astype(inputs.dtype), (1, 1),
                                     ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return y


class _Subnet(nn.Module):
  """``convs`` x (3x3 conv + ReLU) then a 3x3 output conv; shared over levels."""
  features: int
  convs: int
  out_features: int
  out_bias: float = 0.0

  def setup(self):
    self.layers = [_MaskedConv(self.features, (3, 3), padding=1, kernel_init=_head_init,
                               name=f"conv{k}") for k in range(self.convs)]
    self.out = _MaskedConv(self.out_features, (3, 3), padding=1, kernel_init=_head_init,
                           bias_init=nn.initializers.constant(self.out_bias), name="out")

  def __call__(self, x, mask=None):
    for conv in self.layers:
      x = nn.relu(conv(x, mask))
    return self.out(x, mask)


class FPN(nn.Module):
  """Feature pyramid P_min..P_max from backbone features ``{'c3', 'c4', 'c5'}``.

  ``P5 = 1x1(C5)``, ``P_l = 1x1(C_l) + up2(P_{l+1})`` down to ``min_level``, a 3x3 output
  conv on each; ``P6 = 3x3/2(C5 or P5)``, ``P7 = 3x3/2(relu(P6))``. Returns a list in level
  order.
  """
  features: int = 256
  min_level: int = 3
  max_level: int = 7
  p6_from: str = "c5"

  @nn.compact
  def __call__(self, c: dict) -> list:
    conv = functools.partial(nn.Conv, self.features, kernel_init=_fpn_init)
    top = min(self.max_level, 5)
    lateral = {l: conv((1, 1), name=f"lateral_c{l}")(c[f"c{l}"])
               for l in range(self.min_level, top + 1)}
    p = {top: lateral[top]}
    for l in range(top - 1, self.min_level - 1, -1):
      p[l] = lateral[l] + _upsample_to(p[l + 1], lateral[l].shape[1:3])
    out = {l: conv((3, 3), padding=1, name=f"output_p{l}")(p[l])
           for l in range(self.min_level, top + 1)}
    if self.max_level >= 6:
      if self.p6_from not in ("c5", "p5"):
        raise ValueError(f"p6_from must be 'c5' or 'p5', got {self.p6_from!r}")
      src = c["c5"] if self.p6_from == "c5" else out[5]
      out[6] = conv((3, 3), (2, 2), padding=1, name="p6")(src)
    for l in range(7, self.max_level + 1):
      out[l] = conv((3, 3), (2, 2), padding=1, name=f"p{l}")(nn.relu(out[l - 1]))
    return [out[l] for l in range(self.min_level, self.max_level + 1)]


class RetinaNet(nn.Module):
  """RetinaNet with a ResNet backbone, FPN levels ``min_level..max_level`` and shared heads.

  Attributes:
    num_classes: object classes ``C`` (no background class: sigmoid outputs).
    stage_sizes, block, width, base_widths: the backbone (see :class:`ImageNetResNet`);
      ResNet-18 ``(2,2,2,2)``/``BasicBlock``, ResNet-50 ``(3,4,6,3)``/``Bottleneck``.
    num_anchors: anchors per location ``A`` (scales x aspect ratios).
    fpn_features: channels ``F`` of every pyramid level and of the head convolutions.
    head_convs: 3x3 conv + ReLU layers in each subnet before its output conv (paper: 4).
    min_level, max_level: pyramid levels (3..7 in the paper; ``min_level >= 3``,
      ``max_level >= 5``); levels above 5 come from stride-2 convolutions.
    p6_from: ``'c5'`` (paper) or ``'p5'`` (torchvision's RetinaNet v2).
    prior_prob: initial foreground probability of the class outputs.
    freeze_backbone_bn: keep the backbone's BatchNorm in inference mode even when training
      (usual with ImageNet-pretrained backbones and small per-device batches).
    head_mode: ``'per_level'`` or ``'packed'`` (see the module docstring).
  """
  num_classes: int = 80
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: type = BasicBlock
  width: float = 1.0
  base_widths: Sequence[int] = (64, 128, 256, 512)
  num_anchors: int = 9
  fpn_features: int = 256
  head_convs: int = 4
  min_level: int = 3
  max_level: int = 7
  p6_from: str = "c5"
  prior_prob: float = PRIOR_PROB
  freeze_backbone_bn: bool = False
  head_mode: str = "per_level"

  @property
  def levels(self) -> tuple[int, ...]:
    return tuple(range(self.min_level, self.max_level + 1))

  def _heads_per_level(self, cls_net, box_net, feats):
    return [cls_net(f) for f in feats], [box_net(f) for f in feats]

  def _heads_packed(self, cls_net, box_net, feats):
    wmax = max(f.shape[2] for f in feats)
    rows, masks = [], []
    for f in feats:
      h, w = f.shape[1:3]
      rows.append(jnp.pad(f, ((0, 0), (0, 1), (0, wmax - w), (0, 0))))
      masks.append(jnp.pad(jnp.ones((1, h, w, 1), f.dtype), ((0, 0), (0, 1), (0, wmax - w),
                                                             (0, 0))))
    canvas, mask = jnp.concatenate(rows, axis=1), jnp.concatenate(masks, axis=1)
    outs = []
    for net in (cls_net, box_net):
      y, top, per = net(canvas, mask), 0, []
      for f in feats:
        h, w = f.shape[1:3]
        per.append(y[:, top:top + h, :w])
        top += h + 1
      outs.append(per)
    return outs

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.min_level < 3 or self.max_level < 5 or self.min_level > self.max_level:
      raise ValueError(f"levels {self.min_level}..{self.max_level}: need 3 <= min_level and "
                       "5 <= max_level")
    if self.head_mode not in ("per_level", "packed"):
      raise ValueError(f"head_mode must be 'per_level' or 'packed', got {self.head_mode!r}")
    c = ResNetBackbone(self.stage_sizes, self.block, self.width, self.base_widths,
                       name="backbone")(x, train and not self.freeze_backbone_bn)
    feats = FPN(self.fpn_features, self.min_level, self.max_level, self.p6_from, name="fpn")(c)
    A, C = self.num_anchors, self.num_classes
    bias = -math.log((1.0 - self.prior_prob) / self.prior_prob)
    cls_net = _Subnet(self.fpn_features, self.head_convs, A * C, bias, name="class_net")
    box_net = _Subnet(self.fpn_features, self.head_convs, A * 4, 0.0, name="box_net")
    if self.head_mode == "packed":
      cls_out, box_out = self._heads_packed(cls_net, box_net, feats)
    else:
      cls_out, box_out = self._heads_per_level(cls_net, box_net, feats)
    n = x.shape[0]
    cls = jnp.concatenate([o.reshape(n, -1, C) for o in cls_out], axis=1)
    box = jnp.concatenate([o.reshape(n, -1, 4) for o in box_out], axis=1)
    return {"cls_logits": cls, "box_deltas": box}


# ResNet-18/50 RetinaNets at COCO scale (80 classes; images padded to 640x640 by the reader).
_COCO = (640, 640, 3)
register("retinanet_resnet18", input_shape=_COCO)(
    functools.partial(RetinaNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock))
register("retinanet_resnet50", input_shape=_COCO)(
    functools.partial(RetinaNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck))
# Tiny variant for tests and the Fashion-MNIST detection set: resnet18_tiny-like backbone
# (one block per stage, width/8), 32 FPN channels, 2 head convs, levels 3-5, 96x96x1 inputs.
register("retinanet_tiny", input_shape=(96, 96, 1))(
    functools.partial(RetinaNet, num_classes=10, stage_sizes=(1, 1, 1, 1), block=BasicBlock,
                      width=0.125, fpn_features=32, head_convs=2, min_level=3, max_level=5))
