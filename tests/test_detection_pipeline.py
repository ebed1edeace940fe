"""Detection is a task of the one pipeline: mixed-precision activations for RetinaNet.

The activation error helper is checked by hand on a tiny Linen model; one tiny
``pipeline.run`` of the detection config (module fixture) is checked end to end, and the
single commands (``analyze``, ``search``) work on that config as on any other.
"""
from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from amq_jax import adapters, pipeline, quant
from amq_jax.config import load_config
from amq_jax.pipeline import _stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "retinanet_fmnist_det.py") + ":tiny"


def _json(path):
  with open(path) as f:
    return json.load(f)


class _Twice(nn.Module):
  """``Dense`` ``shared`` applied to x and to relu(fc(x)): two calls, two inputs."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    shared = nn.Dense(3, name="shared")
    h = nn.relu(nn.Dense(3, name="fc")(x))
    return shared(x) + shared(h)


def test_activation_errors_by_hand():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3)).astype(np.float32)
  module = _Twice()
  v = module.init(jax.random.key(0), x)
  model = adapters.from_linen(module, v, x[:1])
  assert model.layers.names == ["fc", "shared"]  # execution order: fc runs first
  k, b = np.asarray(v["params"]["fc"]["kernel"]), np.asarray(v["params"]["fc"]["bias"])
  h = np.maximum(x @ k + b, 0.0)  # the second input of 'shared'
  ranges = {"fc": (-0.7, 1.2), "shared": (-1.5, 2.0)}  # both clip some values
  bits = (2, 4)
  batches = [{"image": x[:3]}, {"image": x[3:]}]
  got = _stages.activation_errors(model, batches, ranges, bits)

  def err(t, a, r):  # per-example ||Q_a(t) - t||^2
    q = np.asarray(quant.fake_quant_act(t, a, *r))
    return np.sum((q - t) ** 2, axis=1)

  want = np.zeros((2, 2))
  for j, a in enumerate(bits):
    want[0, j] = err(x, a, ranges["fc"]).sum() / len(x)
    # Two calls of one layer: the per-example errors of both inputs add up.
    want[1, j] = (err(x, a, ranges["shared"]) + err(h, a, ranges["shared"])).sum() / len(x)
  assert got.shape == (2, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert (got[:, 0] > got[:, 1]).all() and (got > 0).all()  # fewer bits, larger error


# The tiny config's 2 probes per layer leave most weight traces 'near_zero' (a Student-t
# interval with one degree of freedom contains 0); when all of them are, the search
# refuses, rightly, to rank layers by noise. Four probes tell the heads from zero, so the
# test does not hang on that margin; 'joint' estimates every layer with one compiled HVP
# instead of one per layer (24 here): about 35 s instead of 120 s of CPU.
OVERRIDES = ["hessian.min_probes=4", "hessian.max_probes=4", "hessian.estimator=joint"]


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
  """One complete ``pipeline.run`` of the tiny detection config."""
  cfg = load_config(CFG, OVERRIDES)
  wd = str(tmp_path_factory.mktemp("det") / "wd")
  return cfg, wd, pipeline.run(cfg, wd, progress=False)


def test_detection_run_end_to_end(det_run):
  cfg, wd, rep = det_run
  assert _json(os.path.join(wd, "report.json")) == json.loads(json.dumps(rep))
  assert rep["metric"] == "mAP"
  rows = {r["method"]: r for r in rep["methods"]}
  assert set(rows) == {"hawq_v2", "uniform_act"}
  for name, r in rows.items():
    assert r["sizes_agree"] is True, name
    assert 0.0 <= r["mAP"]["mean"] <= 1.0 and r["mAP"]["n"] == 1
    assert r["exported_mAP"] == r["mAP"]
    res = _json(os.path.join(wd, "finetune", name, "seed0", "result.json"))
    assert res["mAP"] == r["mAP"]["mean"] and res["act_bits"] == {
        l: c["a"] for l, c in rep["bits"][name].items()}
  assert 0.0 <= rep["fp32"]["mAP"] <= 1.0
  # The activation analysis: traces, calibrated ranges and errors of every layer's input.
  acts = _json(os.path.join(wd, "analyze", "activations.json"))
  layers = _json(os.path.join(wd, "analyze", "traces.json"))["layers"]
  assert acts["layers"] == list(layers) == list(rep["bits"]["hawq_v2"])
  assert acts["act_bit_choices"] == list(cfg.search.act_bit_choices)
  err = np.asarray(acts["errors"])
  assert err.shape == (len(layers), len(cfg.search.act_bit_choices))
  assert (np.diff(err, axis=1) <= 1e-12).all()  # more bits, no more error
  assert set(acts["ranges"]) == set(layers) and set(acts["traces"]) == set(layers)
  # Both methods: HAWQ-V2's weight bits; activation widths from the activation search
  # (Hessian-chosen vs uniform) at the same activation budget, first/last pinned.
  frontier = _json(os.path.join(wd, "search", "frontier.json"))
  act = frontier["activations"]
  assert act["budget"]["spec"] == cfg.search.act_budget
  h, u = rep["bits"]["hawq_v2"], rep["bits"]["uniform_act"]
  assert {l: c["w"] for l, c in h.items()} == {l: c["w"] for l, c in u.items()} == \
      frontier["weights"]["methods"]["hawq_v2"]["bits"]
  assert [h[l]["a"] for l in layers] == [act["methods"]["hawq_v2"]["bits"][l] for l in layers]
  assert [u[l]["a"] for l in layers] == [act["methods"]["uniform"]["bits"][l] for l in layers]
  first, last = list(layers)[0], list(layers)[-1]
  assert h[first]["a"] == h[last]["a"] == u[first]["a"] == u[last]["a"] == 8
  assert {u[l]["a"] for l in list(layers)[1:-1]} == {6}  # 'uniform:6'
  sizes = np.array([acts["traces"][l]["elems"] for l in layers], float)
  for m in ("hawq_v2", "uniform"):
    mem = float(np.dot(sizes, [act["methods"][m]["bits"][l] for l in layers]))
    assert mem <= act["budget"]["cost"] * (1 + 1e-12)
  assert rows["hawq_v2"]["omega_act"] <= rows["uniform_act"]["omega_act"] * (1 + 1e-12)
  st = _json(os.path.join(wd, "stages.json"))
  assert {"fp32", "analyze.traces", "analyze.activations", "search",
          "finetune/hawq_v2/seed0", "finetune/uniform_act/seed0"} <= set(st)
  assert all(rec["done"] for rec in st.values())


def test_analyze_and_search_commands_on_detection(det_run, tmp_path):
  cfg, run_wd, rep = det_run
  wd = str(tmp_path / "wd")
  shutil.copytree(run_wd, wd)
  before = _json(os.path.join(wd, "stages.json"))
  traces = pipeline.analyze(cfg, wd, progress=False)  # cached: the run's traces
  assert traces == _json(os.path.join(run_wd, "analyze", "traces.json"))
  assert _json(os.path.join(wd, "stages.json")) == before
  res = pipeline.search(cfg, wd, budget="avg:3", progress=False)
  assert res["weights"]["budget"]["spec"] == "avg:3"
  assert set(res["methods"]) == {"hawq_v2", "uniform_act"}
  assert res["methods"]["hawq_v2"]["avg_bits"] <= 3 + 1e-9
  assert "| " + list(traces["layers"])[0] + " |" in res["table"]
  after = _json(os.path.join(wd, "stages.json"))
  assert after["search"]["fingerprint"] != before["search"]["fingerprint"]
  for name in ("fp32", "analyze.traces", "analyze.activations"):
    assert after[name] == before[name]
