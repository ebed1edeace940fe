"""The one training loop: loss goes down on real data, sharding is exact, resume is exact
(after a kill, and past a damaged checkpoint), errors name the field to change, and every
config spells its optimization sections the same way."""
import glob
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import train
from amq_jax.config import load_config
from amq_jax.data import InMemorySource
from amq_jax.errors import ConfigError, DataError, NonFiniteError, StateError

CFG = "configs/resnet20_fmnist.py:tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MLP(nn.Module):
  """Small and quick to compile, with BatchNorm so the loop carries model state."""
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.width)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(nn.relu(x))


def _mlp(width=16):
  model = MLP(width)
  v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  return model, train.classification_loss(train.linen_apply_fn(model)), v


SECTION = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=1e-4,
               warmup_steps=2, batch_size=64, num_steps=6, checkpoint_every_steps=2,
               log_every_steps=2)


def _fit(loss_fn, v, src, workdir, mesh=None, **over):
  return train.fit(loss_fn, v["params"], {"batch_stats": v["batch_stats"]}, src,
                   dict(SECTION, **over), workdir=str(workdir), seed=3, progress=False,
                   mesh=mesh or train.data_mesh(jax.devices()[:1]))


def _assert_same(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_fit_lowers_loss_and_logs(tmp_path, fmnist_slice):
  _, loss_fn, v = _mlp()
  src = InMemorySource(fmnist_slice[0], augment=True)
  ts, res = _fit(loss_fn, v, src, tmp_path, num_steps=30, log_every_steps=10,
                 checkpoint_every_steps=30)
  assert int(ts.step) == 30 and res["steps"] == 30 and res["steps_per_epoch"] == 32
  losses = [l for _, l in res["losses"]]
  assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True), losses
  recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in recs] == [10, 20, 30]
  assert all(r["images_per_sec"] > 0 and "train_accuracy" in r and "train_grad_norm" in r
             for r in recs)
  assert recs[0]["learning_rate"] > recs[-1]["learning_rate"]  # cosine decay
  assert ts.variables.keys() == {"params", "batch_stats"}
  ev = train.evaluate(train.make_eval_step(train.linen_apply_fn(MLP())), ts.variables,
                      fmnist_slice[1], batch_size=100)
  assert 0.5 < ev["accuracy"] <= 1.0


def test_sharded_fit_equals_single_device(tmp_path, fmnist_slice):
  """4 devices (batch split, BatchNorm statistics over the global batch) = 1 device."""
  _, loss_fn, v = _mlp()
  src = InMemorySource(fmnist_slice[0])
  out = []
  for n in (1, 4):
    mesh = train.data_mesh(jax.devices()[:n])
    ts, _ = _fit(loss_fn, v, src, tmp_path / str(n), mesh=mesh, num_steps=3)
    assert ts.params["Dense_0"]["kernel"].sharding.mesh.devices.size == n
    out.append(jax.device_get(ts))
  _assert_same(out[0], out[1], rtol=2e-5, atol=2e-6)


def test_batch_not_divisible_by_devices(tmp_path, fmnist_slice):
  mesh = train.data_mesh(jax.devices()[:4])
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    train.shard_batch({"image": np.zeros((6, 2))}, mesh)
  _, loss_fn, v = _mlp()
  with pytest.raises(ConfigError, match=r"train\.batch_size=6 is not a multiple of the 4 "
                     r"devices; set --config\.train\.batch_size=8"):
    _fit(loss_fn, v, InMemorySource(fmnist_slice[0]), tmp_path, mesh=mesh, batch_size=6)
  with pytest.raises(ConfigError, match=r"train\.batch_size=4096 is larger than the 2048"):
    _fit(loss_fn, v, InMemorySource(fmnist_slice[0]), tmp_path, batch_size=4096)


def test_sharded_evaluate_pads_and_masks_short_batches(fmnist_slice):
  """512 examples in batches of 100 on 8 devices: each batch padded to 104 (the last, 12,
  to 16) and the padding masked out, so loss and accuracy are those of one device."""
  model, _, v = _mlp()
  step = train.make_eval_step(train.linen_apply_fn(model))
  got = {n: train.evaluate(step, v, fmnist_slice[1], batch_size=100,
                           mesh=train.data_mesh(jax.devices()[:n])) for n in (1, 8)}
  assert got[8]["accuracy"] == got[1]["accuracy"]
  assert got[8]["loss"] == pytest.approx(got[1]["loss"], rel=1e-5)


@pytest.fixture
def default_devices():
  """Restores the default mesh's device count (conftest.py: one) after the test."""
  from amq_jax import _sharding
  before = _sharding._default_count
  yield _sharding
  _sharding.set_default_devices(before)


