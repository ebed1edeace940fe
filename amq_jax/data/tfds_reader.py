"""Prepared TFDS datasets (CIFAR-10, ImageNet, ...) read with grain, without TensorFlow.

A *prepared* dataset is one that ``tfds build`` has already written to a data directory in
a random-access file format (``array_record`` or ``parquet``). This module only reads: it
never downloads or generates anything, so a missing dataset is a :class:`DataError` that
says which command to run on a machine with internet access.

Reading path::

    files on disk --(tfds read-only builder, .as_data_source)--> random-access source
      -> grain.MapDataset: shard per JAX process, shuffle (a new order each epoch), repeat
      -> per-example NumPy/PIL preprocessing, random state from (seed, process, index)
      -> grain.IterDataset: threaded read-ahead, batch, optional worker processes

The builder is made from the files alone (``features.json``, ``dataset_info.json``), the
same thing ``tfds.data_source(name, split=..., data_dir=..., download=False)`` reads, but
without running the data set's generation code, some of which (e.g. ``coco``) needs
TensorFlow even to describe its features. Images are decoded with PIL (or OpenCV when
installed) by TFDS's NumPy decoders; TensorFlow is never imported.

Example::

    from amq_jax.data import tfds_reader
    train = tfds_reader.load_tfds("imagenet2012", "train", data_dir="/data/tfds",
                                  batch_size=256, image_size=224, train=True,
                                  num_epochs=None)
    for batch in train:   # {'image': float32 [256, 224, 224, 3], 'label': int32 [256]}
      ...
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np

from amq_jax.data.fashion_mnist import DataError

__all__ = ["load_tfds", "TfdsData", "open_source", "preprocess_image",
           "random_resized_crop_box", "center_crop_box", "crop_and_resize",
           "random_pad_crop_offset", "normalize", "IMAGENET_MEAN", "IMAGENET_STD",
           "CIFAR_MEAN", "CIFAR_STD", "PRESETS"]

# Per-channel statistics of pixel values in [0, 1] (RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
PRESETS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR_MEAN, CIFAR_STD)}

# Fraction of the shorter side kept by the evaluation center crop (224 / 256).
CROP_FRACTION = 0.875
_INSTALL = "pip install 'amq-jax[tfds]'"


# --------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------
def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(f"reading TFDS datasets needs tensorflow-datasets and grain: "
                      f"`{_INSTALL}` (TensorFlow itself is not needed). ({e})") from e
  return tfds


def _import_grain():
  try:
    import grain
  except ImportError as e:
    raise ImportError(f"reading TFDS datasets needs tensorflow-datasets and grain: "
                      f"`{_INSTALL}`. ({e})") from e
  return grain


# --------------------------------------------------------------------------------------
# Geometry (host-side NumPy; boxes are (top, left, height, width) in source pixels)
# --------------------------------------------------------------------------------------
def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, *,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
  """Draws an Inception-style random crop box.

  The crop covers a fraction ``a ~ U(scale)`` of the image area with aspect ratio
  ``r = w/h`` drawn log-uniformly from ``ratio``: ``w = sqrt(a*H*W*r)``, ``h = sqrt(a*H*W/r)``,
  placed uniformly at random. After ``attempts`` draws that do not fit, falls back to the
  largest centered crop whose ratio is clamped into ``ratio`` (Szegedy et al. 2015, as in
  torchvision's ``RandomResizedCrop``).

  Args:
    height, width: source image size.
    rng: NumPy generator (one per example, for reproducibility).
    scale: range of the crop's area as a fraction of the image area.
    ratio: range of the crop's width/height.
    attempts: rejection-sampling tries before the fallback.

  Returns:
    ``(top, left, crop_height, crop_width)`` in integer source pixels.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    r = math.exp(rng.uniform(log_lo, log_hi))
    cw = int(round(math.sqrt(target * r)))
    ch = int(round(math.sqrt(target / r)))
    if 0 < cw <= width and 0 < ch <= height:
      top = int(rng.integers(0, height - ch + 1))
      left = int(rng.integers(0, width - cw + 1))
      return top, left, ch, cw
  in_ratio = width / height
  if in_ratio < ratio[0]:
    cw, ch = width, max(1, int(round(width / ratio[0])))
  elif in_ratio > ratio[1]:
    ch, cw = height, max(1, int(round(height * ratio[1])))
  else:
    ch, cw = height, width
  return (height - ch) // 2, (width - cw) // 2, ch, cw


def center_crop_box(height: int, width: int, *,
                    crop_fraction: float = CROP_FRACTION) -> tuple[float, ...]:
  """The evaluation crop: resize the shorter side to ``size / crop_fraction``, keep the
  central ``size x size`` square.

  Done as one resampling: that square is, in source pixels, the centered square of side
  ``crop_fraction * min(H, W)`` (independent of ``size``); resizing it to ``size`` equals
  resize-then-crop without rounding the intermediate image.

  Returns:
    ``(top, left, side, side)`` as floats (sub-pixel box for :func:`crop_and_resize`).
  """
  side = crop_fraction * min(height, width)
  return (height - side) / 2, (width - side) / 2, side, side


def random_pad_crop_offset(rng: np.random.Generator, pad: int) -> tuple[int, int]:
  """Offset (dy, dx) in [0, 2*pad] of the crop taken from an image zero-padded by ``pad``."""
  return int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))


