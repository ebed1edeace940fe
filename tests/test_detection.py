"""RetinaNet building blocks against hand computations and NumPy references."""
from __future__ import annotations

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from amq_jax import detection, models, quant
from amq_jax.data import fashion_mnist
from amq_jax.train import create_state, data_mesh

pytest.importorskip("pycocotools")

ANCHORS_TINY = detection.AnchorConfig(3, 5, anchor_scale=3.0)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def det_data():
  train = detection.make_detection_set("train", 64, seed=0)
  test = detection.make_detection_set("test", 16, seed=0)
  return train, test


@pytest.fixture(scope="module")
def tiny():
  model = models.get_model("retinanet_tiny")
  x = jnp.zeros((1,) + models.default_input_shape("retinanet_tiny"))
  # 'rbg' keys: init compiles ~3x faster than with threefry on CPU.
  variables = jax.jit(lambda k: model.init(k, x))(jax.random.key(0, impl="rbg"))
  return model, variables


# ------------------------------------------------------------------------------ anchors, boxes

def test_anchor_layout_matches_model_outputs(tiny):
  model, v = tiny
  a = detection.generate_anchors((96, 96), ANCHORS_TINY)
  assert a.shape == (9 * (12 * 12 + 6 * 6 + 3 * 3), 4)
  assert detection.num_anchors_per_level((96, 96), ANCHORS_TINY) == [1296, 324, 81]
  # First anchor: level 3 (stride 8), cell (0, 0), scale 2^0, ratio h/w = 0.5.
  size = 3.0 * 8
  h, w = size * math.sqrt(0.5), size / math.sqrt(0.5)
  np.testing.assert_allclose(a[0], [4 - h / 2, 4 - w / 2, 4 + h / 2, 4 + w / 2], rtol=1e-6)
  # Anchor 9 * 13 + 4: level 3, cell (1, 1), scale 2^(1/3), ratio 1 (square).
  s = size * 2 ** (1 / 3)
  np.testing.assert_allclose(a[9 * 13 + 4], [12 - s / 2, 12 - s / 2, 12 + s / 2, 12 + s / 2],
                             rtol=1e-6)
  # First anchor of level 5 (stride 32) at cell (0, 0), ratio 0.5, scale 1.
  s5 = 3.0 * 32
  np.testing.assert_allclose(a[1296 + 324][[0, 2]], [16 - s5 * math.sqrt(0.5) / 2,
                                                     16 + s5 * math.sqrt(0.5) / 2], rtol=1e-6)
  out = jax.eval_shape(model.apply, v, jnp.zeros((2, 96, 96, 1)))
  assert out["cls_logits"].shape == (2, len(a), 10)
  assert out["box_deltas"].shape == (2, len(a), 4)
  # Odd sizes: ceil(H / stride) cells, as the network's stride-2 convolutions.
  odd = detection.generate_anchors((100, 70), ANCHORS_TINY)
  out = jax.eval_shape(model.apply, v, jnp.zeros((1, 100, 70, 1)))
  assert out["cls_logits"].shape[1] == len(odd) == 9 * (13 * 9 + 7 * 5 + 4 * 3)


