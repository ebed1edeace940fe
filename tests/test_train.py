"""FP32 training: loss goes down on real data, sharding is exact, resume is exact."""
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import models, train
from amq_jax.config import ConfigError, load_config
from amq_jax.data import fashion_mnist

CFG = "configs/resnet20_fmnist.py:tiny"


def _setup(n_devices, cfg):
  model = models.get_model(cfg.model)
  variables = train.init_variables(model, (28, 28, 1), seed=0)
  tx = train.make_optimizer(cfg, 100)
  mesh = train.data_mesh(jax.devices()[:n_devices])
  state = train.replicate(train.create_state(variables, tx), mesh)
  return train.make_train_step(train.linen_apply_fn(model), tx), state, mesh


def test_few_steps_lower_loss(fmnist_slice):
  cfg = load_config(CFG, ["learning_rate=0.1"])
  step, state, mesh = _setup(1, cfg)
  batch = train.shard_batch(next(fashion_mnist.batches(fmnist_slice[0], 128, seed=0)), mesh)
  losses = []
  for _ in range(15):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.92 * losses[0] and losses[-1] < min(losses[:5]), losses


def test_sharded_step_equals_single_device(fmnist_slice):
  cfg = load_config(CFG)
  batches = list(fashion_mnist.batches(fmnist_slice[0], 64, seed=0))[:3]
  results = []
  for n in (1, 4):
    step, state, mesh = _setup(n, cfg)
    for b in batches:
      state, _ = step(state, train.shard_batch(b, mesh))
    assert state.params["head"]["kernel"].sharding.mesh.devices.size == n
    results.append(jax.device_get(state))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_batch_not_divisible_by_devices():
  mesh = train.data_mesh(jax.devices()[:4])
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    train.shard_batch({"image": np.zeros((6, 2))}, mesh)


def test_checkpoint_roundtrip(tmp_path):
  cfg = load_config(CFG)
  _, state, _ = _setup(1, cfg)
  ck = train.Checkpointer(tmp_path / "ck")
  ck.save(7, state)
  zeros = jax.tree.map(jnp.zeros_like, state)
  back = ck.restore(zeros)
  assert ck.latest_step() == 7
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
  """Kill a real `amq-jax train` process mid-run, restart it, compare with a clean run."""
  args = ["--config", CFG, "--config.checkpoint_every_steps=2", "--config.num_epochs=3",
          "--config.progress=False"]
  cmd = [sys.executable, "-m", "amq_jax.cli", "train"]
  clean = subprocess.run(cmd + args + ["--workdir", str(tmp_path / "clean")],
                         capture_output=True, text=True, timeout=300)
  assert clean.returncode == 0, clean.stderr
  work = tmp_path / "killed"
  proc = subprocess.Popen(cmd + args + ["--workdir", str(work)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
  again = subprocess.run(cmd + args + ["--workdir", str(work)], capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  a = train.restore_variables(str(tmp_path / "clean" / "fp32" / "variables.msgpack"))
  b = train.restore_variables(str(work / "fp32" / "variables.msgpack"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_nan_loss_is_reported(tmp_path, fmnist_slice):
  cfg = load_config(CFG, ["learning_rate=1e30", "progress=False", "checkpoint_every_steps=2"])
  model = models.get_model(cfg.model)
  variables = train.init_variables(model, (28, 28, 1), seed=0)
  with pytest.raises(train.NonFiniteLossError, match="not finite.*learning_rate"):
    train.fit(cfg, str(tmp_path), apply_fn=train.linen_apply_fn(model), variables=variables,
              train_ds=fmnist_slice[0], test_ds=None, num_epochs=1)


def test_config_overrides_and_errors():
  cfg = load_config(CFG, ["num_epochs=5", "learning_rate=1", "model_kwargs.num_classes=10"])
  assert cfg.num_epochs == 5 and cfg.learning_rate == 1.0
  with pytest.raises(ConfigError, match="unknown config field 'nope'"):
    load_config(CFG, ["nope=1"])
  with pytest.raises(ConfigError, match="not found"):
    load_config("configs/missing.py")


def test_cli_help_lists_commands():
  out = subprocess.run([sys.executable, "-m", "amq_jax.cli", "--help"], capture_output=True,
                       text=True)
  assert out.returncode == 0 and "train" in out.stdout


def test_cli_bad_data_dir(tmp_path):
  out = subprocess.run([sys.executable, "-m", "amq_jax.cli", "train", "--config", CFG,
                        "--workdir", str(tmp_path), f"--config.data_dir={tmp_path}/none"],
                       capture_output=True, text=True)
  assert out.returncode == 2 and "apt-get install dataset-fashion-mnist" in out.stderr
