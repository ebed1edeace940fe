"""Fashion-MNIST from local IDX files (the embedded default data set).

The files come from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), gzipped or not. Nothing is downloaded: the
directory is, in order, the ``data_dir`` argument, ``$AMQ_DATA_DIR``, the Debian path.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

__all__ = ["DataError", "Dataset", "load", "resolve_dir", "split_holdout", "batches",
           "DEFAULT_DIR", "MEAN", "STD", "CLASS_NAMES"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
# Training-set statistics of pixel values in [0, 1].
MEAN, STD = 0.2860, 0.3530
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}
_HOWTO = ("Install the data with `sudo apt-get install dataset-fashion-mnist` "
          f"(files land in {DEFAULT_DIR}), or point to a directory holding the four IDX files "
          "(optionally .gz) with `--config.data_dir=DIR` or the AMQ_DATA_DIR variable.")


from amq_jax.errors import DataError  # noqa: E402 - the one family of user errors (exit 2)


class Dataset(NamedTuple):
  images: np.ndarray  # [N, 28, 28, 1] float32
  labels: np.ndarray  # [N] int32


def resolve_dir(data_dir: str | os.PathLike | None = None) -> Path:
  return Path(data_dir or os.environ.get("AMQ_DATA_DIR") or DEFAULT_DIR)


def _find(directory: Path, stem: str) -> Path:
  for name in (stem, stem + ".gz"):
    if (directory / name).is_file():
      return directory / name
  if not directory.is_dir():
    raise DataError(f"Fashion-MNIST directory {directory} does not exist. {_HOWTO}")
  raise DataError(f"Fashion-MNIST file {stem}[.gz] is missing from {directory}. {_HOWTO}")


def _read_idx(path: Path, magic: int, shape_tail: tuple[int, ...], expected_n: int | None):
  try:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f"cannot read {path}: {e}. The file is damaged; reinstall it "
                    f"(`sudo apt-get install --reinstall dataset-fashion-mnist`) or replace it.")
  ndim = len(shape_tail) + 1
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path} is truncated ({len(raw)} bytes, header needs {header}). "
                    "Reinstall or replace the file.")
  got_magic = int.from_bytes(raw[:4], "big")
  if got_magic != magic:
    raise DataError(f"{path} has magic number {got_magic:#010x}, expected {magic:#010x}: "
                    "not an IDX file of this kind (wrong or damaged file). Replace it.")
  dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  if tuple(dims[1:]) != shape_tail or (expected_n is not None and dims[0] != expected_n):
    raise DataError(f"{path} has shape {dims}, expected [{expected_n}, "
                    f"{', '.join(map(str, shape_tail))}]. Replace the file.")
  size = int(np.prod(dims))
  if len(raw) - header != size:
    raise DataError(f"{path} is truncated or padded: {len(raw) - header} data bytes, "
                    f"expected {size}. Reinstall or replace the file.")
  return np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(dims)


def load(split: str = "train", *, data_dir=None, normalize: bool = True,
         limit: int | None = None) -> Dataset:
  """Loads a split ('train' or 'test') as NHWC float32 images and int32 labels.

  Args:
    split: 'train' (60,000 images) or 'test' (10,000).
    data_dir: directory of the IDX files; default ``$AMQ_DATA_DIR`` or the Debian path.
    normalize: standardize with the training mean/std; otherwise pixels are in [0, 1].
    limit: keep only the first ``limit`` examples (small slices for tests).

  Raises:
    DataError: a file is missing, truncated or not an IDX file of the right kind.
  """
  if split not in _FILES:
    raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
  directory = resolve_dir(data_dir)
  img_stem, lbl_stem, n = _FILES[split]
  images = _read_idx(_find(directory, img_stem), 0x00000803, (28, 28), n)
  labels = _read_idx(_find(directory, lbl_stem), 0x00000801, (), n)
  if labels.max() > 9:
    raise DataError(f"labels in {directory / lbl_stem} exceed 9: damaged file. Replace it.")
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  x = images.astype(np.float32)[..., None] / 255.0
  if normalize:
    x = (x - MEAN) / STD
  return Dataset(x, labels.astype(np.int32))


def split_holdout(ds: Dataset, n_holdout: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
  """Deterministically splits off ``n_holdout`` examples (e.g. for calibration/Hessian).

  Returns ``(rest, holdout)``.
  """
  if not 0 <= n_holdout <= len(ds.labels):
    raise ValueError(f"n_holdout={n_holdout} outside [0, {len(ds.labels)}]")
  perm = np.random.default_rng(seed).permutation(len(ds.labels))
  hold, rest = perm[:n_holdout], perm[n_holdout:]
  return Dataset(ds.images[rest], ds.labels[rest]), Dataset(ds.images[hold], ds.labels[hold])


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
  """Random crop (zero padding ``pad``) and horizontal flip, in NumPy."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                  constant_values=float(images.min()))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  rows = dy[:, None] + np.arange(h)[None]
  cols = dx[:, None] + np.arange(w)[None]
  out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(n) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def batches(ds: Dataset, batch_size: int, *, seed: int | None = 0, epoch: int = 0,
            drop_remainder: bool = True, augment_data: bool = False,
            start: int = 0) -> Iterator[dict]:
  """Yields ``{'image', 'label'}`` batches; shuffled by (seed, epoch) unless seed is None.

  ``start`` skips the first batches (to resume mid-epoch with the same order).
  """
  n = len(ds.labels)
  if seed is None:
    order = np.arange(n)
  else:
    order = np.random.default_rng([seed, epoch]).permutation(n)
  stop = n - n % batch_size if drop_remainder else n
  aug_rng = np.random.default_rng([seed or 0, epoch, 1])
  for i, lo in enumerate(range(0, stop, batch_size)):
    idx = order[lo:lo + batch_size]
    if augment_data:  # draw for every batch, so skipping keeps the stream identical
      images = augment(ds.images[idx], aug_rng)
    else:
      images = ds.images[idx]
    if i < start:
      continue
    yield {"image": images, "label": ds.labels[idx]}


def num_batches(ds: Dataset, batch_size: int, drop_remainder: bool = True) -> int:
  n = len(ds.labels)
  return n // batch_size if drop_remainder else -(-n // batch_size)
