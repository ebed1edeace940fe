"""TFDS reader: a tiny dataset prepared here (array_record), read back without TensorFlow.

Ground truth: the images the builder generated, the raw examples `tfds.data_source` reads,
and closed-form crop geometry on synthetic ramps.
"""
from __future__ import annotations

import collections
import hashlib
import socket
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")
PIL_Image = pytest.importorskip("PIL.Image")

from amq_jax.data import DataError, load_tfds, tfds_reader  # noqa: E402

NAME = "amq_tiny_images"
H, W = 24, 32
N_TRAIN, N_TEST = 40, 10


def _images(n, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8), np.arange(n) % 3


class AmqTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """40 + 10 random RGB images, labels i % 3, stored as PNG (lossless)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(H, W, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(N_TRAIN, 0),
            "test": self._generate_examples(N_TEST, 1)}

  def _generate_examples(self, n, seed):
    images, labels = _images(n, seed)
    for i in range(n):
      # A PIL image is encoded by PIL; a NumPy array would need TensorFlow to encode.
      yield i, {"image": PIL_Image.fromarray(images[i]), "label": int(labels[i])}


def _digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  AmqTinyImages(data_dir=str(d), file_format="array_record").download_and_prepare()
  return str(d)


def _collect(data):
  batches = list(data)
  return batches, (np.concatenate([b["image"] for b in batches]),
                   np.concatenate([b["label"] for b in batches]))


# ------------------------------------------------------------------ reading a prepared set
def test_eval_reads_every_example_in_file_order_normalized(data_dir):
  raw = tfds.data_source(NAME, split="test", data_dir=data_dir, download=False)
  raw_images = np.stack([raw[i]["image"] for i in range(len(raw))])
  raw_labels = np.array([raw[i]["label"] for i in range(len(raw))])
  gen_images, _ = _images(N_TEST, 1)
  # The prepared files hold exactly the generated images (TFDS reorders them on write).
  assert sorted(map(_digest, raw_images)) == sorted(map(_digest, gen_images))

  data = load_tfds(NAME, "test", data_dir=data_dir, batch_size=4, train=False,
                   preprocess="cifar")
  batches, (images, labels) = _collect(data)
  assert [b["image"].shape for b in batches] == [(4, H, W, 3)] * 2 + [(2, H, W, 3)]
  assert len(data) == 3 and data.num_examples == N_TEST and data.num_classes == 3
  assert images.dtype == np.float32 and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, raw_labels)
  want = (raw_images / 255.0 - np.array(tfds_reader.CIFAR_MEAN)) / np.array(
      tfds_reader.CIFAR_STD)
  np.testing.assert_allclose(images, want, atol=1e-5)
  assert "tensorflow" not in sys.modules


def test_eval_is_deterministic_and_imagenet_geometry(data_dir):
  def run():
    return _collect(load_tfds(NAME, "train", data_dir=data_dir, batch_size=16,
                              image_size=14, train=False, preprocess="imagenet"))[1]
  (a, la), (b, lb) = run(), run()
  assert a.shape == (N_TRAIN, 14, 14, 3) and len(la) == N_TRAIN  # eval keeps the rest
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  raw = tfds.data_source(NAME, split="train", data_dir=data_dir, download=False)
  # Example 0: shorter side 24 -> 14/0.875 = 16, center 14x14 = source rows/cols
  # [1.5, 22.5] x [5.5, 26.5] (side 0.875*24 = 21) resized to 14.
  x0 = raw[0]["image"]
  crop = np.asarray(PIL_Image.fromarray(x0).resize((14, 14), PIL_Image.BILINEAR,
                                                   box=(5.5, 1.5, 26.5, 22.5)))
  want = (crop / 255.0 - np.array(tfds_reader.IMAGENET_MEAN)) / np.array(
      tfds_reader.IMAGENET_STD)
  np.testing.assert_allclose(a[0], want, atol=1e-5)


def test_train_epochs_seed_and_drop_remainder(data_dir):
  kw = dict(data_dir=data_dir, image_size=16, train=True, preprocess="imagenet")
  data = load_tfds(NAME, "train", batch_size=8, num_epochs=2, seed=0, **kw)
  batches, (images, labels) = _collect(data)
  assert len(batches) == len(data) == 10 and data.steps_per_epoch == 5
  assert images.shape == (80, 16, 16, 3) and images.dtype == np.float32
  assert labels.dtype == np.int32
  want = collections.Counter(np.arange(N_TRAIN) % 3)
  # Each epoch is a full permutation, and the second epoch has a new order.
  assert collections.Counter(labels[:40]) == want == collections.Counter(labels[40:])
  raw = tfds.data_source(NAME, split="train", data_dir=data_dir, download=False)
  # Identify the source example at stream position p: the one whose preprocessing with the
  # generator (seed, process 0, p) reproduces the output exactly.
  order = []
  for p in range(8):
    hits = [j for j in range(len(raw))
            if raw[j]["label"] == labels[p] and np.allclose(
                images[p], tfds_reader.preprocess_image(
                    raw[j]["image"], train=True, preprocess="imagenet", image_size=16,
                    rng=np.random.default_rng([0, 0, p])), atol=1e-6)]
    assert len(hits) == 1
    order.append(hits[0])
  assert order != list(range(8))  # shuffled

  again = _collect(load_tfds(NAME, "train", batch_size=8, num_epochs=2, seed=0, **kw))[1]
  np.testing.assert_array_equal(again[0], images)
  other = _collect(load_tfds(NAME, "train", batch_size=8, num_epochs=2, seed=1, **kw))[1]
  assert not np.array_equal(other[1], labels)
  assert collections.Counter(other[1][:40]) == want

  dropped = load_tfds(NAME, "train", batch_size=16, **kw)  # 40 = 2 * 16 + 8 dropped
  assert [b["image"].shape[0] for b in dropped] == [16, 16] and len(dropped) == 2


def test_process_shards_partition_the_split(data_dir):
  parts = [_collect(load_tfds(NAME, "train", data_dir=data_dir, batch_size=5, train=False,
                              preprocess=None, process_index=i, process_count=2))[1]
           for i in range(2)]
  assert [len(p[1]) for p in parts] == [20, 20]
  got = sorted(_digest(np.round(x * 255).astype(np.uint8)) for p in parts for x in p[0])
  assert got == sorted(map(_digest, _images(N_TRAIN, 0)[0]))


def test_one_worker_process_matches_in_process(data_dir):
  kw = dict(data_dir=data_dir, batch_size=8, image_size=12, train=True, seed=3,
            preprocess="imagenet")
  a = _collect(load_tfds(NAME, "train", worker_count=0, **kw))[1]
  b = _collect(load_tfds(NAME, "train", worker_count=1, **kw))[1]
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


# ------------------------------------------------------------------ missing data
@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the reader tried to use the network")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def test_not_prepared_says_what_to_do(tmp_path, no_network):
  empty = tmp_path / "nothing_here"
  with pytest.raises(DataError) as e:
    load_tfds("cifar10", "train", data_dir=empty, batch_size=8, train=True)
  msg = str(e.value)
  assert "cifar10" in msg and str(empty) in msg
  assert f"tfds build cifar10 --data_dir {empty}" in msg
  assert "manual" not in msg

  with pytest.raises(DataError) as e:
    load_tfds("imagenet2012", "validation", data_dir=empty, batch_size=8, train=False)
  msg = str(e.value)
  assert f"tfds build imagenet2012 --data_dir {empty}" in msg
  assert f"{empty}/downloads/manual/" in msg

  with pytest.raises(DataError, match="not_a_tfds_dataset_xyz.*registered"):
    load_tfds("not_a_tfds_dataset_xyz", "train", data_dir=empty, batch_size=8, train=True)
  assert not empty.exists()  # reading never creates the directory
  assert "tensorflow" not in sys.modules


def test_bad_split_and_features(data_dir):
  with pytest.raises(ValueError, match="split"):
    load_tfds(NAME, "validation", data_dir=data_dir, batch_size=4, train=False)
  with pytest.raises(ValueError, match="features"):
    load_tfds(NAME, "train", data_dir=data_dir, batch_size=4, train=False,
              label_key="objects")


# ------------------------------------------------------------------ NumPy preprocessing
def _ramp(h, w):
  """Channel 0 = column index, channel 1 = 2 * row index (uint8)."""
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = np.arange(w)[None, :]
  img[..., 1] = 2 * np.arange(h)[:, None]
  return img


def test_center_crop_geometry_exact_and_scaled():
  # 64 x 128, size 56: shorter side -> 56 / 0.875 = 64 (scale 1), center 56x56 =
  # rows 4..59, cols 36..91, copied exactly.
  assert tfds_reader.center_crop_box(64, 128) == (4.0, 36.0, 56.0, 56.0)
  out = tfds_reader.crop_and_resize(_ramp(64, 128), tfds_reader.center_crop_box(64, 128),
                                    (56, 56))
  np.testing.assert_array_equal(out[..., 0], np.broadcast_to(36 + np.arange(56), (56, 56)))
  np.testing.assert_array_equal(out[..., 1].T, np.broadcast_to(8 + 2 * np.arange(56),
                                                               (56, 56)))
  # 128 x 200, size 56: scale 1/2, the box is rows 8..120, cols 44..156 of the source;
  # output pixel j averages source x around 44 + 2j + 0.5 (a ramp stays a ramp).
  box = tfds_reader.center_crop_box(128, 200)
  assert box == (8.0, 44.0, 112.0, 112.0)
  img = _ramp(128, 200)
  out = tfds_reader.crop_and_resize(img, box, (56, 56)).astype(float)
  np.testing.assert_allclose(out[..., 0], np.broadcast_to(44.5 + 2 * np.arange(56),
                                                          (56, 56)), atol=0.51)
  np.testing.assert_allclose(out[..., 1].T, np.broadcast_to(2 * (8.5 + 2 * np.arange(56)),
                                                            (56, 56)), atol=0.51)
  # The float path agrees with the 8-bit path up to rounding.
  out_f = tfds_reader.crop_and_resize(img.astype(np.float32), box, (56, 56))
  np.testing.assert_allclose(out_f, out, atol=0.51)


def test_random_resized_crop_box_ranges():
  rng = np.random.default_rng(0)
  h, w = 90, 160
  boxes = np.array([tfds_reader.random_resized_crop_box(h, w, rng) for _ in range(400)])
  top, left, ch, cw = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + ch <= h).all() and (left + cw <= w).all()
  frac = ch * cw / (h * w)
  assert frac.min() > 0.07 and frac.max() <= 1.0 and frac.max() > 0.6
  r = cw / ch
  assert r.min() > 0.70 and r.max() < 1.40  # 3/4..4/3 up to rounding to pixels
  assert len({(int(a), int(b)) for a, b in zip(top, left)}) > 100
  # Too wide for any 3/4..4/3 crop of the drawn area: centered fallback, ratio clamped.
  assert tfds_reader.random_resized_crop_box(10, 1000, rng, scale=(0.9, 1.0)) == (
      0, 493, 10, 13)


def test_imagenet_train_flip_is_a_fair_mirror():
  img = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  plain = tfds_reader.normalize(img, tfds_reader.IMAGENET_MEAN, tfds_reader.IMAGENET_STD)
  flipped = plain[:, ::-1]
  kinds = []
  for s in range(40):  # scale/ratio 1: the crop is the whole image, only the flip varies
    out = tfds_reader.preprocess_image(img, train=True, preprocess="imagenet",
                                       image_size=16, rng=np.random.default_rng(s),
                                       scale=(1.0, 1.0), ratio=(1.0, 1.0))
    if np.array_equal(out, plain):
      kinds.append(0)
    else:
      np.testing.assert_array_equal(out, flipped)
      kinds.append(1)
  assert 10 < sum(kinds) < 30


def test_cifar_train_is_a_padded_shift_or_its_mirror():
  img = np.random.default_rng(6).integers(1, 256, (H, W, 3), dtype=np.uint8)  # no zeros
  seen = set()
  for s in range(30):
    out = tfds_reader.preprocess_image(img, train=True, preprocess="cifar", image_size=None,
                                       rng=np.random.default_rng(s), mean=(0, 0, 0),
                                       std=(1, 1, 1))
    assert out.shape == (H, W, 3)
    pixels = np.round(out * 255).astype(np.uint8)
    matches = []
    for dy in range(-4, 5):
      for dx in range(-4, 5):
        shifted = np.zeros_like(img)  # shifted[y, x] = img[y + dy, x + dx], 0 outside
        ys, xs = slice(max(0, -dy), H - max(0, dy)), slice(max(0, -dx), W - max(0, dx))
        shifted[ys, xs] = img[max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)]
        for flip in (0, 1):
          if np.array_equal(pixels, shifted[:, ::-1] if flip else shifted):
            matches.append((dy, dx, flip))
    assert len(matches) == 1
    seen.add(matches[0])
  assert len(seen) > 15 and {m[2] for m in seen} == {0, 1}


def test_normalize_values():
  x = np.array([[[0, 255, 51]]], np.uint8)
  got = tfds_reader.normalize(x, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
  np.testing.assert_allclose(got, [[[-1.0, 2.0, 0.0]]], atol=1e-6)
  assert got.dtype == np.float32


def test_training_loop_on_a_tfds_config(data_dir, tmp_path):
  """The research path end to end: a config with dataset 'tfds:NAME' trains, resumes and
  evaluates through the same loop as the default (grain, no TensorFlow)."""
  from amq_jax import train
  from amq_jax.config import load_config

  cfg = load_config("configs/resnet20_fmnist.py:tiny", [
      f"dataset=tfds:{NAME}", f"data_dir={data_dir}", "progress=False", "train.batch_size=8",
      "model_kwargs.num_classes=3", "train.checkpoint_every_steps=3"])
  cfg.input_shape = (16, 16, 3)
  cfg.image_size = 16
  cfg.preprocess = "imagenet"
  cfg.train_split, cfg.eval_split = "train", "test"
  train_src, test_src = train.load_data(cfg)
  assert train_src.steps_per_epoch(8) == 5 and test_src.num_examples == N_TEST
  result = train.train_fp32(cfg, str(tmp_path), progress=False)
  assert result["steps"] == 10 and 0.0 <= result["test_accuracy"] <= 1.0
  assert (tmp_path / "fp32" / "variables.msgpack").is_file()
  assert "tensorflow" not in sys.modules
