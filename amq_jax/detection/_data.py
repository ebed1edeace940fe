"""Detection data: a synthetic set from Fashion-MNIST items, and a COCO (TFDS) reader.

Both yield batches ``{'image' [N, H, W, C] float32, 'boxes' [N, G, 4] float32,
'classes' [N, G] int32}`` with boxes ``(y1, x1, y2, x2)`` in pixels and class -1 padding
up to ``G = max_gt`` boxes per image.

**Fashion-MNIST detection set** (:func:`make_detection_set`). Each canvas (default 96x96,
one channel, background 0) receives 1-4 items of the matching Fashion-MNIST split, each
resized (bilinear) to ``round(28 * s)`` pixels, ``s ~ U(0.75, 1.5)``, and placed uniformly
at random where its box overlaps every earlier box with IoU <= ``max_iou`` (pixels of
overlapping items take the maximum). The box is the tight box of the item's pixels above
``tight_threshold`` (or the pasted square with ``tight=False``); the class is its label.
Images are standardized with Fashion-MNIST's mean/std. Everything is a function of
``(split, num_images, seed, ...)``.

**COCO** (:func:`coco_batches`): examples of a prepared TFDS ``coco/2017`` split (``image``
uint8 [H, W, 3], ``objects/bbox`` [n, 4] (ymin, xmin, ymax, xmax) normalized to [0, 1],
``objects/label`` [n], optionally ``objects/is_crowd``), resized so the longer side is
``image_size`` (aspect kept), zero-padded bottom/right to ``image_size x image_size``,
normalized with the ImageNet statistics; random horizontal flip when training.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from amq_jax.data import fashion_mnist

__all__ = ["DetectionSet", "make_detection_set", "detection_batches", "num_batches",
           "coco_example", "coco_batches", "open_coco", "MAX_GT"]

MAX_GT = 8


class DetectionSet(NamedTuple):
  images: np.ndarray   # [N, H, W, C] float32
  boxes: np.ndarray    # [N, G, 4] float32, (y1, x1, y2, x2) pixels, zeros for padding
  classes: np.ndarray  # [N, G] int32, -1 for padding


def _resize(item: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image
  im = Image.fromarray(item.astype(np.float32), mode="F")
  return np.asarray(im.resize((size, size), Image.BILINEAR), np.float32)


def _iou_one(b, others):
  if not others:
    return 0.0
  o = np.asarray(others)
  tl = np.maximum(b[:2], o[:, :2])
  br = np.minimum(b[2:], o[:, 2:])
  inter = np.prod(np.maximum(br - tl, 0), -1)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
  return float(np.max(inter / (area(b) + area(o) - inter)))


def make_detection_set(split: str = "train", num_images: int = 1024, *, seed: int = 0,
                       canvas: int = 96, min_objects: int = 1, max_objects: int = 4,
                       scale_range: tuple[float, float] = (0.75, 1.5), max_iou: float = 0.1,
                       max_gt: int = MAX_GT, tight: bool = True,
                       tight_threshold: float = 0.05, data_dir=None,
                       source: fashion_mnist.Dataset | None = None) -> DetectionSet:
  """Builds ``num_images`` detection images from the Fashion-MNIST ``split``.

  Args:
    split: 'train' or 'test' (items come from that split only).
    num_images: images to make. seed: everything random derives from it.
    canvas: side of the square canvas. min_objects, max_objects: items per image.
    scale_range: item side as a multiple of 28 px. max_iou: largest IoU with an earlier
      box (placement is retried 50 times, then the item is skipped; the first always fits).
    max_gt: padded box count ``G`` (>= max_objects). tight: tight boxes of the pixels
      above ``tight_threshold`` (in [0, 1]) instead of the pasted square.
    data_dir: Fashion-MNIST directory. source: a ``Dataset`` to draw items from instead
      (pixels un-normalized in [0, 1]; for tests).

  Returns:
    :class:`DetectionSet` (images standardized with the Fashion-MNIST mean/std).
  """
  if max_gt < max_objects:
    raise ValueError(f"max_gt={max_gt} < max_objects={max_objects}")
  if source is None:
    source = fashion_mnist.load(split, data_dir=data_dir, normalize=False)
  items, labels = source.images[..., 0], source.labels
  rng = np.random.default_rng([seed, {"train": 0, "test": 1}.get(split, 2)])
  images = np.zeros((num_images, canvas, canvas, 1), np.float32)
  boxes = np.zeros((num_images, max_gt, 4), np.float32)
  classes = np.full((num_images, max_gt), -1, np.int32)
  for n in range(num_images):
    k = int(rng.integers(min_objects, max_objects + 1))
    placed: list[np.ndarray] = []
    for _ in range(k):
      idx = int(rng.integers(len(labels)))
      size = int(round(28 * rng.uniform(*scale_range)))
      size = min(size, canvas)
      patch = np.clip(_resize(items[idx], size), 0.0, 1.0)
      if tight:
        ys, xs = np.nonzero(patch > tight_threshold)
        if len(ys) == 0:
          continue
        rel = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)
      else:
        rel = np.array([0, 0, size, size], np.float32)
      for _attempt in range(50):
        y0, x0 = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
        box = rel + np.array([y0, x0, y0, x0], np.float32)
        if _iou_one(box, placed) <= max_iou:
          break
      else:
        continue
      region = images[n, y0:y0 + size, x0:x0 + size, 0]
      np.maximum(region, patch, out=region)
      boxes[n, len(placed)] = box
      classes[n, len(placed)] = labels[idx]
      placed.append(box)
  images = (images - fashion_mnist.MEAN) / fashion_mnist.STD
  return DetectionSet(images.astype(np.float32), boxes, classes)


def num_batches(ds: DetectionSet, batch_size: int) -> int:
  return len(ds.images) // batch_size


def detection_batches(ds: DetectionSet, batch_size: int, *, seed: int | None = 0,
                      epoch: int = 0, start: int = 0, flip: bool = False,
                      drop_remainder: bool = True) -> Iterator[dict]:
  """Yields ``{'image', 'boxes', 'classes'}`` batches, shuffled by ``(seed, epoch)``.

  ``flip``: mirror each image left-right with probability 1/2 (boxes follow).
  ``start`` skips the first batches (resume mid-epoch with the same stream).
  """
  n = len(ds.images)
  order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
  stop = n - n % batch_size if drop_remainder else n
  flip_rng = np.random.default_rng([seed or 0, epoch, 1])
  w = ds.images.shape[2]
  for i, lo in enumerate(range(0, stop, batch_size)):
    idx = order[lo:lo + batch_size]
    f = flip_rng.random(len(idx)) < 0.5 if flip else None
    if i < start:
      continue
    img, box, cls = ds.images[idx], ds.boxes[idx].copy(), ds.classes[idx]
    if flip and f.any():
      img = img.copy()
      img[f] = img[f, :, ::-1]
      real = cls[f] >= 0
      fb = box[f]
      x1 = np.where(real, w - fb[..., 3], 0)
      x2 = np.where(real, w - fb[..., 1], 0)
      fb[..., 1], fb[..., 3] = x1, x2
      box[f] = fb
    yield {"image": img, "boxes": box, "classes": cls}


# --------------------------------------------------------------------------------------
# COCO from a prepared TFDS source
# --------------------------------------------------------------------------------------
def _get(example: dict, key: str):
  """``example['objects']['bbox']`` or a flat ``example['objects/bbox']``."""
  if key in example:
    return example[key]
  head, _, tail = key.partition("/")
  return example[head][tail]


def coco_example(example: dict, *, image_size: int = 640, max_gt: int = 100,
                 flip: bool = False, drop_crowd: bool = True,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> dict:
  """One ``coco/2017``-layout example -> ``{'image' [S, S, 3], 'boxes' [G, 4], 'classes' [G]}``.

  The image is resized by ``r = image_size / max(H, W)`` (bilinear), placed top-left on a
  zero canvas; boxes become pixels of the resized image. Crowd boxes are dropped
  (``drop_crowd``); beyond ``max_gt`` boxes, the largest are kept.
  """
  from amq_jax.data import tfds_reader
  img = np.asarray(example["image"])
  if img.ndim == 2:
    img = img[..., None]
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  h, w = img.shape[:2]
  r = image_size / max(h, w)
  nh, nw = max(1, int(round(h * r))), max(1, int(round(w * r)))
  resized = tfds_reader.crop_and_resize(img, (0, 0, h, w), (nh, nw))
  x = tfds_reader.normalize(resized, mean, std)
  canvas = np.zeros((image_size, image_size, 3), np.float32)
  canvas[:nh, :nw] = x
  bbox = np.asarray(_get(example, "objects/bbox"), np.float32).reshape(-1, 4)
  label = np.asarray(_get(example, "objects/label"), np.int64).reshape(-1)
  keep = np.ones(len(label), bool)
  if drop_crowd:
    try:
      keep &= ~np.asarray(_get(example, "objects/is_crowd"), bool).reshape(-1)
    except KeyError:
      pass
  bbox, label = bbox[keep] * np.array([nh, nw, nh, nw], np.float32), label[keep]
  ok = (bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1])
  bbox, label = bbox[ok], label[ok]
  if len(label) > max_gt:
    area = (bbox[:, 2] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 1])
    top = np.sort(np.argsort(-area, kind="stable")[:max_gt])
    bbox, label = bbox[top], label[top]
  if flip:
    canvas = canvas[:, ::-1].copy()
    bbox = np.stack([bbox[:, 0], image_size - bbox[:, 3], bbox[:, 2], image_size - bbox[:, 1]],
                    -1)
  boxes = np.zeros((max_gt, 4), np.float32)
  classes = np.full((max_gt,), -1, np.int32)
  boxes[:len(label)] = bbox
  classes[:len(label)] = label
  return {"image": canvas, "boxes": boxes, "classes": classes}


def coco_batches(source, batch_size: int, *, image_size: int = 640, max_gt: int = 100,
                 train: bool = False, seed: int = 0, epoch: int = 0, start: int = 0,
                 process_index: int = 0, process_count: int = 1,
                 limit: int | None = None, drop_remainder: bool = True,
                 flip: bool | None = None) -> Iterator[dict]:
  """Batches from a random-access source of ``coco/2017``-layout examples.

  Args:
    source: a sequence of example dicts (``len``, ``[i]``), e.g. the first result of
      ``amq_jax.data.tfds_reader.open_source('coco/2017', 'train', data_dir=...)``.
    batch_size: examples per batch on THIS process. train: shuffle by ``(seed, epoch)``
      and flip at random. start: batches to skip. process_index, process_count: every
      process reads its own strided share. limit: use only the first ``limit`` examples.
    drop_remainder: skip a last partial batch (keep it for evaluation).
    flip: mirror images at random (default: ``train``).

  Yields:
    ``{'image' [B, S, S, 3], 'boxes' [B, max_gt, 4], 'classes' [B, max_gt]}``.
  """
  n = len(source) if limit is None else min(limit, len(source))
  order = (np.random.default_rng([seed, epoch]).permutation(n) if train else np.arange(n))
  order = order[process_index::process_count]
  flip = train if flip is None else flip
  stop = len(order) - batch_size + 1 if drop_remainder else len(order)
  for b, lo in enumerate(range(0, stop, batch_size)):
    if b < start:
      continue
    exs = []
    for i in order[lo:lo + batch_size]:
      f = bool(np.random.default_rng([seed, epoch, int(i)]).random() < 0.5) if flip else False
      exs.append(coco_example(source[int(i)], image_size=image_size, max_gt=max_gt, flip=f))
    yield {k: np.stack([e[k] for e in exs]) for k in exs[0]}


def open_coco(split: str, *, data_dir=None, name: str = "coco/2017"):
  """``(source, info)`` of a prepared TFDS COCO split (see ``tfds_reader.open_source``)."""
  from amq_jax.data import tfds_reader
  return tfds_reader.open_source(name, split, data_dir=data_dir)


# --------------------------------------------------------------------------------------
# Batch sources for the training loop (amq_jax.train.fit)
# --------------------------------------------------------------------------------------
class DetectionSource:
  """A :class:`DetectionSet` as a batch source of :func:`amq_jax.train.fit`.

  ``train_batches`` are shuffled by ``(seed, epoch)`` and, with ``augment``, flipped
  left-right at random (boxes follow); ``eval_batches`` keep every image once, in order.
  """
  process_local = False  # every process holds the whole set; fit keeps its slice

  def __init__(self, ds: DetectionSet, *, augment: bool = False):
    self.ds, self.augment = ds, bool(augment)
    self.num_examples = len(ds.images)
    self.image_hw = tuple(ds.images.shape[1:3])

  def __repr__(self):
    return (f"DetectionSource({self.num_examples} images {self.image_hw}, "
            f"augment={self.augment})")

  def steps_per_epoch(self, batch_size: int) -> int:
    return num_batches(self.ds, batch_size)

  def train_batches(self, batch_size: int, *, seed: int, epoch: int,
                    start: int = 0) -> Iterator[dict]:
    return detection_batches(self.ds, batch_size, seed=seed, epoch=epoch, start=start,
                             flip=self.augment)

  def eval_batches(self, batch_size: int) -> Iterator[dict]:
    return detection_batches(self.ds, batch_size, seed=None, drop_remainder=False)


class CocoSource:
  """A prepared TFDS ``coco/2017`` split as a batch source of :func:`amq_jax.train.fit`.

  Process-local: with several processes each one decodes only its strided share of the
  examples and yields ``batch_size / process_count`` of every global batch.
  """
  process_local = True

  def __init__(self, split: str, *, data_dir=None, image_size: int = 640, max_gt: int = 100,
               limit: int | None = None, augment: bool = True, name: str = "coco/2017"):
    self.source, _ = open_coco(split, data_dir=data_dir, name=name)
    self.split, self.image_size, self.max_gt = split, int(image_size), int(max_gt)
    self.limit, self.augment = limit, bool(augment)
    self.num_examples = min(limit, len(self.source)) if limit else len(self.source)
    self.image_hw = (self.image_size, self.image_size)

  def __repr__(self):
    return f"CocoSource({self.split!r}, {self.num_examples} images, {self.image_size}px)"

  def _procs(self, batch_size: int):
    import jax
    pc = jax.process_count()
    if batch_size % pc:
      raise ValueError(f"batch size {batch_size} is not divisible by the {pc} processes")
    return jax.process_index(), pc

  def steps_per_epoch(self, batch_size: int) -> int:
    _, pc = self._procs(batch_size)
    return (self.num_examples // pc) // (batch_size // pc)

  def train_batches(self, batch_size: int, *, seed: int, epoch: int,
                    start: int = 0) -> Iterator[dict]:
    pi, pc = self._procs(batch_size)
    return coco_batches(self.source, batch_size // pc, image_size=self.image_size,
                        max_gt=self.max_gt, train=True, flip=self.augment, seed=seed,
                        epoch=epoch, start=start, process_index=pi, process_count=pc,
                        limit=self.limit)

  def eval_batches(self, batch_size: int) -> Iterator[dict]:
    return coco_batches(self.source, batch_size, image_size=self.image_size,
                        max_gt=self.max_gt, limit=self.limit, drop_remainder=False)
