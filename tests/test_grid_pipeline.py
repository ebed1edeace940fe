"""``quant.grid`` through the pipeline: the integer grid the model deploys on reaches every
stage that quantizes (the search's Omega table, QAT, the packed export and its re-check),
the report names it, and changing it recomputes search and fine-tunes but not the analysis.

One module fixture runs the tiny config twice in one work directory: on amq's grid, then
with ``quant.grid=qwix`` (what a user who deploys with qwix sets). To stay fast it trains
and fine-tunes a few steps, measures traces only (no eigenvalues) and fine-tunes HAWQ-V2's
bits only.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import adapters, models, pipeline, quant, train
from amq_jax.config import load_config
from amq_jax.errors import StateError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "resnet20_fmnist.py") + ":tiny"
FAST = ("train.num_epochs=1.0", "train.checkpoint_every_steps=100", "hessian.max_probes=4",
        "finetune.num_steps=2", "finetune.checkpoint_every_steps=100", "test_limit=128")
ANALYSIS = ("fp32", "fp32_eval", "analyze.traces")
QUANTIZING = ("search", "finetune/hawq_v2/seed0")
# A few training steps leave the float model near chance; what is checked here is exact
# (grids, levels, fingerprints), not accuracy.
pytestmark = pytest.mark.filterwarnings("ignore::amq_jax.errors.NearChanceWarning")


def _cfg(*overrides):
  cfg = load_config(CFG, FAST + overrides)
  del cfg.hessian["eig_layers"]  # no eigenvalue stage: traces are the analysis here
  return cfg


def _json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("grid") / "wd")
  amq = pipeline.run(_cfg(), wd, progress=False, methods=("hawq_v2",))
  amq_stages = _json(wd, "stages.json")
  traces_mtime = os.stat(os.path.join(wd, "analyze", "traces.json")).st_mtime_ns
  qwix = pipeline.run(_cfg("quant.grid=qwix"), wd, progress=False, methods=("hawq_v2",))
  return wd, amq, amq_stages, traces_mtime, qwix


def test_qwix_run_end_to_end_exports_qwix_levels_that_evaluate_the_same(runs):
  wd, amq, _, _, rep = runs
  assert amq["grid"] == "amq" and rep["grid"] == "qwix"
  assert "Integer grid: **qwix**" in open(os.path.join(wd, "report.md")).read()
  assert _json(wd, "search", "frontier.json")["grid"] == "qwix"
  for row in rep["methods"]:
    name = row["method"]
    res = _json(wd, "finetune", name, "seed0", "result.json")
    assert res["grid"] == "qwix" and res["bits"] == {
        l: c["w"] for l, c in rep["bits"][name].items()}
    assert set(res["bits"].values()) <= {2, 3, 4, 8}
    # The packed file says its grid, loads back, and evaluates as the fine-tuned model did.
    assert row["sizes_agree"] is True
    assert res["exported_accuracy"] == res["accuracy"] and 0.0 <= res["accuracy"] <= 1.0
    path = os.path.join(wd, "finetune", name, "seed0", "model.amq")
    header, start = quant.read_header(path)
    assert header["grid"] == "qwix"
    params = quant.load_packed(path, grid="qwix")
    assert jax.tree.leaves(params) and all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))
    with pytest.raises(StateError, match="'qwix' grid, not 'amq'"):
      quant.load_packed(path, grid="amq")
    # qwix's grid uses the level -2^(b-1) that amq's symmetric grid leaves out.
    payload = open(path, "rb").read()[start:]
    lowest = {}
    for e in header["entries"]:
      if e["kind"] == "quant":
        n = int(np.prod(e["shape"]))
        q = quant.unpack(payload[e["levels"][0]:sum(e["levels"])], e["bits"], n, e["signed"])
        lowest[e["layer"]] = (int(q.min()), -(2 ** (e["bits"] - 1)))
    assert all(lo >= bound for lo, bound in lowest.values())
    assert any(lo == bound for lo, bound in lowest.values()), lowest


def test_omega_errors_follow_the_grid(runs):
  """At 2 bits qwix has 4 levels and amq 3, so the errors differ; the qwix run's search
  weighed qwix's errors (its recorded Omega is the qwix table's, not amq's)."""
  wd, amq, _, _, rep = runs
  cfg = _cfg()
  module = models.get_model(cfg.model, **cfg.model_kwargs.to_dict())
  sample = jnp.zeros((1,) + tuple(cfg.input_shape), jnp.float32)
  model = adapters.from_linen(module, train.restore_variables(
      os.path.join(wd, "fp32", "variables.msgpack")), sample)
  traces = _json(wd, "analyze", "traces.json")
  pb = {g: pipeline.weight_problem(model, traces, None, cfg.search, grid=g)
        for g in ("amq", "qwix")}
  j2 = list(cfg.search.bit_choices).index(2)
  e_amq, e_qwix = pb["amq"].errors[:, j2], pb["qwix"].errors[:, j2]
  assert np.all(np.abs(e_qwix - e_amq) > 1e-6 * e_amq)
  want = [float(quant.quant_error(_kernel(model, l), 2, axis=-1, grid="qwix"))
          for l in model.layers.names]
  np.testing.assert_allclose(e_qwix, want, rtol=1e-6)
  for name, report in (("amq", amq), ("qwix", rep)):
    bits = [c["w"] for c in report["bits"]["hawq_v2"].values()]
    row = {r["method"]: r for r in report["methods"]}["hawq_v2"]
    assert row["omega"] == pytest.approx(pb[name].omega_of(bits), rel=1e-9)
  qbits = [c["w"] for c in rep["bits"]["hawq_v2"].values()]
  assert pb["qwix"].omega_of(qbits) != pytest.approx(pb["amq"].omega_of(qbits), rel=1e-6)