def test_iou_and_box_coding_round_trip(rng):
  a = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 0, 0]], np.float32)
  b = np.array([[0, 0, 10, 10], [0, 5, 10, 15], [20, 20, 30, 40]], np.float32)
  iou = np.asarray(detection.iou_matrix(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(iou, [[1, 50 / 150, 0], [25 / 175, 50 / 150, 0], [0, 0, 0]],
                             rtol=1e-6)
  anchors = detection.generate_anchors((64, 64), detection.AnchorConfig(3, 5))
  c = rng.uniform(0, 64, (len(anchors), 2))
  hw = rng.uniform(4, 60, (len(anchors), 2))
  boxes = np.concatenate([c - hw / 2, c + hw / 2], -1).astype(np.float32)
  d = detection.encode_boxes(jnp.asarray(boxes), jnp.asarray(anchors))
  back = detection.decode_boxes(d, jnp.asarray(anchors))
  np.testing.assert_allclose(back, boxes, atol=2e-4)
  # A box equal to its anchor encodes to zeros; a doubled height to dh = log 2.
  z = detection.encode_boxes(jnp.asarray(anchors[:1]), jnp.asarray(anchors[:1]))
  np.testing.assert_allclose(z, 0, atol=1e-6)
  big = anchors[:1].copy()
  ctr = (big[0, 0] + big[0, 2]) / 2
  big[0, [0, 2]] = ctr + 2 * (big[0, [0, 2]] - ctr)
  np.testing.assert_allclose(detection.encode_boxes(jnp.asarray(big), jnp.asarray(anchors[:1])),
                             [[0, 0, math.log(2), 0]], atol=1e-6)


def test_matching_hand_case():
  gt = np.array([[0, 0, 10, 10], [50, 50, 60, 80], [0, 0, 0, 0]], np.float32)
  cls = np.array([3, 7, -1], np.int32)
  anchors = np.array([
      [0, 0, 10, 12],     # IoU 100/120 = 0.83 with gt0 -> positive (class 3)
      [0, 0, 10, 20],     # IoU 0.5 exactly with gt0 -> positive
      [0, 0, 10, 22.5],   # IoU 100/225 = 0.444 -> ignored
      [0, 2, 10, 12],     # IoU 80/120 = 0.667 -> positive
      [0, 6, 10, 16],     # IoU 40/160 = 0.25 -> background
      [50, 50, 60, 56],   # gt1's best anchor: IoU 60/300 = 0.2 -> forced positive (class 7)
      [100, 100, 110, 110],  # overlaps nothing -> background
  ], np.float32)
  labels, matched = detection.assign_anchors(jnp.asarray(anchors), jnp.asarray(gt),
                                             jnp.asarray(cls))
  np.testing.assert_array_equal(labels, [3, 3, detection.IGNORE, 3, detection.BACKGROUND, 7,
                                         detection.BACKGROUND])
  assert int(matched[5]) == 1 and int(matched[0]) == 0
  labels, _ = detection.assign_anchors(jnp.asarray(anchors), jnp.asarray(gt), jnp.asarray(cls),
                                       force_best=False)
  assert int(labels[5]) == detection.BACKGROUND
  # An image without objects: every anchor is background; targets are zero.
  lab, t = detection.assign_targets(jnp.asarray(anchors), jnp.zeros((1, 3, 4)),
                                    -jnp.ones((1, 3), jnp.int32))
  assert np.all(np.asarray(lab) == detection.BACKGROUND) and not np.any(np.asarray(t))


# ------------------------------------------------------------------------------ losses

def test_focal_and_smooth_l1_by_hand():
  z = np.array([2.0, -1.0, 0.3, -4.0], np.float32)
  t = np.array([1, 0, 0, 1], np.float32)
  got = np.asarray(detection.sigmoid_focal_loss(jnp.asarray(z), jnp.asarray(t)))
  want = []
  for zi, ti in zip(z, t):
    p = 1 / (1 + math.exp(-zi))
    pt = p if ti else 1 - p
    want.append(-(0.25 if ti else 0.75) * (1 - pt) ** 2 * math.log(pt))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # gamma=0, alpha<0: plain binary cross-entropy.
  bce = np.asarray(detection.sigmoid_focal_loss(jnp.asarray(z), jnp.asarray(t), alpha=-1,
                                                gamma=0.0))
  np.testing.assert_allclose(bce, [math.log1p(math.exp(-2)), math.log1p(math.exp(-1)),
                                   math.log1p(math.exp(0.3)), math.log1p(math.exp(4))],
                             rtol=1e-5)
  x = jnp.array([0.05, -0.2, 1.0])
  np.testing.assert_allclose(detection.smooth_l1(x, beta=0.1),
                             [0.5 * 0.05 ** 2 / 0.1, 0.2 - 0.05, 1.0 - 0.05], rtol=1e-6)
  # GIoU of identical boxes is 1 (loss 0); disjoint boxes score below 0 (loss > 1).
  b = jnp.array([[0.0, 0, 2, 2]])
  np.testing.assert_allclose(detection.giou_loss(b, b), [0], atol=1e-6)
  np.testing.assert_allclose(detection.giou_loss(b, b + 3), [1 + (25 - 8) / 25], rtol=1e-5)


def test_detection_loss_normalization(rng):
  anchors = detection.generate_anchors((32, 32), detection.AnchorConfig(3, 5, anchor_scale=2.0))
  gt = np.zeros((2, 3, 4), np.float32)
  gt[0, 0] = [2, 2, 14, 18]
  gt[0, 1] = [16, 10, 30, 24]
  gt[1, 0] = [0, 0, 31, 31]
  cls = np.array([[1, 4, -1], [2, -1, -1]], np.int32)
  out = {"cls_logits": jnp.asarray(rng.normal(size=(2, len(anchors), 5)), jnp.float32),
         "box_deltas": jnp.asarray(rng.normal(size=(2, len(anchors), 4)) * 0.3, jnp.float32)}
  total, parts = detection.detection_loss(out, jnp.asarray(gt), jnp.asarray(cls),
                                          jnp.asarray(anchors))
  labels, t = detection.assign_targets(jnp.asarray(anchors), jnp.asarray(gt), jnp.asarray(cls))
  labels, t = np.asarray(labels), np.asarray(t)
  z = np.asarray(out["cls_logits"], np.float64)
  p = 1 / (1 + np.exp(-z))
  onehot = (labels[..., None] == np.arange(5)).astype(np.float64)
  pt = np.where(onehot == 1, p, 1 - p)
  fl = -np.where(onehot == 1, 0.25, 0.75) * (1 - pt) ** 2 * np.log(pt)
  npos = (labels >= 0).sum()
  cls_want = (fl * (labels != detection.IGNORE)[..., None]).sum() / npos
  d = np.abs(np.asarray(out["box_deltas"]) - t)
  sl1 = np.where(d < 0.1, 0.5 * d * d / 0.1, d - 0.05).sum(-1)
  box_want = (sl1 * (labels >= 0)).sum() / npos
  assert npos == float(parts["num_pos"]) > 3
  np.testing.assert_allclose(float(parts["cls"]), cls_want, rtol=1e-4)
  np.testing.assert_allclose(float(parts["box"]), box_want, rtol=1e-4)
  np.testing.assert_allclose(float(total), cls_want + box_want, rtol=1e-4)


# ------------------------------------------------------------------------------ NMS

def _nms_numpy(boxes, scores, thr, classes=None):
  """Reference greedy NMS: indices kept, by decreasing score."""
  order = np.argsort(-scores, kind="stable")
  keep = []
  for i in order:
    ok = True
    for j in keep:
      if classes is not None and classes[i] != classes[j]:
        continue
      tl = np.maximum(boxes[i, :2], boxes[j, :2])
      br = np.minimum(boxes[i, 2:], boxes[j, 2:])
      inter = np.prod(np.maximum(br - tl, 0))
      area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
      if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thr:
        ok = False
        break
    if ok:
      keep.append(int(i))
  return keep


@pytest.mark.parametrize("per_class", [False, True])
def test_nms_matches_numpy_reference(rng, per_class):
  n = 300
  c = rng.uniform(0, 100, (n, 2))
  hw = rng.uniform(5, 30, (n, 2))
  boxes = np.concatenate([c - hw / 2, c + hw / 2], -1).astype(np.float32)
  scores = rng.permutation(n).astype(np.float32) / n  # distinct
  classes = rng.integers(0, 3, n) if per_class else None
  want = _nms_numpy(boxes, scores, 0.5, classes)
  fn = jax.jit(lambda b, s, k: detection.nms(b, s, iou_threshold=0.5, max_detections=n,
                                             classes=k if per_class else None))
  idx, valid = fn(jnp.asarray(boxes), jnp.asarray(scores),
                  jnp.asarray(classes if per_class else np.zeros(n, np.int32)))
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert valid.sum() == len(want) and valid[:len(want)].all()
  np.testing.assert_array_equal(idx[:len(want)], want)
  # Fixed-size truncation and the score threshold.
  idx5, valid5 = detection.nms(jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=0.5,
                               max_detections=5, score_threshold=float(scores[want[3]]),
                               classes=None if classes is None else jnp.asarray(classes))
  assert np.asarray(valid5).sum() == 3
  np.testing.assert_array_equal(np.asarray(idx5)[:3], want[:3])


def test_postprocess_recovers_encoded_boxes():
  anchors = detection.generate_anchors((64, 64), detection.AnchorConfig(3, 5))
  gt = np.array([[8, 8, 30, 40], [35, 20, 60, 50]], np.float32)
  labels, matched = detection.assign_anchors(jnp.asarray(anchors), jnp.asarray(gt),
                                             jnp.array([2, 0]))
  labels = np.asarray(labels)
  deltas = detection.encode_boxes(jnp.asarray(gt)[matched], jnp.asarray(anchors))
  logits = np.full((len(anchors), 3), -8.0, np.float32)
  pos = np.flatnonzero(labels >= 0)
  logits[pos, labels[pos]] = np.linspace(3, 1, len(pos))  # positives score high
  det = jax.jit(lambda c, d: detection.postprocess(c, d, anchors, image_hw=(64, 64),
                                                   max_detections=10))(logits, deltas)
  assert int(det["valid"].sum()) == 2  # every positive decodes to one of 2 boxes
  got = {int(c): np.asarray(b) for b, c, v in zip(det["boxes"], det["classes"], det["valid"])
         if v}
  np.testing.assert_allclose(got[2], gt[0], atol=1e-3)
  np.testing.assert_allclose(got[0], gt[1], atol=1e-3)
  assert not np.any(np.asarray(det["boxes"])[2:])


# ------------------------------------------------------------------------------ COCO mAP

def test_coco_map_known_answers():
  gtb = np.array([[[10, 10, 50, 50], [60, 60, 90, 90]], [[5, 5, 40, 30], [0, 0, 0, 0]]], float)
  gtc = np.array([[0, 1], [1, -1]])
  scores = np.array([[0.9, 0.8], [0.7, 0.1]])
  perfect = detection.coco_evaluate(gtb, gtc, gtb, scores, np.maximum(gtc, 0), gtc >= 0)
  assert perfect["mAP"] == pytest.approx(1.0) and perfect["mAP50"] == pytest.approx(1.0)
  # Class 0 perfect; class 1 finds one of its two boxes (the other detection is misplaced):
  # precision 1 up to recall 1/2 -> 51 of COCO's 101 recall points -> AP = 51/101.
  db = gtb.copy()
  db[1, 0] = [60, 60, 90, 90]
  half = detection.coco_evaluate(gtb, gtc, db, scores, np.maximum(gtc, 0), gtc >= 0)
  assert half["mAP"] == pytest.approx((1 + 51 / 101) / 2)
  assert half["mAP50"] == pytest.approx((1 + 51 / 101) / 2)
  # A box widened to IoU 0.62 counts at thresholds 0.50, 0.55, 0.60 (3 of 10) only.
  shifted = gtb.copy()
  shifted[0, 0] = [10, 10, 50, 10 + 40 / 0.62]  # IoU = 40*40 / (40 * 40/0.62) = 0.62
  res = detection.coco_evaluate(gtb[:1, :1], gtc[:1, :1], shifted[:1, :1], scores[:1, :1],
                                [[0]], [[True]])
  assert res["mAP50"] == pytest.approx(1.0) and res["mAP"] == pytest.approx(0.3)
  none = detection.coco_evaluate(gtb, gtc, db, scores, gtc, np.zeros_like(gtc, bool))
  assert none["mAP"] == 0.0


# ------------------------------------------------------------------------------ data

def test_detection_set_is_deterministic_and_boxes_tight(det_data):
  train, _ = det_data
  again = detection.make_detection_set("train", 64, seed=0)
  for a, b in zip(train, again):
    np.testing.assert_array_equal(a, b)
  other = detection.make_detection_set("train", 8, seed=1)
  assert not np.array_equal(other.images, train.images[:8])
  assert train.images.shape == (64, 96, 96, 1) and train.boxes.shape == (64, 8, 4)
  n = (train.classes >= 0).sum(1)
  assert n.min() >= 1 and n.max() <= 4 and len(set(n.tolist())) > 1
  assert train.classes.max() <= 9
  # Pixels above 0.05 (before standardization) define the tight boxes; margins for rounding.
  thr = (0.049 - fashion_mnist.MEAN) / fashion_mnist.STD
  thr_out = (0.051 - fashion_mnist.MEAN) / fashion_mnist.STD
  for img, boxes, cls in zip(train.images, train.boxes, train.classes):
    inside = np.zeros(img.shape[:2], bool)
    for b, c in zip(boxes, cls):
      if c < 0:
        assert not b.any()
        continue
      y1, x1, y2, x2 = b.astype(int)
      assert 0 <= y1 < y2 <= 96 and 0 <= x1 < x2 <= 96
      inside[y1:y2, x1:x2] = True
      patch = img[y1:y2, x1:x2, 0] > thr  # tight: every border row/column has object pixels
      assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
    assert not np.any(img[..., 0][~inside] > thr_out)  # nothing outside the boxes


def test_batches_flip_moves_boxes(det_data):
  train, _ = det_data
  plain = list(detection.detection_batches(train, 16, seed=3, epoch=1))
  flipped = list(detection.detection_batches(train, 16, seed=3, epoch=1, flip=True))
  assert len(plain) == 4
  thr = (0.049 - fashion_mnist.MEAN) / fashion_mnist.STD
  changed = 0
  for p, f in zip(plain, flipped):
    np.testing.assert_array_equal(p["classes"], f["classes"])
    for img, fimg, fb, c in zip(p["image"], f["image"], f["boxes"], f["classes"]):
      if not np.array_equal(img, fimg):
        changed += 1
        np.testing.assert_array_equal(fimg, img[:, ::-1])
      for b, k in zip(fb, c):
        if k >= 0:
          y1, x1, y2, x2 = b.astype(int)
          m = fimg[y1:y2, x1:x2, 0] > thr
          assert m[:, 0].any() and m[:, -1].any()
  assert 16 < changed < 48
  resumed = list(detection.detection_batches(train, 16, seed=3, epoch=1, flip=True, start=2))
  np.testing.assert_array_equal(resumed[0]["boxes"], flipped[2]["boxes"])


class _FakeCoco:
  """Random-access source with coco/2017's example layout (nested 'objects')."""

  def __init__(self, n):
    rng = np.random.default_rng(0)
    self.examples = []
    for i in range(n):
      h, w = (40, 80) if i % 2 else (60, 30)
      self.examples.append({
          "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
          "image/id": i,
          "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0],
                                        [0.5, 0.5, 0.9, 0.7]], np.float32)[: 1 + i % 3],
                      "label": np.array([5, 79, 0], np.int64)[: 1 + i % 3],
                      "is_crowd": np.array([False, True, False])[: 1 + i % 3]}})

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


