"""COCO-style mAP with pycocotools, from in-memory arrays (no annotation files).

mAP@[.5:.95] is the average precision (101-point interpolated precision/recall curve)
averaged over IoU thresholds 0.50, 0.55, ..., 0.95 and over classes; mAP@.5 takes the 0.5
threshold only. Detections are matched to ground truth greedily by score per image and
class; the 100 highest-scoring detections per image count (``maxDets=100``).
Needs ``pycocotools`` (``pip install 'amq-jax[det]'``).
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np

__all__ = ["coco_evaluate", "COCO_METRICS"]

# Names of COCOeval.stats in order.
COCO_METRICS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
                "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def _import_coco():
  try:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
  except ImportError as e:
    raise ImportError("COCO evaluation needs pycocotools: `pip install 'amq-jax[det]'` "
                      f"(or `pip install pycocotools`). ({e})") from e
  return COCO, COCOeval


def _xywh(b):
  b = np.asarray(b, np.float64)
  return [float(b[1]), float(b[0]), float(b[3] - b[1]), float(b[2] - b[0])]


def coco_evaluate(gt_boxes, gt_classes, det_boxes, det_scores, det_classes, det_valid=None,
                  *, num_classes: int | None = None, max_dets: int = 100,
                  class_ids: Sequence[int] | None = None, verbose: bool = False) -> dict:
  """COCO metrics of detections against ground truth, both as padded arrays.

  Args:
    gt_boxes: ``[N, G, 4]`` (y1, x1, y2, x2) pixels; gt_classes: ``[N, G]`` (-1 = padding).
    det_boxes: ``[N, D, 4]``; det_scores: ``[N, D]``; det_classes: ``[N, D]``;
    det_valid: ``[N, D]`` bool (default: all valid). Lists of per-image arrays of different
      lengths work too.
    num_classes: classes are ``0..num_classes-1`` (default: those present in the GT);
      a class with no ground truth is left out of the mean (COCO's rule).
    class_ids: alternatively, the explicit list of category ids.
    max_dets: detections per image considered (COCO: 100).
    verbose: print pycocotools' summary table.

  Returns:
    ``{name: value}`` for :data:`COCO_METRICS` (``mAP`` = mAP@[.5:.95], ``mAP50``...);
    -1 where undefined (e.g. no ground truth of a size range), as pycocotools.
  """
  COCO, COCOeval = _import_coco()
  n = len(gt_boxes)
  images, anns, dets = [], [], []
  seen = set()
  for i in range(n):
    gb, gc = np.asarray(gt_boxes[i]), np.asarray(gt_classes[i])
    images.append({"id": i + 1})
    for b, c in zip(gb, gc):
      if c < 0:
        continue
      xywh = _xywh(b)
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                   "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
      seen.add(int(c))
    db, ds, dc = (np.asarray(det_boxes[i]), np.asarray(det_scores[i]),
                  np.asarray(det_classes[i]))
    dv = np.ones(len(ds), bool) if det_valid is None else np.asarray(det_valid[i], bool)
    for b, s, c, v in zip(db, ds, dc, dv):
      if v:
        dets.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": _xywh(b),
                     "score": float(s)})
  if class_ids is None:
    class_ids = range(num_classes) if num_classes is not None else sorted(seen)
  cats = [{"id": int(c) + 1, "name": str(c)} for c in class_ids]
  if not anns:
    raise ValueError("coco_evaluate: no ground-truth boxes (every class is -1)")
  if not dets:  # pycocotools cannot load an empty result list; the answer is known
    return {k: 0.0 for k in COCO_METRICS}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    gt.createIndex()
    dt = gt.loadRes(dets)
    ev = COCOeval(gt, dt, iouType="bbox")
    ev.params.maxDets = [1, 10, max_dets]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  if verbose:
    print(out.getvalue())
  return {k: float(v) for k, v in zip(COCO_METRICS, ev.stats)}
