"""Mixed-precision activations for RetinaNet: error helper by hand, search, tiny run end to end."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import detection, train
from amq_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Twice(nn.Module):
  """``Dense`` ``shared`` applied to x and to relu(fc(x)): two calls, two inputs."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    shared = nn.Dense(3, name="shared")
    h = nn.relu(nn.Dense(3, name="fc")(x))
    return shared(x) + shared(h)


def _np_fake_quant_act(x, bits, lo, hi):
  """The activation grid written out: asymmetric over [min(lo,0), max(hi,0)], clipped."""
  lo, hi = min(lo, 0.0), max(hi, 0.0)
  qmax = 2 ** bits - 1
  scale = (hi - lo) / qmax
  zp = np.clip(np.round(-lo / scale), 0, qmax)
  q = np.clip(np.round(x / scale) + zp, 0, qmax)
  return (q - zp) * scale


def test_activation_errors_and_sizes_by_hand():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3)).astype(np.float32)
  model = _Twice()
  v = model.init(jax.random.key(0), x)
  k, b = np.asarray(v["params"]["fc"]["kernel"]), np.asarray(v["params"]["fc"]["bias"])
  h = np.maximum(x @ k + b, 0.0)
  ranges = {"shared": (-1.5, 2.0), "fc/kernel": (-0.7, 1.2)}  # clips some values
  bits = (2, 4)
  got = detection.activation_quant_errors(model, v, [x[:3], x[3:]], ranges, bits,
                                          layers=["fc", "shared"])
  want = np.zeros((2, 2))
  for j, a in enumerate(bits):
    e = lambda t, r: np.sum((_np_fake_quant_act(t, a, *r) - t) ** 2, axis=1)  # noqa: E731
    want[0, j] = e(x, ranges["fc/kernel"]).mean()
    # Two calls of the same module: the per-example errors of both inputs add up.
    want[1, j] = (e(x, ranges["shared"]) + e(h, ranges["shared"])).mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[1, 0] > got[1, 1] > 0  # fewer bits, larger error
  sizes = detection.activation_sizes(model, v, x[:1])
  assert sizes == {"fc": 3, "shared": 6}


def test_act_search_meets_budget_and_beats_uniform():
  rng = np.random.default_rng(1)
  L, bits = 7, (4, 6, 8)
  elems = rng.integers(10, 100, L).astype(float)
  err = np.exp(-np.log(4.0) * np.array(bits))[None, :] * rng.uniform(1, 5, (L, 1)) * elems[:, None]
  omega = rng.uniform(0, 3, (L, 1)) * err
  r = detection.act_search(elems, omega, bits, "uniform:6", pinned={0: 8, L - 1: 8})
  uni = [8] + [6] * (L - 2) + [8]
  assert r["uniform"]["bits"] == uni
  assert r["budget_bits"] == pytest.approx(float(np.dot(elems, uni)))
  h = r["hawq_v2"]
  assert h["bits"][0] == 8 and h["bits"][-1] == 8
  assert h["cost"] <= r["budget_bits"] + 1e-9
  # Brute force over the free layers: the least Omega within the budget.
  import itertools
  best = np.inf
  for combo in itertools.product(range(3), repeat=L - 2):
    a = [8] + [bits[j] for j in combo] + [8]
    if np.dot(elems, a) <= r["budget_bits"] + 1e-9:
      best = min(best, sum(omega[l, bits.index(b)] for l, b in enumerate(a)))
  assert h["omega"] == pytest.approx(best)
  assert h["omega"] <= r["uniform"]["omega"] + 1e-12
  r2 = detection.act_search(elems, omega, bits, "avg:6.5", pinned={0: 8, L - 1: 8})
  assert r2["hawq_v2"]["avg_bits"] <= 6.5 + 1e-9 and r2["uniform"]["avg_bits"] <= 6.5 + 1e-9
  with pytest.raises(ValueError, match="below the smallest"):
    detection.act_search(elems, omega, bits, "avg:3", pinned={0: 8})


def test_tiny_detection_run_end_to_end(tmp_path):
  cfg = load_config(os.path.join(ROOT, "configs", "retinanet_fmnist_det.py") + ":tiny")
  cfg.num_steps = 24  # a few dozen FP32 steps
  cfg.checkpoint_every_steps = 24
  cfg.log_every_steps = 24
  wd = str(tmp_path / "run")
  # One device: the 8 simulated ones would only multiply compilation time here.
  mesh = train.data_mesh(jax.devices()[:1])
  rep = detection.run_detection(cfg, wd, log=None, mesh=mesh)
  assert os.path.isfile(os.path.join(wd, "report.md"))
  with open(os.path.join(wd, "report.json")) as f:
    assert json.load(f)["methods"].keys() == rep["methods"].keys() == {"hawq_v2", "uniform"}
  with open(os.path.join(wd, "search", "bits.json")) as f:
    bits = json.load(f)
  act = bits["activations"]
  h, u = bits["methods"]["hawq_v2"], bits["methods"]["uniform"]
  for m in (h, u):  # the activation budget is met
    assert m["act_memory_bits"] <= act["budget_bits"] * (1 + 1e-12)
    mem = sum(e * b for e, b in zip(act["elems"], m["act_bits"].values()))
    assert mem == pytest.approx(m["act_memory_bits"])
  # Identical weight bits in both fine-tuned configurations.
  assert ({l: c["w"] for l, c in h["config"].items()}
          == {l: c["w"] for l, c in u["config"].items()} == bits["weights"]["bits"])
  assert set(u["act_bits"].values()) <= {6, 8}
  assert h["omega_act"] <= u["omega_act"] * (1 + 1e-12)
  for name in ("hawq_v2", "uniform"):
    r = rep["methods"][name]
    assert r["mAP"]["n"] == 1 and 0.0 <= r["mAP"]["mean"] <= 1.0
    assert os.path.isfile(os.path.join(wd, "finetune", name, "seed0", "result.json"))
  # Omega_act is the activation trace per element times the measured error.
  with open(os.path.join(wd, "analyze", "act_analysis.json")) as f:
    an = json.load(f)
  avg = np.array([an["traces"][l]["avg_trace"] for l in an["layers"]])
  np.testing.assert_allclose(an["omega"], avg[:, None] * np.array(an["errors"]), rtol=1e-12)
  # Every stage is cached: a re-run recomputes nothing and reports the same numbers.
  rep2 = detection.run_detection(cfg, wd, log=None, mesh=mesh)
  assert rep2["methods"]["hawq_v2"]["mAP"] == rep["methods"]["hawq_v2"]["mAP"]
  same = lambda t: {k: v for k, v in t.items() if k != "search"}  # noqa: E731 (re-run, cheap)
  assert same(rep2["timings"]) == same(rep["timings"])
  # A fine-tune whose result is lost resumes from its last Orbax checkpoint (the final
  # step): no training step runs and the evaluation gives the same mAP.
  os.remove(os.path.join(wd, "finetune", "uniform", "seed0", "result.json"))
  rep3 = detection.run_detection(cfg, wd, log=None, mesh=mesh)
  assert rep3["methods"]["uniform"]["mAP"] == rep["methods"]["uniform"]["mAP"]


def test_cli_train_routes_detection_configs(tmp_path):
  """`amq-jax train` on a detection config trains the detector and leaves the files the
  detection run continues from."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "amq_jax.cli", "train", "--config",
                        "configs/retinanet_fmnist_det.py:tiny", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "fp32" / "variables.msgpack").is_file()
  assert "test_mAP" in out.stdout or "mAP" in out.stdout