def test_coco_reader_on_fake_source():
  src = _FakeCoco(5)
  ex = detection.coco_example(src[2], image_size=64, max_gt=4)
  assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.float32
  # 60x30 -> 64x32, placed top-left; the crowd box is dropped.
  assert not ex["image"][:, 32:].any() and ex["image"][:, :32].std() > 0.5
  np.testing.assert_allclose(ex["boxes"][:2], [[6.4, 6.4, 32, 19.2], [32, 16, 57.6, 22.4]],
                             rtol=1e-5)
  np.testing.assert_array_equal(ex["classes"], [5, 0, -1, -1])
  fl = detection.coco_example(src[2], image_size=64, max_gt=4, flip=True)
  np.testing.assert_allclose(fl["boxes"][0], [6.4, 64 - 19.2, 32, 64 - 6.4], rtol=1e-5)
  np.testing.assert_array_equal(fl["image"], ex["image"][:, ::-1])
  flat = {"image": src[1]["image"], "objects/bbox": src[1]["objects"]["bbox"],
          "objects/label": src[1]["objects"]["label"]}  # flat keys work too (no crowd info)
  np.testing.assert_array_equal(detection.coco_example(flat, image_size=32, max_gt=2)["classes"],
                                [5, 79])
  b = list(detection.coco_batches(src, 2, image_size=32, max_gt=3, train=True, seed=1))
  assert len(b) == 2 and b[0]["image"].shape == (2, 32, 32, 3)
  assert b[0]["boxes"].shape == (2, 3, 4) and b[0]["classes"].dtype == np.int32
  b2 = list(detection.coco_batches(src, 2, image_size=32, max_gt=3, train=True, seed=1))
  np.testing.assert_array_equal(b[1]["image"], b2[1]["image"])
  ev = list(detection.coco_batches(src, 2, image_size=32, max_gt=3, drop_remainder=False))
  assert [len(x["image"]) for x in ev] == [2, 2, 1]
  np.testing.assert_array_equal(ev[2]["classes"][0], [5, -1, -1])  # example 4: crowd dropped