def crop_and_resize(image: np.ndarray, box: Sequence[float], size: tuple[int, int]
                    ) -> np.ndarray:
  """Crops ``box`` = (top, left, h, w) (floats allowed) and resizes it to ``size`` = (H, W).

  Bilinear (triangle filter) with PIL, antialiased when shrinking: the filter support
  widens by the shrink factor, so each output pixel averages the source pixels it covers.
  ``uint8`` images with 1, 3 or 4 channels go through PIL's 8-bit path (results rounded
  to ``uint8``); anything else is resized per channel in float32.
  """
  from PIL import Image
  top, left, h, w = (float(v) for v in box)
  pil_box = (left, top, left + w, top + h)
  out_h, out_w = size
  if (pil_box == (0.0, 0.0, float(image.shape[1]), float(image.shape[0]))
      and (out_h, out_w) == image.shape[:2]):
    return image
  channels = image.shape[2]
  if image.dtype == np.uint8 and channels in (1, 3, 4):
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((out_w, out_h), Image.BILINEAR, box=pil_box))
    return out.reshape(out_h, out_w, channels)
  planes = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                       .resize((out_w, out_h), Image.BILINEAR, box=pil_box))
            for c in range(channels)]
  return np.stack(planes, axis=-1).astype(image.dtype)


def normalize(image: np.ndarray, mean: Sequence[float] | None,
              std: Sequence[float] | None) -> np.ndarray:
  """``uint8`` [0, 255] (or float [0, 1]) -> float32 ``(x / 255 - mean) / std`` per channel."""
  x = image.astype(np.float32)
  if image.dtype == np.uint8:
    x *= np.float32(1 / 255)
  if mean is not None:
    x -= np.asarray(mean, np.float32)
  if std is not None:
    x /= np.asarray(std, np.float32)
  return x


