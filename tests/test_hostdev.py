"""One CPU device per core (amq_jax/_hostdev.py): the count chosen, and that it takes effect.

The effect needs a fresh process (JAX fixes its CPU device count when its backend starts;
conftest.py already started it here with 8).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import ml_collections
import pytest

from amq_jax import _hostdev, cli
from amq_jax.config import load_config
from amq_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "resnet20_fmnist.py")


def _cfg(host_devices="auto"):
  return ml_collections.ConfigDict({"host_devices": host_devices,
                                    "train": {"batch_size": 128, "eval_batch_size": 1000},
                                    "hessian": {"batch_size": 96}})


def test_auto_is_one_per_core_fitting_every_unpadded_batch():
  c = _cfg()
  assert sorted(_hostdev.sharded_sizes(c)) == [96, 128]  # evaluation batches are padded: not counted
  assert _hostdev.choose(c, cores=2) == 2
  assert _hostdev.choose(c, cores=1) == 1
  assert _hostdev.choose(c, cores=3) == 2     # 3 divides 96 but not 128
  assert _hostdev.choose(c, cores=64) == 8    # AUTO_MAX
  c.hessian.batch_size = 127
  assert _hostdev.choose(c, cores=8) == 1     # odd batch: no split
  assert _hostdev.choose(_cfg(host_devices=3), cores=2) == 3  # an explicit count is taken
  assert _hostdev.choose(_cfg(host_devices="4"), cores=2) == 4  # as --config.host_devices=4


def test_shipped_configs_keep_one_device_and_take_auto_or_a_count():
  assert _hostdev.choose(load_config(CONFIG)) == 1
  assert _hostdev.choose(load_config(CONFIG, ["host_devices=auto"]), cores=2) == 2
  assert _hostdev.choose(load_config(CONFIG, ["host_devices=3"]), cores=2) == 3


@pytest.mark.parametrize("bad", [0, -1, "many", 2.5, True])
def test_bad_host_devices_is_a_config_error(bad, tmp_path):
  with pytest.raises(ConfigError, match="host_devices"):
    _hostdev.choose(_cfg(host_devices=bad))
  if not isinstance(bad, bool):
    with pytest.raises(ConfigError, match="host_devices"):
      load_config(CONFIG, [f"host_devices={bad}"])


def test_once_jax_started_auto_is_silent_and_a_count_warns():
  # conftest.py started JAX with 8 CPU devices.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert _hostdev.configure(_cfg()) is None
  with pytest.warns(UserWarning, match="already started with 8 CPU device"):
    assert _hostdev.configure(_cfg(host_devices=2)) is None


def _devices_in_fresh_process(code: str, xla_flags: str | None = None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()[-1]


def test_configure_takes_effect_and_the_users_xla_flags_win():
  code = ("from amq_jax import _hostdev; from amq_jax.config import load_config; "
          f"c = load_config({CONFIG!r}, ['host_devices=3']); "
          "print(_hostdev.configure(c)); import jax; print(jax.device_count())")
  assert _devices_in_fresh_process(code) == "3"
  assert _devices_in_fresh_process(
      code, "--xla_force_host_platform_device_count=5") == "5"


def test_the_command_line_configures_before_any_work(monkeypatch, tmp_path):
  seen = []
  monkeypatch.setattr(_hostdev, "configure", lambda cfg: seen.append(cfg.host_devices))
  monkeypatch.setattr(cli, "_dispatch", lambda args, cfg: {"ok": True})
  assert cli.main(["report", "--config", CONFIG, "--workdir", str(tmp_path / "wd"),
                   "--config.host_devices=2"]) == 0
  assert seen == [2]