def _kernel(model, layer):
  from amq_jax import _paths
  return _paths.select(model.params, [model.layers[layer].param])[model.layers[layer].param]


def test_switching_grid_recomputes_search_and_finetunes_not_the_analysis(runs):
  wd, _, before, traces_mtime, rep = runs
  st = rep["stages"]
  for name in ANALYSIS:
    assert st[name]["reused"] and st[name]["fingerprint"] == before[name]["fingerprint"], name
  assert os.stat(os.path.join(wd, "analyze", "traces.json")).st_mtime_ns == traces_mtime
  for name in QUANTIZING:
    assert not st[name]["reused"], name
    assert st[name]["fingerprint"] != before[name]["fingerprint"], name


def test_bad_grid_is_one_line_exit_2(tmp_path, capsys):
  from amq_jax import cli
  wd = str(tmp_path / "wd")
  rc = cli.main(["search", "--config", CFG, "--workdir", wd, "--config.quant.grid=tflite"])
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert rc == 2 and len(err) == 1, err
  assert "quant.grid = 'tflite'" in err[0] and "'amq', 'qwix'" in err[0]
  # widths qwix has no integer type for are named before any work
  rc = cli.main(["search", "--config", CFG, "--workdir", wd, "--config.quant.grid=qwix",
                 "--config.search.bit_choices=(1,2,4,8)"])
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert rc == 2 and len(err) == 1, err
  assert "search.bit_choices" in err[0] and "[1]" in err[0] and "int2..int8" in err[0]
  assert not os.path.exists(os.path.join(wd, "stages.json"))


def test_qwix_grid_fake_quant_is_what_qwix_runs():
  """``quantize_model(..., grid='qwix')``, the forward pass the pipeline fine-tunes and
  evaluates, equals qwix's own QAT forward (weights and per-example inputs)."""
  qwix = pytest.importorskip("qwix")
  import flax.linen as nn

  class ConvDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
      return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))

  module, x = ConvDense(), jax.random.normal(jax.random.key(0), (3, 6, 6, 2))
  v = module.init(jax.random.key(1), x)
  bits = quant.BitConfig({"conv": {"w": 6, "a": 8}, "fc": {"w": 3, "a": 5}})
  qm = qwix.quantize_model(module, qwix.QtProvider(
      quant.to_qwix_rules(bits, provider="qt", params=v, platform="cpu")))
  want = qm.apply(v, x)
  model = adapters.from_linen(module, v, x)
  got, _ = quant.quantize_model(model, bits, grid="qwix")(model.params, model.state, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  ranges = quant.calibrate_model(model, [x], bits)
  amq, _ = quant.quantize_model(model, bits, act_ranges=ranges)(model.params, model.state, x)
  assert float(jnp.max(jnp.abs(amq - want))) > 1e-4
  # The activation Omega's errors use the same per-example quantizer on qwix's grid.
  from amq_jax.pipeline._stages import activation_errors
  errs = {g: activation_errors(model, [{"image": x}], ranges, (4, 8), grid=g)
          for g in ("amq", "qwix")}
  conv_in = x.astype(jnp.float32)
  want_conv = [float(jnp.sum((quant.fake_quant(conv_in, b, axis=0, grid="qwix") - conv_in) ** 2))
               / x.shape[0] for b in (4, 8)]
  np.testing.assert_allclose(errs["qwix"][0], want_conv, rtol=1e-5)
  assert not np.allclose(errs["qwix"], errs["amq"])