def preprocess_image(image: np.ndarray, *, train: bool, preprocess: str | None,
                     image_size: int | None, rng: np.random.Generator | None = None,
                     mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None,
                     scale: tuple[float, float] = (0.08, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3),
                     pad: int = 4) -> np.ndarray:
  """One image [H, W, C] -> float32 [S, S, C] (or the native size), normalized.

  - ``'imagenet'``: train = random-resized crop (``scale``, ``ratio``) resized to
    ``image_size`` + horizontal flip (p = 1/2); eval = shorter side to
    ``image_size / 0.875``, center ``image_size`` crop. Default size 224.
  - ``'cifar'``: train = zero-pad by ``pad``, random crop back to H x W, flip; eval = as
    is. Resized to ``image_size`` afterwards if that differs from the native size.
  - ``None``: no augmentation; resized (whole image) to ``image_size`` if given.

  Pixels are then mapped to [0, 1] and standardized with ``mean``/``std`` (defaults: the
  preset's statistics; none for ``preprocess=None``).

  Args:
    image: decoded image, ``uint8`` in [0, 255] (float images are taken as [0, 1]).
    train: apply the random augmentation (needs ``rng``).
    preprocess: 'imagenet', 'cifar' or None.
    image_size: output side; see above for the defaults.
    rng: the example's generator; draws happen in a fixed order, so (seed, index) fixes
      the result.
    mean, std: per-channel statistics overriding the preset's.
    scale, ratio: random-resized-crop ranges ('imagenet' only).
    pad: padding of the random crop ('cifar' only).
  """
  if preprocess not in (None, "imagenet", "cifar"):
    raise ValueError(f"unknown preprocess {preprocess!r}; use 'imagenet', 'cifar' or None")
  if image.ndim == 2:
    image = image[..., None]
  h, w = image.shape[:2]
  if train and preprocess is not None and rng is None:
    raise ValueError("train=True augmentation needs rng")
  flip = False
  if preprocess == "imagenet":
    size = image_size or 224
    if train:
      box = random_resized_crop_box(h, w, rng, scale=scale, ratio=ratio)
      flip = bool(rng.random() < 0.5)
    else:
      box = center_crop_box(h, w)
    image = crop_and_resize(image, box, (size, size))
  elif preprocess == "cifar":
    if train:
      dy, dx = random_pad_crop_offset(rng, pad)
      padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
      image = padded[dy:dy + h, dx:dx + w]
      flip = bool(rng.random() < 0.5)
    if image_size and (image_size, image_size) != (h, w):
      image = crop_and_resize(image, (0, 0, h, w), (image_size, image_size))
  elif image_size and (image_size, image_size) != (h, w):
    image = crop_and_resize(image, (0, 0, h, w), (image_size, image_size))
  if flip:
    image = image[:, ::-1]
  if mean is None and std is None and preprocess is not None:
    mean, std = PRESETS[preprocess]
  return np.ascontiguousarray(normalize(image, mean, std))


# --------------------------------------------------------------------------------------
# Opening a prepared dataset
# --------------------------------------------------------------------------------------
def _howto(name: str, data_dir: str) -> str:
  base = name.split("/")[0].split(":")[0]
  steps = (f"On a machine with internet access run\n"
           f"    tfds build {name} --data_dir {data_dir} --file_format array_record\n"
           f"(`pip install 'amq-jax[tfds]' tensorflow` there: generating needs TensorFlow, "
           f"reading here does not), then copy {data_dir}/{base}/ to this machine.")
  if base == "imagenet2012" or base.startswith("imagenet2012"):
    steps = (f"ImageNet cannot be downloaded automatically: first get ILSVRC2012_img_train.tar "
             f"and ILSVRC2012_img_val.tar from https://image-net.org (after accepting its "
             f"terms) and place them in {data_dir}/downloads/manual/ (see the TFDS catalog "
             f"page for imagenet2012). " + steps)
  return steps


