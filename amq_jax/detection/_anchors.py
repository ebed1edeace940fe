"""Anchors of a feature pyramid and their assignment to ground-truth boxes (jittable).

Level ``l`` has stride ``s = 2**l`` and a ``ceil(H / s) x ceil(W / s)`` grid (what the
backbone's stride-2 convolutions produce). At each cell center ``((i + 0.5) s, (j + 0.5) s)``
sit ``len(scales) * len(aspect_ratios)`` anchors of area ``(anchor_scale * s * 2**k)^2``,
``k`` in ``(0, 1/3, 2/3)``, and aspect ratio ``r = h / w`` in ``(0.5, 1, 2)``
(``h = size * sqrt(r)``, ``w = size / sqrt(r)``). The order is levels, then rows, columns,
then anchors (scale-major), matching :class:`amq_jax.models.retinanet.RetinaNet`'s outputs.

Assignment (RetinaNet paper, Sec. 4): an anchor is positive for the ground-truth box of
highest IoU if that IoU >= 0.5, background if its highest IoU < 0.4, ignored in between;
additionally each ground-truth box's best anchor is made positive for it (so small or
odd-shaped objects always get an anchor). Ground truths are fixed-size padded arrays
(``boxes [G, 4]`` and ``classes [G]`` with class -1 for padding), so everything jits.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax.detection._boxes import BOX_WEIGHTS, encode_boxes, iou_matrix

__all__ = ["AnchorConfig", "feature_sizes", "generate_anchors", "num_anchors_per_level",
           "assign_anchors", "assign_targets", "BACKGROUND", "IGNORE"]

BACKGROUND = -1
IGNORE = -2


class AnchorConfig(NamedTuple):
  """Anchor layout. ``anchor_scale * 2**level`` is the base size (paper: 4 * stride)."""
  min_level: int = 3
  max_level: int = 7
  num_scales: int = 3
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  anchor_scale: float = 4.0

  @property
  def num_anchors(self) -> int:
    return self.num_scales * len(self.aspect_ratios)


def feature_sizes(image_hw: tuple[int, int], levels: Sequence[int]) -> list[tuple[int, int]]:
  """Grid ``(ceil(H / 2**l), ceil(W / 2**l))`` of each level."""
  return [(-(-image_hw[0] // 2 ** l), -(-image_hw[1] // 2 ** l)) for l in levels]


def generate_anchors(image_hw: tuple[int, int], config: AnchorConfig = AnchorConfig()
                     ) -> np.ndarray:
  """All anchors of an image of size ``image_hw``: float32 ``[total, 4]`` (y1, x1, y2, x2).

  ``total = sum_l A * ceil(H / 2**l) * ceil(W / 2**l)`` with ``A = config.num_anchors``.
  A NumPy constant (computed once on the host, then closed over by jitted code).
  """
  levels = range(config.min_level, config.max_level + 1)
  out = []
  for l, (gh, gw) in zip(levels, feature_sizes(image_hw, levels)):
    stride = 2.0 ** l
    shapes = []
    for k in range(config.num_scales):
      size = config.anchor_scale * stride * 2.0 ** (k / config.num_scales)
      for r in config.aspect_ratios:
        shapes.append((size * math.sqrt(r), size / math.sqrt(r)))
    hw = np.asarray(shapes)  # [A, 2]
    cy = (np.arange(gh) + 0.5) * stride
    cx = (np.arange(gw) + 0.5) * stride
    cy, cx = np.meshgrid(cy, cx, indexing="ij")
    c = np.stack([cy, cx], -1)[:, :, None, :]  # [gh, gw, 1, 2]
    boxes = np.concatenate([c - hw / 2, c + hw / 2], axis=-1)  # [gh, gw, A, 4]
    out.append(boxes.reshape(-1, 4))
  return np.concatenate(out).astype(np.float32)


def num_anchors_per_level(image_hw, config: AnchorConfig = AnchorConfig()) -> list[int]:
  levels = range(config.min_level, config.max_level + 1)
  return [gh * gw * config.num_anchors for gh, gw in feature_sizes(image_hw, levels)]


def assign_anchors(anchors, gt_boxes, gt_classes, *, pos_iou: float = 0.5,
                   neg_iou: float = 0.4, force_best: bool = True):
  """Matches anchors to the ground truth of ONE image.

  Args:
    anchors: ``[A, 4]``. gt_boxes: ``[G, 4]``. gt_classes: ``[G]`` int, -1 = padding.
    pos_iou, neg_iou: thresholds (positive ``>= pos_iou``, background ``< neg_iou``).
    force_best: each real ground truth's highest-IoU anchor(s) become positive for it
      (ties: every anchor reaching that IoU, as Detectron's ``allow_low_quality_matches``).

  Returns:
    ``(labels [A] int32, matched [A] int32)``: ``labels`` is the matched class for
    positives, :data:`BACKGROUND` (-1) or :data:`IGNORE` (-2); ``matched`` the index of the
    matched ground truth (meaningful for positives).
  """
  real = gt_classes >= 0
  iou = iou_matrix(anchors, gt_boxes)  # [A, G]
  iou = jnp.where(real[None, :], iou, -1.0)
  best_gt = jnp.argmax(iou, axis=1)
  best_iou = jnp.max(iou, axis=1)
  labels = jnp.where(best_iou >= pos_iou, gt_classes[best_gt], IGNORE)
  labels = jnp.where(best_iou < neg_iou, BACKGROUND, labels)
  if force_best:
    gt_best = jnp.max(iou, axis=0)  # [G]
    # An anchor is some GT's best if it reaches that GT's max IoU (> 0: a GT overlapping no
    # anchor stays unmatched). Among several such GTs take the highest-IoU one.
    is_best = (iou >= gt_best[None, :]) & real[None, :] & (gt_best[None, :] > 0)
    forced = jnp.any(is_best, axis=1)
    forced_gt = jnp.argmax(jnp.where(is_best, iou, -1.0), axis=1)
    best_gt = jnp.where(forced, forced_gt, best_gt)
    labels = jnp.where(forced, gt_classes[best_gt], labels)
  return labels.astype(jnp.int32), best_gt.astype(jnp.int32)


def assign_targets(anchors, gt_boxes, gt_classes, *, pos_iou: float = 0.5,
                   neg_iou: float = 0.4, force_best: bool = True, weights=BOX_WEIGHTS):
  """Classification and regression targets for a BATCH (``vmap`` of :func:`assign_anchors`).

  Args:
    anchors: ``[A, 4]``. gt_boxes: ``[N, G, 4]``. gt_classes: ``[N, G]`` (-1 padding).

  Returns:
    ``(labels [N, A] int32, box_targets [N, A, 4])``: labels as :func:`assign_anchors`,
    ``box_targets = encode_boxes(matched gt box, anchor)`` (zero where not positive).
  """
  def one(boxes, classes):
    labels, matched = assign_anchors(anchors, boxes, classes, pos_iou=pos_iou,
                                     neg_iou=neg_iou, force_best=force_best)
    t = encode_boxes(boxes[matched], anchors, weights)
    return labels, jnp.where((labels >= 0)[:, None], t, 0.0)
  return jax.vmap(one)(gt_boxes, gt_classes)