# ------------------------------------------------------------------------------ model

def test_retinanet_structure_and_packed_heads(tiny):
  model, v = tiny
  p = v["params"]
  assert {"backbone", "fpn", "class_net", "box_net"} <= set(p)
  assert set(p["fpn"]) == {"lateral_c3", "lateral_c4", "lateral_c5", "output_p3", "output_p4",
                           "output_p5"}
  assert set(p["class_net"]) == {"conv0", "conv1", "out"}
  np.testing.assert_allclose(p["class_net"]["out"]["bias"], -math.log(0.99 / 0.01), rtol=1e-6)
  x = jax.random.normal(jax.random.key(1), (2, 96, 96, 1))
  packed = models.get_model("retinanet_tiny", head_mode="packed")
  f = jax.jit(lambda v, x: (model.apply(v, x), packed.apply(v, x)))
  a, b = f(v, x)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
  # Initial foreground probability ~0.01 everywhere.
  assert abs(float(jax.nn.sigmoid(a["cls_logits"]).mean()) - 0.01) < 0.005
  # Every head conv is called once per forward pass in packed mode.
  calls = {}

  def count(next_fun, args, kwargs, ctx):
    if ctx.method_name == "__call__":
      name = "/".join(ctx.module.path)
      if name.startswith(("class_net/", "box_net/")):
        calls[name] = calls.get(name, 0) + 1
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(count):
    jax.eval_shape(packed.apply, v, x)
  assert calls and set(calls.values()) == {1}
  # What an interceptor adds to a head conv's input on the canvas padding has no effect.
  def perturb(next_fun, args, kwargs, ctx):
    if ctx.method_name == "__call__" and "/".join(ctx.module.path) == "class_net/conv1":
      args = (args[0] + 100.0,) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(perturb):
    p_out = jax.jit(lambda v, x: packed.apply(v, x)["cls_logits"])(v, x)
    l_out = jax.jit(lambda v, x: model.apply(v, x)["cls_logits"])(v, x)
  np.testing.assert_allclose(p_out, l_out, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(p_out - a["cls_logits"]))) > 1e-3  # the perturbation acted
  # The head conv computes what nn.Conv computes with the same parameters.
  conv_p = {"params": v["params"]["class_net"]["conv0"]}
  f = jax.random.normal(jax.random.key(2), (1, 7, 5, 32))
  want = nn.Conv(32, (3, 3), padding=1).apply(conv_p, f)
  got = models.retinanet._MaskedConv(32, (3, 3), padding=1).apply(conv_p, f)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_retinanet50_parameter_count_matches_torchvision():
  # torchvision retinanet_resnet50_fpn (91 classes, P6 from P5): 34,014,999 parameters,
  # with FrozenBatchNorm (buffers); ours counts the backbone's 53,120 BN scales/biases.
  model = models.get_model("retinanet_resnet50", num_classes=91, p6_from="p5")
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert sum(x.size for x in jax.tree.leaves(v["params"])) == 34_014_999 + 53_120
  out = jax.eval_shape(model.apply, v, jnp.zeros((1, 640, 640, 3)))
  assert out["cls_logits"].shape == (1, 9 * sum((640 // 2 ** l) ** 2 for l in range(3, 8)), 91)


def test_quantized_apply_8bit_on_retinanet(tiny, det_data):
  model, v = tiny
  train, _ = det_data
  layers = quant.quantizable_layers(v["params"])
  assert "class_net/conv0" in layers and "fpn/lateral_c3" in layers
  assert "backbone/layer1_block0/conv1" in layers
  cfg = quant.uniform_config(layers, 8, 8)
  x = jnp.asarray(train.images[:16])
  ranges = quant.calibrate(model, v, [x[:8], x[8:]], cfg)
  assert set(ranges) == set(layers)
  apply8 = quant.make_quantized_apply(model, cfg)
  apply2 = quant.make_quantized_apply(model, quant.uniform_config(layers, 2))
  ref, q8, q2 = jax.jit(lambda v, x: (model.apply(v, x), apply8(v, x, act_ranges=ranges),
                                      apply2(v, x)))(v, x)
  for k in ref:
    err8 = float(jnp.linalg.norm(q8[k] - ref[k]) / jnp.linalg.norm(ref[k]))
    err2 = float(jnp.linalg.norm(q2[k] - ref[k]) / jnp.linalg.norm(ref[k]))
    assert err8 < 0.06 and err2 > 10 * err8, (k, err8, err2)  # random init: ~1-3% at 8 bits


def test_predict_pads_short_batches_over_devices(tiny, det_data):
  """Batches of 6 and 2 on 4 devices are padded (to 8 and 4) and the padding rows dropped:
  the detections are those of one device, image for image."""
  from amq_jax._sharding import replicate
  model, v = tiny
  _, test = det_data
  fn = detection.make_predict_fn(detection.detector_apply_fn(model),
                                 detection.generate_anchors((96, 96), ANCHORS_TINY), (96, 96),
                                 score_threshold=0.0, pre_nms_topk=50, max_detections=20)
  batches = [{"image": test.images[a:b], "boxes": test.boxes[a:b],
              "classes": test.classes[a:b]} for a, b in ((0, 6), (6, 8))]
  got = {}
  for n in (1, 4):
    mesh = data_mesh(jax.devices()[:n])
    got[n] = detection.predict(fn, replicate(v, mesh), batches, mesh=mesh)
  assert got[4].keys() == got[1].keys()
  for k in got[1]:
    assert got[4][k].shape == got[1][k].shape and len(got[1][k]) == 8, k
    np.testing.assert_allclose(got[4][k], got[1][k], rtol=1e-5, atol=1e-4, err_msg=k)
  assert got[1]["valid"].any()  # there are detections to compare


# ------------------------------------------------------------------------------ training

def test_train_steps_lower_loss_and_hessian_loss_fn(tiny, det_data):
  model, v = tiny
  train, _ = det_data
  anchors = detection.generate_anchors((96, 96), ANCHORS_TINY)
  tx = optax.adam(1e-3)
  step = detection.make_detector_train_step(detection.detector_apply_fn(model), tx, anchors)
  batch = {k: jnp.asarray(a[:8]) for k, a in
           zip(("image", "boxes", "classes"), (train.images, train.boxes, train.classes))}
  loss_fn = detection.detection_loss_fn(model, v, anchor_scale=3.0)
  state = create_state(v, tx)
  losses = []
  for _ in range(10):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  # One small batch with BatchNorm in training mode: the loss is noisy step to step.
  assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.8 * losses[0]
  # detection_loss_fn (for amq_jax.hessian) equals the loss on the model's outputs; the
  # per-example loss for activation traces equals it on a one-image batch.
  one = {k: x[:1] for k, x in batch.items()}
  packed = jnp.asarray(detection.pack_targets(one["boxes"], one["classes"]))

  @jax.jit
  def check(params):
    vg = jax.value_and_grad(loss_fn)(params, batch)
    ref = detection.detection_loss(model.apply(v, batch["image"]), batch["boxes"],
                                   batch["classes"], jnp.asarray(anchors))[0]
    pe = detection.activation_loss(anchors)(model.apply(v, one["image"]), packed)
    return vg, ref, pe, loss_fn(params, one)
  (loss, g), ref, pe, loss_one = check(v["params"])
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  assert float(jnp.sum(jnp.abs(g["class_net"]["out"]["kernel"]))) > 0
  np.testing.assert_allclose(float(pe[0]), float(loss_one), rtol=1e-5)


def test_train_detector_end_to_end_with_resume(tmp_path):
  """train_detector is the shared loop (train.fit) with the detection loss and source."""
  import configs.retinanet_fmnist_det as cfgmod
  c = cfgmod.get_config("tiny")
  # One device: 8 simulated devices on 2 cores make each step ~30x slower (sharded
  # steps are covered by tests/test_train.py).
  mesh = data_mesh(jax.devices()[:1])
  state, res = detection.train_detector(c, str(tmp_path), progress=False, mesh=mesh)
  assert int(state.step) == c.train.num_steps and np.isfinite(res["final_loss"])
  assert 0.0 <= res["test_mAP"] <= res["test_mAP50"] <= 1.0
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == str(c.train.num_steps)
  logged = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in logged] == [3, 6] and all("train_cls" in r for r in logged)
  # A second call restores the last checkpoint (nothing left to train).
  state2, res2 = detection.train_detector(c, str(tmp_path), progress=False, mesh=mesh)
  assert int(state2.step) == c.train.num_steps
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state2.params)):
    np.testing.assert_array_equal(a, b)
  assert res2["test_mAP"] == res["test_mAP"]