def open_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None):
  """Opens a prepared TFDS split as a random-access source (no download, no TensorFlow).

  Equivalent to ``tfds.data_source(name, split=split, data_dir=data_dir, download=False)``
  but builds the reader from the prepared files only.

  Args:
    name: TFDS name, optionally with config and version, e.g. ``'cifar10'``,
      ``'imagenet2012:5.1.0'``, ``'coco/2017'``.
    split: TFDS split spec (``'train'``, ``'validation'``, ``'train[:10%]'``...).
    data_dir: TFDS data directory; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.

  Returns:
    ``(source, info)``: a sequence of decoded example dicts (``len``, ``[i]``) and the
    ``tfds.core.DatasetInfo``.

  Raises:
    DataError: the dataset is not prepared in ``data_dir``, is prepared only in a
      sequential format (tfrecord), or the name is unknown; the message says what to do.
  """
  tfds = _import_tfds()
  from tensorflow_datasets.core import read_only_builder
  shown_dir = os.fspath(data_dir) if data_dir is not None else (
      os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets"))
  kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
  try:
    builder = read_only_builder.builder_from_files(name, **kwargs)
  except tfds.core.DatasetNotFoundError as e:
    builder = None
    not_found = e
  except Exception as e:  # damaged metadata files
    raise DataError(f"TFDS dataset {name!r} in {shown_dir} cannot be opened ({e}). Delete "
                    f"its folder and prepare it again. {_howto(name, shown_dir)}") from e
  if builder is None:
    try:  # is the name known at all? (only the class lookup: never constructs or prepares)
      tfds.builder_cls(name.split("/")[0].split(":")[0])
    except tfds.core.DatasetNotFoundError:
      raise DataError(f"TFDS dataset {name!r} is neither prepared in {shown_dir} nor a "
                      f"registered TFDS name (see `tfds.list_builders()`); for a custom "
                      f"dataset, prepare it with its builder into {shown_dir}.") from not_found
    raise DataError(f"TFDS dataset {name!r} is not prepared in {shown_dir} (nothing is "
                    f"downloaded at run time). {_howto(name, shown_dir)}") from not_found
  random_access = tfds.core.file_adapters.FileFormat.with_random_access()
  formats = builder.info.available_file_formats()
  if not formats & random_access:
    got = ", ".join(sorted(f.value for f in formats)) or "unknown"
    raise DataError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as {got}, which cannot be "
        f"read by index (needed to read without TensorFlow). Convert it once with\n"
        f"    tfds convert_format --dataset_version_dir={builder.data_dir} "
        f"--out_file_format=array_record\nor rebuild it with `--file_format array_record`.")
  try:
    source = builder.as_data_source(split=split)
  except (KeyError, ValueError) as e:
    raise ValueError(f"split {split!r} of {name!r}: {e}") from e
  except (FileNotFoundError, AssertionError, OSError) as e:
    raise DataError(f"TFDS dataset {name!r} in {builder.data_dir} is incomplete ({e}). "
                    f"Prepare it again. {_howto(name, shown_dir)}") from e
  return source, builder.info


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------
def _allow_unparsed_absl_flags() -> None:
  """grain 0.2.18's worker processes read an absl flag, which fails in programs that do not
  parse absl flags (google/grain#1355, fixed after 0.2.18). Mark them parsed, as grain's
  own workaround does; a later ``absl.app.run`` still parses the command line."""
  try:
    from absl import flags
  except ImportError:
    return
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass(frozen=True)
class _Preprocess:
  """Per-example map (a picklable object so grain worker processes can run it)."""
  train: bool
  preprocess: str | None
  image_size: int | None
  seed: int
  stream: int
  mean: tuple | None
  std: tuple | None
  image_key: str
  label_key: str

  def __call__(self, index: int, example: dict) -> dict:
    # One generator per (seed, process, position in the repeated stream): the same
    # example gets fresh augmentation each epoch, and any batch can be recomputed alone.
    rng = np.random.default_rng([self.seed, self.stream, index]) if self.train else None
    image = preprocess_image(np.asarray(example[self.image_key]), train=self.train,
                             preprocess=self.preprocess, image_size=self.image_size,
                             rng=rng, mean=self.mean, std=self.std)
    return {"image": image, "label": np.int32(example[self.label_key])}


@dataclasses.dataclass
class TfdsData:
  """An iterable of ``{'image': float32 [B,H,W,C], 'label': int32 [B]}`` batches.

  Iterating starts over (the same order, since it is fixed by the seed). ``dataset`` is the
  grain ``IterDataset``; its iterator's ``get_state()``/``set_state()`` resume mid-stream.

  Attributes:
    dataset: the grain pipeline.
    info: the ``tfds.core.DatasetInfo``.
    num_examples: examples per epoch read by this process.
    num_classes: from the label feature (``ClassLabel``), else None.
    batch_size: examples per batch (per process).
    num_epochs: passes over the data, None for endless.
    drop_remainder: whether an incomplete last batch is dropped.
  """
  dataset: Any
  info: Any
  num_examples: int
  num_classes: int | None
  batch_size: int
  num_epochs: int | None
  drop_remainder: bool

  def __iter__(self) -> Iterator[dict]:
    return iter(self.dataset)

  @property
  def steps_per_epoch(self) -> int:
    """Whole batches per epoch (batches run across epoch boundaries when repeated)."""
    return self.num_examples // self.batch_size

  def __len__(self) -> int:
    if self.num_epochs is None:
      raise TypeError("an endless stream (num_epochs=None) has no length")
    total = self.num_examples * self.num_epochs
    return total // self.batch_size if self.drop_remainder else -(-total // self.batch_size)


