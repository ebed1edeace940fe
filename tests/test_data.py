"""Fashion-MNIST loader: real files, and damaged/missing ones give one clear error."""
import gzip
import shutil

import numpy as np
import pytest

from amq_jax.data import DataError, fashion_mnist


def test_real_files_load(fmnist_slice):
  train, test = fmnist_slice
  assert train.images.shape == (2048, 28, 28, 1) and train.images.dtype == np.float32
  assert train.labels.dtype == np.int32 and set(np.unique(train.labels)) == set(range(10))
  raw = fashion_mnist.load("test", normalize=False, limit=100)
  assert 0.0 <= raw.images.min() and raw.images.max() <= 1.0
  # Normalization uses the training statistics: the full train set is ~N(0, 1).
  full = fashion_mnist.load("train")
  assert abs(full.images.mean()) < 0.01 and abs(full.images.std() - 1) < 0.01
  assert np.bincount(full.labels).tolist() == [6000] * 10


def _copy_raw(tmp_path, split="test"):
  """Uncompressed copies of a split's two files in tmp_path."""
  src = fashion_mnist.resolve_dir(None)
  stems = fashion_mnist._FILES[split][:2]
  for stem in stems:
    with gzip.open(src / (stem + ".gz")) as f:
      (tmp_path / stem).write_bytes(f.read())
  return [tmp_path / s for s in stems]


def test_uncompressed_dir_and_env(tmp_path, monkeypatch):
  _copy_raw(tmp_path)
  monkeypatch.setenv("AMQ_DATA_DIR", str(tmp_path))
  a = fashion_mnist.load("test", limit=50)
  b = fashion_mnist.load("test", data_dir=fashion_mnist.DEFAULT_DIR, limit=50)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)


def test_truncated_file(tmp_path):
  images, _ = _copy_raw(tmp_path)
  images.write_bytes(images.read_bytes()[:-100])
  with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
    fashion_mnist.load("test", data_dir=tmp_path)


def test_wrong_magic(tmp_path):
  _, labels = _copy_raw(tmp_path)
  raw = bytearray(labels.read_bytes())
  raw[3] = 0x03
  labels.write_bytes(bytes(raw))
  with pytest.raises(DataError, match="magic number"):
    fashion_mnist.load("test", data_dir=tmp_path)


def test_corrupt_gzip(tmp_path):
  images, labels = _copy_raw(tmp_path)
  (tmp_path / (images.name + ".gz")).write_bytes(b"\x1f\x8b garbage")
  images.unlink()
  with pytest.raises(DataError, match="damaged"):
    fashion_mnist.load("test", data_dir=tmp_path)


def test_missing_dir_and_file(tmp_path):
  with pytest.raises(DataError, match="does not exist.*apt-get install dataset-fashion-mnist"):
    fashion_mnist.load("train", data_dir=tmp_path / "nope")
  _copy_raw(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*missing.*AMQ_DATA_DIR"):
    fashion_mnist.load("test", data_dir=tmp_path)


def test_batches_deterministic_and_resumable(fmnist_slice):
  train, _ = fmnist_slice
  a = list(fashion_mnist.batches(train, 100, seed=3, epoch=1, augment_data=True))
  b = list(fashion_mnist.batches(train, 100, seed=3, epoch=1, augment_data=True, start=5))
  assert len(a) == 20 and len(b) == 15
  for x, y in zip(a[5:], b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  c = next(fashion_mnist.batches(train, 100, seed=3, epoch=2))
  assert not np.array_equal(a[0]["label"], c["label"])


def test_holdout_split(fmnist_slice):
  train, _ = fmnist_slice
  rest, hold = fashion_mnist.split_holdout(train, 48, seed=1)
  assert len(hold.labels) == 48 and len(rest.labels) == 2000
  rest2, hold2 = fashion_mnist.split_holdout(train, 48, seed=1)
  np.testing.assert_array_equal(hold.images, hold2.images)