def test_detection_source_order_and_flips(det_data):
  """The source fit reads: (seed, epoch) fixes the order, start resumes mid-epoch, and
  augment flips images with their boxes."""
  from amq_jax.detection._data import DetectionSource
  train, _ = det_data
  src = DetectionSource(train, augment=True)
  assert src.steps_per_epoch(8) == 8 and src.image_hw == (96, 96)
  full = list(src.train_batches(8, seed=1, epoch=2))
  tail = list(src.train_batches(8, seed=1, epoch=2, start=5))
  for a, b in zip(full[5:], tail):
    np.testing.assert_array_equal(a["image"], b["image"])
  plain = list(DetectionSource(train).train_batches(8, seed=1, epoch=2))
  flipped = [not np.array_equal(a["image"], b["image"]) for a, b in zip(full, plain)]
  assert any(flipped)
  i = flipped.index(True)
  row = next(j for j in range(8) if not np.array_equal(full[i]["image"][j],
                                                         plain[i]["image"][j]))
  np.testing.assert_array_equal(full[i]["image"][row], plain[i]["image"][row][:, ::-1])
  real = plain[i]["classes"][row] >= 0
  np.testing.assert_allclose(full[i]["boxes"][row][real][:, 1],
                             96 - plain[i]["boxes"][row][real][:, 3])
  ev = list(src.eval_batches(24))
  assert [len(b["image"]) for b in ev] == [24, 24, 16]
