"""hessian.compare: a second curvature measured beside the first, on the tiny config.

Issue 10: with the GGN as the default, the Hessian stays one flag away and the report shows
both side by side: the rank correlation of the layers' traces and whether the chosen bits
differ. One work directory (module fixture) is searched without the comparison, then with
``hessian.compare=hessian``; every check is against figures computed here independently
from the files the run left.
"""
import json
import os
import shutil

import numpy as np
import pytest
from scipy.stats import spearmanr

from amq_jax import cli, hessian, pipeline
from amq_jax.config import load_config, validate_config
from amq_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs/resnet20_fmnist.py:tiny")
COMPARE = ("hessian.compare=hessian", "hessian.compare_max_probes=4")
# Fewer compilations than the tiny config (the checks here are of the comparison, not of
# training or eigenvalues): a few FP32 steps, one trace batch, one power step per layer.
FAST = ("train.num_steps=4", "hessian.num_examples=64", "hessian.top1_method=power",
        "hessian.top1_iters=1", "hessian.eig_layers=()", "hessian.estimator=joint")


def _cfg(*overrides):
  return load_config(CFG, list(FAST + overrides))


def _json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


def _mtimes(wd):
  out = {}
  for top in ("analyze", "search"):
    for dirpath, _, names in os.walk(os.path.join(wd, top)):
      for n in names:
        p = os.path.join(dirpath, n)
        out[os.path.relpath(p, wd)] = os.stat(p).st_mtime_ns
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The tiny config searched without the comparison, then with it, then reported."""
  wd = str(tmp_path_factory.mktemp("compare") / "wd")
  pipeline.search(_cfg(), wd, progress=False)
  before = (_json(wd, "stages.json"), _mtimes(wd))
  res = pipeline.search(_cfg(*COMPARE), wd, progress=False)
  report = pipeline.report(_cfg(*COMPARE), wd)
  return wd, before, res, report


def test_second_traces_and_rank_correlation(run):
  wd, _, res, _ = run
  main = _json(wd, "analyze", "traces.json")
  other = _json(wd, "analyze", "traces_hessian.json")
  cc = _json(wd, "search", "curvature_compare.json")
  assert main["curvature"] == "ggn" and other["curvature"] == "hessian"
  assert list(other["layers"]) == list(main["layers"])
  # compare_max_probes=4 caps the probes (min_probes 4 of the section: exactly 4 each)
  assert [e["probes"] for e in other["layers"].values()] == [4] * len(main["layers"])
  names = list(main["layers"])
  for key, field in (("spearman_trace", "trace"), ("spearman_avg_trace", "avg_trace")):
    want = spearmanr([main["layers"][l][field] for l in names],
                     [other["layers"][l][field] for l in names]).statistic
    assert cc[key] == pytest.approx(want, abs=1e-12), key
  for l in names:
    row = cc["layers"][l]
    assert row["trace"] == {"ggn": main["layers"][l]["trace"],
                            "hessian": other["layers"][l]["trace"]}
    assert row["ratio"] == pytest.approx(other["layers"][l]["trace"] / main["layers"][l]["trace"])
    assert row["status"]["hessian"] == other["layers"][l]["status"]
  assert res["curvature_compare"] == cc


def test_bits_each_curvature_picks(run):
  wd, _, _, _ = run
  cfg = _cfg(*COMPARE)
  cc = _json(wd, "search", "curvature_compare.json")
  model = pipeline.build(cfg, wd, progress=False).model
  sc = cfg.search
  # The GGN pick is the search's own HAWQ-V2 configuration ...
  ggn = _json(wd, "search", "methods", "hawq_v2.json")["bits"]
  # ... and the Hessian's comes from the Python API on the Hessian's Omega sensitivities.
  sens = hessian.sensitivity_traces(_json(wd, "analyze", "traces_hessian.json")["layers"])
  _, info = pipeline.auto_bits(model, sens.avg_traces, budget=sc.budget,
                               bit_choices=sc.bit_choices, pin_first_last=sc.pin_first_last,
                               act_bits=sc.act_bits, symmetric=sc.symmetric)
  hes = info["bits"]
  assert cc["picks"]["ggn"]["bits"] == ggn and cc["picks"]["hessian"]["bits"] == hes
  differ = [l for l in model.layers.names if ggn[l] != hes[l]]
  assert cc["layers_differ"] == len(differ) and cc["differ"] == differ
  assert {l: r["bits"] for l, r in cc["layers"].items()} == {
      l: {"ggn": ggn[l], "hessian": hes[l]} for l in ggn}
  # Each pick is the least-Omega one under its own curvature, at the same budget.
  om = {c: cc["picks"][c]["omega"] for c in ("ggn", "hessian")}
  assert om["ggn"]["ggn"] <= om["hessian"]["ggn"] * (1 + 1e-12)
  assert om["hessian"]["hessian"] <= om["ggn"]["hessian"] * (1 + 1e-12)
  assert om["hessian"]["hessian"] == pytest.approx(info["omega"], rel=1e-12)


def test_report_shows_both(run):
  wd, _, _, report = run
  cc = _json(wd, "search", "curvature_compare.json")
  md = open(os.path.join(wd, "report.md")).read()
  assert "## Curvature: GGN vs Hessian" in md
  assert f"another width for {cc['layers_differ']} of 10 layers" in md
  assert f"{cc['spearman_trace']:.4g} (traces)" in md
  assert _json(wd, "report.json")["curvature_compare"] == cc == report["curvature_compare"]


def test_toggling_compare_recomputes_no_main_stage(run, tmp_path):
  wd, (stages0, mtimes0), _, _ = run
  stages1 = _json(wd, "stages.json")
  for name in ("fp32", "analyze.traces", "analyze.eigenvalues", "search"):
    assert stages1[name] == stages0[name], name  # same fingerprint, same finish time
  mtimes1 = _mtimes(wd)
  assert {p: mtimes1[p] for p in mtimes0} == mtimes0, "a main stage file was rewritten"
  assert {"analyze.traces_hessian", "search.curvature_compare"} <= set(stages1)
  # Off again (on a copy): nothing is recomputed and the report has no comparison.
  off = str(tmp_path / "wd")
  shutil.copytree(wd, off)
  res = pipeline.search(_cfg(), off, progress=False)
  report = pipeline.report(_cfg(), off)
  assert "curvature_compare" not in res and "curvature_compare" not in report
  assert "## Curvature:" not in open(os.path.join(off, "report.md")).read()
  assert _mtimes(off) == _mtimes(wd) and _json(off, "stages.json") == stages1
  # On again: the saved comparison is reused, and the report shows it again.
  res = pipeline.search(_cfg(*COMPARE), off, progress=False)
  assert res["curvature_compare"] == _json(wd, "search", "curvature_compare.json")
  assert _mtimes(off) == _mtimes(wd) and _json(off, "stages.json") == stages1
  pipeline.report(_cfg(*COMPARE), off)
  assert "## Curvature: GGN vs Hessian" in open(os.path.join(off, "report.md")).read()


def test_analyze_json_includes_the_comparison(run, capsys):
  wd, _, _, _ = run
  rc = cli.main(["analyze", "--config", CFG, "--workdir", wd, "--json"]
                + [f"--config.{o}" for o in FAST + COMPARE])
  out, err = capsys.readouterr()
  assert rc == 0, err
  got = json.loads(out)["result"]["compare"]
  cc = _json(wd, "search", "curvature_compare.json")
  assert got["curvature"] == "ggn" and got["compare"] == "hessian"
  assert got["spearman_trace"] == cc["spearman_trace"]
  assert got["layers"].keys() == cc["layers"].keys()


@pytest.mark.parametrize("override, words", [
    ("hessian.compare=ggn", ("hessian.compare = 'ggn'", "hessian.curvature = 'ggn'",
                             "'hessian'", "'fisher'")),
    ("hessian.compare=laplace", ("hessian.compare = 'laplace'", "'hessian', 'ggn', 'fisher'")),
    ("hessian.compare_max_probes=0", ("hessian.compare_max_probes = 0", "integer >= 1")),
])
def test_bad_compare_is_one_line_exit_2(override, words, tmp_path, capsys):
  rc = cli.main(["analyze", "--config", CFG, "--workdir", str(tmp_path / "wd"),
                 f"--config.{override}"])
  out, err = capsys.readouterr()
  assert rc == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "ConfigError" not in lines[0]
  for w in words:
    assert w in lines[0], (w, lines[0])
  assert not os.path.exists(tmp_path / "wd" / "analyze")  # rejected before any work


def test_python_config_checked_too():
  cfg = _cfg()
  cfg.hessian.compare = "ggn"
  with pytest.raises(ConfigError, match="hessian.compare"):
    validate_config(cfg)


def test_spearman_ties_and_constants():
  from amq_jax.pipeline._stages import spearman
  x, y = [1.0, 2.0, 2.0, 5.0], [3.0, 1.0, 4.0, 4.0]
  assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
  assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
  assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_exact_ggn_method_and_auto_rule(run, tmp_path):
  """hessian.ggn_method='exact' writes the exact GGN traces (equal to hessian.exact_ggn_traces
  computed here), every layer converged with no sampling error; 'auto' picks exact only when
  the classes (10) are no more than min_probes."""
  from amq_jax.pipeline import _commands, _stages
  wd = str(tmp_path / "wd")
  shutil.copytree(run[0], wd)
  cfg = _cfg("hessian.ggn_method=exact")
  pipeline.analyze(cfg, wd, progress=False)
  tr = _json(wd, "analyze", "traces.json")
  assert tr["curvature"] == "ggn" and tr["estimator"].startswith("exact")
  assert {l["status"] for l in tr["layers"].values()} <= {"converged", "near_zero"}
  assert all(l["stderr"] == 0 for l in tr["layers"].values())
  exp = _commands.build(cfg, wd, progress=False)
  batches = exp.task.first_batches(cfg.hessian.num_examples, cfg.hessian.batch_size)
  want = hessian.exact_ggn_traces(exp.task.logits_fn(exp.model), exp.model.params, batches)
  for rec in tr["layers"].values():
    np.testing.assert_allclose(rec["trace"], want[rec["param"]].trace, rtol=1e-5)
  logits_fn = exp.task.logits_fn(exp.model)
  assert _stages.ggn_exact_is_cheaper(exp.model, logits_fn, batches, 10)
  assert not _stages.ggn_exact_is_cheaper(exp.model, logits_fn, batches, 9)
  with pytest.raises(ConfigError, match="ggn_method"):
    validate_config(_cfg("hessian.ggn_method=closed_form"))
