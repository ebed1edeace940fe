"""Box geometry in jnp: IoU matrices and the (dy, dx, dh, dw) box coding of R-CNN.

Boxes are ``(y1, x1, y2, x2)`` in pixels (the layout TFDS uses, un-normalized), with
``y2 >= y1`` and ``x2 >= x1``; area ``(y2 - y1) * (x2 - x1)`` (continuous coordinates, no
``+1``). Padding boxes are all zeros (area 0) and are never matched.
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["box_area", "iou_matrix", "encode_boxes", "decode_boxes", "clip_boxes",
           "yxyx_to_xywh", "BOX_WEIGHTS", "BBOX_CLIP"]

# Standard weights (wy, wx, wh, ww): Detectron / torchvision RetinaNet use 1 for all; Faster
# R-CNN's second stage uses (10, 10, 5, 5).
BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# Largest log-scale change decoded: log(1000 / 16), as Detectron, so exp() cannot overflow.
BBOX_CLIP = 4.135166556742356


def box_area(boxes):
  """``[..., 4]`` -> ``[...]`` area (0 for degenerate boxes)."""
  return jnp.maximum(boxes[..., 2] - boxes[..., 0], 0) * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)


def iou_matrix(a, b):
  """Intersection over union of every pair: ``[M, 4], [K, 4] -> [M, K]``.

  ``IoU = |a ∩ b| / (|a| + |b| - |a ∩ b|)``; 0 where the union is 0 (two empty boxes).
  """
  tl = jnp.maximum(a[:, None, :2], b[None, :, :2])
  br = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = jnp.prod(jnp.maximum(br - tl, 0), axis=-1)
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def _center_size(boxes):
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w


def encode_boxes(boxes, anchors, weights=BOX_WEIGHTS):
  """Regression targets of ``boxes`` relative to ``anchors`` (broadcasting ``[..., 4]``).

  With centers ``(y, x)`` and sizes ``(h, w)``::

      dy = wy (y - y_a) / h_a     dx = wx (x - x_a) / w_a
      dh = wh log(h / h_a)        dw = ww log(w / w_a)

  Degenerate (padding) boxes get sizes clamped to a tiny positive value so the result stays
  finite; their targets are never used.
  """
  ya, xa, ha, wa = _center_size(anchors)
  y, x, h, w = _center_size(boxes)
  h, w = jnp.maximum(h, 1e-6), jnp.maximum(w, 1e-6)
  wy, wx, wh, ww = weights
  return jnp.stack([wy * (y - ya) / ha, wx * (x - xa) / wa,
                    wh * jnp.log(h / ha), ww * jnp.log(w / wa)], axis=-1)


def decode_boxes(deltas, anchors, weights=BOX_WEIGHTS):
  """Inverse of :func:`encode_boxes`: ``(deltas, anchors) -> boxes`` (log sizes clipped)."""
  ya, xa, ha, wa = _center_size(anchors)
  wy, wx, wh, ww = weights
  dy, dx = deltas[..., 0] / wy, deltas[..., 1] / wx
  dh = jnp.minimum(deltas[..., 2] / wh, BBOX_CLIP)
  dw = jnp.minimum(deltas[..., 3] / ww, BBOX_CLIP)
  y, x = ya + dy * ha, xa + dx * wa
  h, w = ha * jnp.exp(dh), wa * jnp.exp(dw)
  return jnp.stack([y - 0.5 * h, x - 0.5 * w, y + 0.5 * h, x + 0.5 * w], axis=-1)


def clip_boxes(boxes, height, width):
  """Clips ``[..., 4]`` boxes to the image ``[0, height] x [0, width]``."""
  hi = jnp.asarray([height, width, height, width], boxes.dtype)
  return jnp.clip(boxes, 0, hi)


def yxyx_to_xywh(boxes):
  """``(y1, x1, y2, x2)`` -> COCO's ``(x, y, width, height)``."""
  return jnp.stack([boxes[..., 1], boxes[..., 0], boxes[..., 3] - boxes[..., 1],
                    boxes[..., 2] - boxes[..., 0]], axis=-1)
