"""RetinaNet losses: sigmoid focal loss, smooth-L1 (and GIoU) on positive anchors.

Focal loss (Lin et al. 2017, eq. 5), per anchor and class, with ``p = sigmoid(z)``,
``t`` in {0, 1} and ``p_t = p if t else 1 - p``::

    FL = -alpha_t (1 - p_t)^gamma log(p_t),   alpha_t = alpha if t else 1 - alpha

summed over all non-ignored anchors and classes and divided by the number of positive
anchors (the paper: "normalized by the number of anchors assigned to a ground-truth box").
Box loss: smooth-L1 of the encoded deltas on positive anchors, summed over the 4 coordinates,
divided by the same count::

    smooth_l1(d) = 0.5 d^2 / beta  if |d| < beta  else  |d| - 0.5 beta
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from amq_jax.detection._anchors import assign_targets
from amq_jax.detection._boxes import BOX_WEIGHTS, box_area, decode_boxes

__all__ = ["sigmoid_focal_loss", "smooth_l1", "giou_loss", "detection_loss",
           "per_example_detection_loss"]


def sigmoid_focal_loss(logits, targets, *, alpha: float = 0.25, gamma: float = 2.0):
  """Element-wise focal loss of ``logits`` against 0/1 ``targets`` (same shape).

  Uses ``log(p_t) = -softplus(-z)`` for ``t = 1`` and ``-softplus(z)`` for ``t = 0`` (the
  numerically stable binary cross-entropy). ``alpha < 0`` disables the alpha weighting.
  """
  z = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  ce = t * jax.nn.softplus(-z) + (1 - t) * jax.nn.softplus(z)  # -log(p_t)
  p = jax.nn.sigmoid(z)
  p_t = t * p + (1 - t) * (1 - p)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = loss * (t * alpha + (1 - t) * (1 - alpha))
  return loss


def smooth_l1(x, *, beta: float = 0.1):
  """Huber-like: quadratic ``0.5 x^2 / beta`` below ``beta``, linear above (beta=0: L1)."""
  ax = jnp.abs(x)
  if beta <= 0:
    return ax
  return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def giou_loss(pred, target, eps: float = 1e-7):
  """``1 - GIoU`` of matching boxes ``[..., 4]`` (Rezatofighi et al. 2019).

  ``GIoU = IoU - |C - (A ∪ B)| / |C|``, ``C`` the smallest box enclosing both.
  """
  tl = jnp.maximum(pred[..., :2], target[..., :2])
  br = jnp.minimum(pred[..., 2:], target[..., 2:])
  inter = jnp.prod(jnp.maximum(br - tl, 0), -1)
  union = box_area(pred) + box_area(target) - inter
  iou = inter / (union + eps)
  ctl = jnp.minimum(pred[..., :2], target[..., :2])
  cbr = jnp.maximum(pred[..., 2:], target[..., 2:])
  hull = jnp.prod(jnp.maximum(cbr - ctl, 0), -1)
  return 1 - (iou - (hull - union) / (hull + eps))


def _per_image_terms(outputs, gt_boxes, gt_classes, anchors, *, alpha, gamma, beta,
                     box_loss, box_weight, pos_iou, neg_iou, weights):
  """Per-image (cls loss sum, box loss sum, positives) ``[N]`` each."""
  cls_logits, deltas = outputs["cls_logits"], outputs["box_deltas"]
  num_classes = cls_logits.shape[-1]
  labels, box_t = assign_targets(anchors, gt_boxes, gt_classes, pos_iou=pos_iou,
                                 neg_iou=neg_iou, weights=weights)
  pos = labels >= 0
  valid = labels != -2  # not ignored
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # background -> zeros
  fl = sigmoid_focal_loss(cls_logits, onehot, alpha=alpha, gamma=gamma)
  cls = jnp.sum(fl * valid[..., None], axis=(1, 2))
  d = deltas.astype(jnp.float32)
  if box_loss == "smooth_l1":
    bl = jnp.sum(smooth_l1(d - box_t, beta=beta), -1)
  elif box_loss == "giou":
    a = jnp.asarray(anchors)
    bl = giou_loss(decode_boxes(d, a, weights), decode_boxes(box_t, a, weights))
  else:
    raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', got {box_loss!r}")
  box = box_weight * jnp.sum(bl * pos, axis=1)
  return cls, box, jnp.sum(pos, axis=1).astype(jnp.float32)


def detection_loss(outputs, gt_boxes, gt_classes, anchors, *, alpha: float = 0.25,
                   gamma: float = 2.0, beta: float = 0.1, box_loss: str = "smooth_l1",
                   box_weight: float = 1.0, pos_iou: float = 0.5, neg_iou: float = 0.4,
                   weights=BOX_WEIGHTS):
  """RetinaNet loss of a batch: ``(total, {'cls', 'box', 'num_pos'})``.

  Args:
    outputs: the model's ``{'cls_logits' [N, A, C], 'box_deltas' [N, A, 4]}``.
    gt_boxes: ``[N, G, 4]`` (y1, x1, y2, x2) pixels; gt_classes: ``[N, G]`` (-1 = padding).
    anchors: ``[A, 4]`` from :func:`generate_anchors` for this image size.
    alpha, gamma: focal loss. beta: smooth-L1 threshold (0.1 as torchvision's RetinaNet
      with its 1.0 weights; Detectron uses 0.11 ~ 1/9). box_loss: ``'smooth_l1'`` or
      ``'giou'``. box_weight: multiplier of the box term. pos_iou, neg_iou: matching.

  Both terms are divided by ``max(1, positives in the batch)``.
  """
  cls, box, npos = _per_image_terms(outputs, gt_boxes, gt_classes, anchors, alpha=alpha,
                                    gamma=gamma, beta=beta, box_loss=box_loss,
                                    box_weight=box_weight, pos_iou=pos_iou,
                                    neg_iou=neg_iou, weights=weights)
  norm = jnp.maximum(jnp.sum(npos), 1.0)
  c, b = jnp.sum(cls) / norm, jnp.sum(box) / norm
  return c + b, {"cls": c, "box": b, "num_pos": jnp.sum(npos)}


def per_example_detection_loss(outputs, gt_boxes, gt_classes, anchors, **kw):
  """``[N]`` losses, each image normalized by its own positives (for per-example Hessians)."""
  cls, box, npos = _per_image_terms(outputs, gt_boxes, gt_classes, anchors, **{
      "alpha": 0.25, "gamma": 2.0, "beta": 0.1, "box_loss": "smooth_l1", "box_weight": 1.0,
      "pos_iou": 0.5, "neg_iou": 0.4, "weights": BOX_WEIGHTS, **kw})
  return (cls + box) / jnp.maximum(npos, 1.0)
