"""Non-maximum suppression and detector post-processing with fixed-size outputs (jittable).

Greedy NMS: visit boxes by decreasing score; keep a box unless it overlaps an already KEPT
box with IoU > ``iou_threshold``. On ``K`` candidates this is a ``lax.fori_loop`` of ``K``
vector steps over a precomputed ``[K, K]`` IoU matrix (``O(K^2)`` memory, fine for the
usual ``K = 1000``). Per-class NMS is the same on boxes shifted by ``class * offset``
(``offset`` larger than any coordinate), so boxes of different classes never overlap.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from amq_jax.detection._boxes import BOX_WEIGHTS, clip_boxes, decode_boxes, iou_matrix

__all__ = ["nms", "postprocess", "batched_postprocess"]


def nms(boxes, scores, *, iou_threshold: float = 0.5, max_detections: int = 100,
        score_threshold: float = -jnp.inf, classes=None):
  """Greedy NMS over ``[K, 4]`` boxes and ``[K]`` scores with a fixed-size result.

  Args:
    boxes, scores: candidates (any order). iou_threshold: suppress IoU strictly above.
    max_detections: output size ``D``. score_threshold: candidates at or below are dropped.
    classes: optional ``[K]`` ints: suppression only within a class (offset trick).

  Returns:
    ``(indices [D] int32, valid [D] bool)``: indices into the candidates of the kept boxes
    by decreasing score; entries past the number kept have ``valid = False`` (index 0).
  """
  k = boxes.shape[0]
  order = jnp.argsort(-scores, stable=True)
  b = boxes[order]
  alive = scores[order] > score_threshold
  if classes is not None:
    offset = jnp.max(jnp.abs(boxes)) + 1.0
    b = b + (classes[order].astype(b.dtype) * offset)[:, None]
  over = iou_matrix(b, b) > iou_threshold  # [K, K]

  def body(i, keep):
    suppressed = jnp.any(over[i] & keep & (jnp.arange(k) < i))
    return keep.at[i].set(alive[i] & ~suppressed)

  keep = jax.lax.fori_loop(0, k, body, jnp.zeros((k,), bool))
  # Kept positions first (in score order), then the rest.
  rank = jnp.where(keep, jnp.arange(k), k + jnp.arange(k))
  first = jnp.argsort(rank)[:max_detections]
  if max_detections > k:
    first = jnp.concatenate([first, jnp.zeros((max_detections - k,), first.dtype)])
  valid = jnp.arange(max_detections) < jnp.sum(keep)
  return jnp.where(valid, order[first], 0).astype(jnp.int32), valid


def postprocess(cls_logits, box_deltas, anchors, *, image_hw=None,
                score_threshold: float = 0.05, pre_nms_topk: int = 1000,
                iou_threshold: float = 0.5, max_detections: int = 100,
                class_agnostic: bool = False, weights=BOX_WEIGHTS):
  """Detections of ONE image from the raw head outputs.

  Takes the ``pre_nms_topk`` highest (anchor, class) sigmoid scores, decodes their boxes,
  clips them to the image, runs NMS (per class unless ``class_agnostic``).

  Args:
    cls_logits: ``[A, C]``. box_deltas: ``[A, 4]``. anchors: ``[A, 4]``.
    image_hw: ``(H, W)`` for clipping (None: no clipping).

  Returns:
    ``dict(boxes [D, 4], scores [D], classes [D] int32, valid [D] bool)``, ``D =
    max_detections``, by decreasing score; invalid rows are zeros.
  """
  num_a, num_c = cls_logits.shape
  flat = jax.nn.sigmoid(cls_logits.astype(jnp.float32)).reshape(-1)
  k = min(pre_nms_topk, flat.shape[0])
  top_scores, top_idx = jax.lax.top_k(flat, k)
  anchor_idx, cls = top_idx // num_c, top_idx % num_c
  boxes = decode_boxes(box_deltas[anchor_idx].astype(jnp.float32),
                       jnp.asarray(anchors)[anchor_idx], weights)
  if image_hw is not None:
    boxes = clip_boxes(boxes, *image_hw)
  keep, valid = nms(boxes, top_scores, iou_threshold=iou_threshold,
                    max_detections=max_detections, score_threshold=score_threshold,
                    classes=None if class_agnostic else cls)
  m = valid.astype(jnp.float32)
  return {"boxes": boxes[keep] * m[:, None], "scores": top_scores[keep] * m,
          "classes": jnp.where(valid, cls[keep], 0).astype(jnp.int32), "valid": valid}


def batched_postprocess(outputs, anchors, **kw):
  """:func:`postprocess` over a batch of model outputs (``vmap``): arrays ``[N, D, ...]``."""
  return jax.vmap(lambda c, b: postprocess(c, b, anchors, **kw))(
      outputs["cls_logits"], outputs["box_deltas"])