def load_tfds(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
              batch_size: int, image_size: int | None = None, train: bool,
              seed: int = 0, shuffle: bool | None = None, num_epochs: int | None = 1,
              preprocess: str | None = "imagenet", worker_count: int = 0,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              image_key: str = "image", label_key: str = "label",
              process_index: int | None = None, process_count: int | None = None,
              read_threads: int = 8) -> TfdsData:
  """Batches of a prepared TFDS image-classification split, preprocessed in NumPy.

  Order of operations: shard by process (example ``i`` goes to process
  ``i % process_count``), shuffle (a new permutation each epoch, fixed by ``seed``),
  repeat ``num_epochs``, preprocess each example with a generator seeded by
  ``(seed, process_index, stream position)``, batch. Everything is deterministic given
  the arguments. One worker process gives exactly the in-process batches; with
  ``worker_count > 1`` each worker batches its own share of the stream and batches are
  taken from the workers in turn (grain's ``mp_prefetch``), so batch composition differs
  from ``worker_count <= 1`` but is still fixed by the arguments.

  Args:
    name: TFDS name (``'cifar10'``, ``'imagenet2012'``, ``'my_ds/config:1.0.0'``).
    split: split spec, e.g. ``'train'``, ``'validation'``, ``'train[:5%]'``.
    data_dir: TFDS data directory holding the prepared dataset.
    batch_size: examples per batch in this process.
    image_size: output side; default 224 for 'imagenet', the native size otherwise.
    train: random augmentation, shuffling by default and dropping the last incomplete
      batch; otherwise deterministic preprocessing, file order, all examples kept.
    seed: fixes the shuffle and the augmentation.
    shuffle: default ``train``.
    num_epochs: passes over the data; None repeats forever.
    preprocess: 'imagenet', 'cifar' or None (see :func:`preprocess_image`).
    worker_count: grain worker processes (0: read and preprocess in this process, with
      ``read_threads`` threads).
    mean, std: per-channel statistics overriding the preset's (e.g. for grayscale data).
    image_key, label_key: feature names in the dataset.
    process_index, process_count: this process's shard; default from
      ``jax.process_index()`` / ``jax.process_count()``.
    read_threads: threads reading and preprocessing examples ahead.

  Returns:
    :class:`TfdsData`, an iterable of ``{'image', 'label'}`` batches with ``len``.

  Raises:
    DataError: the dataset is not prepared (the message gives the command to run).
    ImportError: tensorflow-datasets or grain is missing.
    ValueError: bad arguments, or the features are not an image and a label.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if preprocess not in (None, "imagenet", "cifar"):
    raise ValueError(f"unknown preprocess {preprocess!r}; use 'imagenet', 'cifar' or None")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  grain = _import_grain()
  source, info = open_source(name, split, data_dir=data_dir)
  features = info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f"{name!r} has features {sorted(features.keys())}; load_tfds needs an "
                     f"image ({image_key!r}) and a class label ({label_key!r}); pass "
                     "image_key=/label_key= to choose others.")
  channels = features[image_key].shape[-1]
  if (mean is None) != (std is None):
    raise ValueError("give both mean and std, or neither")
  stats_mean = mean if mean is not None else (PRESETS[preprocess][0] if preprocess else None)
  if stats_mean is not None and channels is not None and len(stats_mean) not in (1, channels):
    raise ValueError(f"{name!r} images have {channels} channel(s) but the {preprocess!r} "
                     f"statistics have {len(stats_mean)}; pass mean=/std= of that length.")
  num_classes = getattr(features[label_key], "num_classes", None)

  if process_count is None or process_index is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")

  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  num_examples = len(ds)
  if num_examples == 0:
    raise DataError(f"split {split!r} of {name!r} has no examples for process "
                    f"{process_index} of {process_count}.")
  if train if shuffle is None else shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map_with_index(_Preprocess(
      train=train, preprocess=preprocess, image_size=image_size, seed=seed,
      stream=process_index, mean=None if mean is None else tuple(mean),
      std=None if std is None else tuple(std), image_key=image_key, label_key=label_key))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, read_threads),
                                            prefetch_buffer_size=max(2 * batch_size, 16)))
  it = it.batch(batch_size, drop_remainder=train)
  if worker_count > 0:
    _allow_unparsed_absl_flags()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return TfdsData(dataset=it, info=info, num_examples=num_examples,
                  num_classes=num_classes, batch_size=batch_size, num_epochs=num_epochs,
                  drop_remainder=train)