def test_default_mesh_devices_can_be_narrowed(default_devices):
  s = default_devices
  assert train.data_mesh().devices.size == s.default_mesh().devices.size == 1  # conftest.py
  s.set_default_devices(None)
  assert list(train.data_mesh().devices) == jax.devices() and len(jax.devices()) == 8
  s.set_default_devices(4)
  assert list(s.default_mesh().devices) == jax.devices()[:4]
  # An explicit mesh is not narrowed; shard_batch and replicate default to the default mesh.
  assert train.data_mesh(jax.devices()[2:8]).devices.size == 6
  placed = train.shard_batch({"x": np.arange(8.0)})
  assert placed["x"].sharding.mesh.devices.size == 4
  assert len(train.replicate(np.ones(3)).sharding.device_set) == 4
  s.set_default_devices(9)
  with pytest.raises(ValueError, match=r"set_default_devices\(9\) cannot be met: 8 devices"):
    train.data_mesh()
  for bad in (0, -1, True, 2.0, "2"):
    with pytest.raises(ValueError, match="integer >= 1, or None"):
      s.set_default_devices(bad)


def test_source_that_runs_dry_is_an_error_not_a_hang(tmp_path, fmnist_slice):
  class Dry(InMemorySource):
    def train_batches(self, batch_size, *, seed, epoch, start=0):
      return iter(()) if epoch else super().train_batches(batch_size, seed=seed, epoch=epoch,
                                                          start=start)
  _, loss_fn, v = _mlp()
  with pytest.raises(DataError, match="no batch of 64 for epoch 1"):
    _fit(loss_fn, v, Dry(fmnist_slice[0]), tmp_path, num_steps=40)


def test_checkpoint_roundtrip(tmp_path):
  _, _, v = _mlp()
  state = train.create_state(v, train.make_optimizer(SECTION, 10))
  ck = train.Checkpointer(tmp_path / "ck")
  ck.save(7, state)
  back = ck.restore(jax.tree.map(jnp.zeros_like, state))
  assert ck.latest_step() == 7
  _assert_same(state, back, rtol=0, atol=0)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, fmnist_slice):
  """Damage the newest step's files: resume warns, starts from the step before and ends
  where an untouched run ends."""
  _, loss_fn, v = _mlp()
  src = InMemorySource(fmnist_slice[0], augment=True)
  clean, _ = _fit(loss_fn, v, src, tmp_path / "clean")
  work = tmp_path / "work"
  _fit(loss_fn, v, src, work, num_steps=4)  # checkpoints 2 and 4 (two kept)
  ckdir = work / "checkpoints"
  assert sorted(os.listdir(ckdir)) == ["2", "4"]
  for f in glob.glob(str(ckdir / "4" / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"\0damaged")
  with pytest.warns(train.CheckpointFallbackWarning, match=r"4.*damaged.*from step 2"):
    resumed, res = _fit(loss_fn, v, src, work)
  assert res["losses"][0][0] == 4  # steps 3.. were trained again
  _assert_same(clean, resumed, rtol=1e-6, atol=1e-7)
  # Nothing readable at all: a StateError naming the directory.
  for f in glob.glob(str(ckdir / "*" / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"\0damaged")
  with pytest.raises(StateError, match=f"no readable checkpoint in {ckdir}.*delete"):
    _fit(loss_fn, v, src, work, num_steps=12)


def test_checkpoint_of_another_model_is_a_state_error(tmp_path, fmnist_slice):
  src = InMemorySource(fmnist_slice[0])
  _, loss_fn, v = _mlp(16)
  _fit(loss_fn, v, src, tmp_path, num_steps=2)
  _, loss_fn32, v32 = _mlp(32)
  with pytest.raises(StateError, match=(f"{tmp_path / 'checkpoints'} holds a checkpoint of "
                                        r"another model.*'params/BatchNorm_0/bias' has shape "
                                        r"\(16,\) there but \(32,\) here.*delete")):
    _fit(loss_fn32, v32, src, tmp_path, num_steps=4)


def test_nan_loss_names_step_and_field(tmp_path, fmnist_slice):
  _, loss_fn, v = _mlp()
  with pytest.raises(NonFiniteError) as e:
    train.fit(loss_fn, v["params"], {"batch_stats": v["batch_stats"]},
              InMemorySource(fmnist_slice[0]),
              dict(SECTION, learning_rate=1e30, warmup_steps=0, num_steps=8),
              workdir=str(tmp_path), seed=0, progress=False, field_prefix="finetune",
              desc="finetune hawq_v2", mesh=train.data_mesh(jax.devices()[:1]))
  msg = str(e.value)
  assert "finetune hawq_v2: the training loss is not finite at step " in msg
  assert "--config.finetune.learning_rate=1e+29" in msg and "now 1e+30" in msg
  assert "--config.finetune.clip_grad_norm=1.0" in msg and "None" not in msg
  bad = int(msg.split("at step ")[1].split()[0])
  assert 1 <= bad <= 8
  assert isinstance(e.value, train.NonFiniteLossError)  # the old name still catches it


def test_optimizer_clipping_decay_and_schedule():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  grads = {"w": jnp.full((3, 4), 10.0), "b": jnp.full(4, 10.0)}  # global norm 40
  base = dict(optimizer="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.0,
              num_steps=10)

  def first_update(**over):
    tx = train.make_optimizer(dict(base, **over), 10)
    u, _ = tx.update(grads, tx.init(params), params)
    return u

  norm = lambda t: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t))))  # noqa
  assert norm(first_update()) == pytest.approx(40.0, rel=1e-6)
  for off in (None, 0.0):
    assert norm(first_update(clip_grad_norm=off)) == pytest.approx(40.0, rel=1e-6)
  u = first_update(clip_grad_norm=2.0)
  assert norm(u) == pytest.approx(2.0, rel=1e-5)
  np.testing.assert_allclose(u["w"], -0.5 * np.ones((3, 4)), rtol=1e-5)  # g * 2 / 40
  # Weight decay on kernels (ndim > 1) only.
  z = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
  tx = train.make_optimizer(dict(base, weight_decay=0.5), 10)
  u, _ = tx.update(z, tx.init(params), params)
  np.testing.assert_allclose(u["w"], -0.5 * np.ones((3, 4)))
  np.testing.assert_allclose(u["b"], np.zeros(4))
  # Warm-up from 0, peak, cosine down to learning_rate * final_lr_fraction.
  sched = train.lr_schedule(train.read_section(dict(base, learning_rate=0.1, warmup_steps=4,
                                                    final_lr_fraction=0.1)), 20)
  assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(0.05)
  assert float(sched(4)) == pytest.approx(0.1) and float(sched(20)) == pytest.approx(0.01)
  # Adam is one field away.
  assert norm(first_update(optimizer="adam", learning_rate=0.1)) == pytest.approx(
      0.1 * np.sqrt(16), rel=1e-3)


@pytest.mark.parametrize("over, match", [
    ({"batch_size": -5}, r"finetune\.batch_size=-5 must be a positive integer; set "
                         r"--config\.finetune\.batch_size=128"),
    ({"batch_size": 0}, r"finetune\.batch_size=0 must be a positive integer"),
    ({"optimizer": "rmsprop"}, r"finetune\.optimizer='rmsprop' is not an optimizer"),
    ({"learning_rate": float("nan")}, r"finetune\.learning_rate=nan must be a finite"),
    ({"num_steps": None, "num_epochs": None}, r"neither finetune\.num_epochs nor "
                                              r"finetune\.num_steps is set"),
    ({"clip_grad_norm": -1.0}, r"finetune\.clip_grad_norm=-1\.0 must be a number >= 0"),
    ({"momentum": 1.0}, r"finetune\.momentum=1\.0 must be in \[0, 1\)"),
])
def test_bad_section_fields_are_config_errors(over, match):
  with pytest.raises(ConfigError, match=match):
    train.make_optimizer(dict(SECTION, **over), 10, field_prefix="finetune")


CONFIGS = ["resnet20_fmnist.py", "resnet20_fmnist.py:tiny", "resnet50_imagenet.py",
           "inception_v3_imagenet.py", "squeezenext_imagenet.py", "retinanet_fmnist_det.py",
           "retinanet_fmnist_det.py:tiny", "retinanet_coco.py", "retinanet_coco.py:tiny"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_has_the_same_optimization_shape(name):
  cfg = load_config(os.path.join(ROOT, "configs", name))
  assert set(cfg.train.keys()) == set(train.OPTIM_FIELDS)
  assert set(cfg.finetune.keys()) == set(train.OPTIM_FIELDS) | {
      "calib_examples", "calib_method", "seeds"}
  assert isinstance(cfg.finetune.seeds, tuple) and cfg.finetune.seeds
  for sec, prefix in ((cfg.train, "train"), (cfg.finetune, "finetune")):
    s = train.read_section(sec, field_prefix=prefix)  # valid as written
    assert (s["num_epochs"] is None) != (s["num_steps"] is None)
  assert not set(train.OPTIM_FIELDS) & set(cfg.keys())  # nothing left at the top level


def test_config_values_kept():
  c = load_config(CFG.split(":")[0])
  assert dict(c.train) == dict(
      optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, warmup_steps=200,
      final_lr_fraction=0.0, clip_grad_norm=None, batch_size=128, num_epochs=10.0,
      num_steps=None, augment=True, checkpoint_every_steps=200, log_every_steps=50,
      eval_batch_size=1000)
  f = c.finetune
  assert (f.learning_rate, f.weight_decay, f.warmup_steps, f.num_epochs, f.batch_size,
          f.calib_examples, f.calib_method) == (0.01, 1e-4, 0, 1.0, 128, 512, "percentile")
  d = load_config(os.path.join(ROOT, "configs", "retinanet_fmnist_det.py"))
  assert (d.train.optimizer, d.train.num_steps, d.train.clip_grad_norm) == ("adam", 1500, 10.0)
  assert (d.finetune.num_steps, d.finetune.learning_rate, d.finetune.seeds) == (
      300, 2e-4, (0, 1, 2))


def test_resume_after_kill_equals_uninterrupted(tmp_path):
  """Kill a real FP32 training process mid-run, restart it, compare with a clean run."""
  script = ("import sys; from amq_jax import train; from amq_jax.config import load_config; "
            f"c = load_config({CFG!r}, ['train.checkpoint_every_steps=2', "
            "'train.num_epochs=3.0', 'progress=False']); train.train_fp32(c, sys.argv[1])")
  cmd = [sys.executable, "-c", script]
  clean = subprocess.run(cmd + [str(tmp_path / "clean")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
  assert clean.returncode == 0, clean.stderr
  work = tmp_path / "killed"
  proc = subprocess.Popen(cmd + [str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=ROOT)
  ckdir = work / "fp32" / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    steps = [int(p.name) for p in ckdir.iterdir() if p.name.isdigit()] if ckdir.exists() else []
    if steps and max(steps) >= 6:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "training ended before it could be killed"
  proc.kill()
  proc.wait()
  assert not (work / "fp32" / "variables.msgpack").exists()
  again = subprocess.run(cmd + [str(work)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
  assert again.returncode == 0, again.stderr
  a = train.restore_variables(str(tmp_path / "clean" / "fp32" / "variables.msgpack"))
  b = train.restore_variables(str(work / "fp32" / "variables.msgpack"))
  _assert_same(a, b, rtol=1e-5, atol=1e-6)
  res = json.loads((work / "fp32" / "result.json").read_text())
  assert res["steps"] == 24 and 0 <= res["test_accuracy"] <= 1


def test_restore_variables_names_damaged_or_foreign_file(tmp_path):
  _, _, v = _mlp(16)
  p = str(tmp_path / "variables.msgpack")
  train.save_variables(p, v)
  _assert_same(v, train.restore_variables(p, v), rtol=0, atol=0)
  with pytest.raises(StateError, match=f"{p} holds the variables of another model"):
    train.restore_variables(p, _mlp(32)[2])
  with open(p, "wb") as f:
    f.write(b"\xc1garbage")
  with pytest.raises(StateError, match=f"{p} is damaged"):
    train.restore_variables(p)


def test_legacy_fit_signature(tmp_path, fmnist_slice):
  """COMPAT: the old fit(config, workdir, apply_fn=..., ...) call, until its callers move."""
  import ml_collections
  model, _, v = _mlp()
  cfg = ml_collections.ConfigDict(dict(batch_size=64, learning_rate=0.05, seed=0,
                                       optimizer="sgd", checkpoint_every_steps=100,
                                       log_every_steps=100, progress=False,
                                       eval_batch_size=256))
  ts, res = train.fit(cfg, str(tmp_path), apply_fn=train.linen_apply_fn(model), variables=v,
                      train_ds=fmnist_slice[0], test_ds=fmnist_slice[1], num_epochs=0.25,
                      mesh=train.data_mesh(jax.devices()[:1]))
  assert res["steps"] == 8 and 0.3 < res["test_accuracy"] <= 1 and int(ts.step) == 8


def test_config_overrides_and_errors():
  cfg = load_config(CFG, ["train.num_epochs=5", "finetune.learning_rate=1",
                          "model_kwargs.num_classes=10"])
  assert cfg.train.num_epochs == 5 and cfg.finetune.learning_rate == 1.0
  with pytest.raises(ConfigError, match="unknown config field 'nope'"):
    load_config(CFG, ["nope=1"])
  with pytest.raises(ConfigError, match="not found"):
    load_config("configs/missing.py")


def test_cli_help_lists_commands():
  out = subprocess.run([sys.executable, "-m", "amq_jax.cli", "--help"], capture_output=True,
                       text=True, cwd=ROOT)
  assert out.returncode == 0 and "train" in out.stdout


def test_cli_bad_data_dir(tmp_path):
  out = subprocess.run([sys.executable, "-m", "amq_jax.cli", "train", "--config", CFG,
                        "--workdir", str(tmp_path), f"--config.data_dir={tmp_path}/none"],
                       capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 2 and "apt-get install dataset-fashion-mnist" in out.stderr
