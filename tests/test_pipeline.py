"""The one pipeline end to end on the tiny config: report, stage cache, errors, resume.

One complete ``pipeline.run`` (module fixture) is shared; every test that changes
something works on its own copy of that work directory, so the tests stay independent.
What the stage cache must guarantee (issue 13): a re-run recomputes nothing; a changed
setting recomputes exactly the stages that read it (and what reads those); no report
ever pairs the bits of one configuration with the accuracy of another.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from amq_jax import pipeline, quant
from amq_jax.config import load_config
from amq_jax.errors import BitsError, BudgetError, WorkdirError

CFG = "configs/resnet20_fmnist.py:tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = ("fp32", "fp32_eval", "analyze.traces", "analyze.eigenvalues")
FINETUNES = ("finetune/hawq_v2/seed0", "finetune/uniform/seed0")


def _cfg(*overrides):
  return load_config(os.path.join(ROOT, CFG), list(overrides))


def _json(path):
  with open(path) as f:
    return json.load(f)


def _stages(wd):
  return _json(os.path.join(wd, "stages.json"))


def _files(wd, under=("fp32", "analyze", "search", "finetune")):
  """{relative path: (mtime_ns, bytes)} of every stage file (not the report)."""
  out = {}
  for top in under:
    for dirpath, _, names in os.walk(os.path.join(wd, top)):
      for n in names:
        p = os.path.join(dirpath, n)
        with open(p, "rb") as f:
          out[os.path.relpath(p, wd)] = (os.stat(p).st_mtime_ns, f.read())
  return out


def _rows(report):
  return {r["method"]: r for r in report["methods"]}


def _result(wd, method, seed=0):
  return _json(os.path.join(wd, "finetune", method, f"seed{seed}", "result.json"))


def _assert_report_pairs_its_own_runs(wd, report):
  """Every row's accuracy is the mean over fine-tunes of exactly the row's bits."""
  for name, row in _rows(report).items():
    want = {l: c["w"] for l, c in report["bits"][name].items()}
    if row["accuracy"] is None:
      continue
    accs = []
    for s in row["seeds"]:
      res = _result(wd, name, s)
      assert res["bits"] == want, f"{name} seed {s}: report bits != fine-tuned bits"
      accs.append(res["accuracy"])
    assert row["accuracy"]["mean"] == pytest.approx(np.mean(accs), abs=1e-12)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """One complete ``pipeline.run`` of the tiny config (FP32 training included)."""
  wd = str(tmp_path_factory.mktemp("run") / "wd")
  report = pipeline.run(_cfg(), wd, progress=False)
  return wd, report


@pytest.fixture
def copy_of(run_dir, tmp_path):
  """A private copy of the fixture's work directory (timestamps kept)."""
  wd = str(tmp_path / "wd")
  shutil.copytree(run_dir[0], wd)
  return wd


def test_run_end_to_end(run_dir):
  wd, report = run_dir
  assert _json(os.path.join(wd, "report.json")) == json.loads(json.dumps(report))
  rows = _rows(report)
  assert set(rows) == {"hawq_v2", "uniform"} and report["metric"] == "accuracy"
  # Every stage that iterates leaves JSON-lines metrics: analyze one line per layer.
  with open(os.path.join(wd, "analyze", "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  assert [l["layer"] for l in lines][0] == "stem_conv" and len(lines) == 10
  assert all(l["status"] in ("converged", "max_probes", "negative", "near_zero") for l in lines)
  hv2, uni = rows["hawq_v2"], rows["uniform"]
  frontier = _json(os.path.join(wd, "search", "frontier.json"))
  w = frontier["weights"]
  # HAWQ-V2 fits the budget (the size of uniform 3 bits) with no more Omega than uniform.
  assert report["budget"]["spec"] == "uniform:3" and report["budget"]["axis"] == "size"
  size_bits = {m: frontier["methods"][m]["size_bits"] for m in rows}
  assert size_bits["hawq_v2"] <= report["budget"]["cost"] + 1e-9
  assert size_bits["uniform"] <= report["budget"]["cost"] + 1e-9
  assert hv2["size_mb"] <= uni["size_mb"] + 1e-12
  assert hv2["omega"] <= uni["omega"] + 1e-15
  assert len({c["w"] for c in report["bits"]["hawq_v2"].values()}) > 1, "not mixed precision"
  assert {c["w"] for c in report["bits"]["uniform"].values()} == {3, 8}  # pinned ends at 8
  for name, r in rows.items():
    res = _result(wd, name)
    assert r["sizes_agree"] is True
    assert res["export"]["payload_bytes"] == res["export"]["computed_bytes"]
    amq = os.path.join(wd, "finetune", name, "seed0", "model.amq")
    assert os.path.getsize(amq) == res["export"]["file_bytes"] == r["file_bytes"]
    assert res["exported_accuracy"] == res["accuracy"]
    assert r["exported_accuracy"] == r["accuracy"]
    assert r["accuracy"]["mean"] == res["accuracy"] and 0.0 <= res["accuracy"] <= 1.0
    assert r["seeds"] == [0] and res["bits"] == {l: c["w"] for l, c in
                                                 report["bits"][name].items()}
  assert report["fp32"] == _json(os.path.join(wd, "fp32", "eval.json"))
  for f in ("figures/frontier.png", "figures/bits.png", "search/frontier.png",
            "analyze/eigenvalues.png"):
    assert os.path.getsize(os.path.join(wd, f)) > 1000, f
  md = open(os.path.join(wd, "report.md")).read()
  assert "| hawq_v2 |" in md and "| uniform |" in md and "## Stages" in md
  # Execution order everywhere: the stem first, the classifier last.
  layers = list(_json(os.path.join(wd, "analyze", "traces.json"))["layers"])
  assert layers[0] == "stem_conv" and layers[-1] == "head" and len(layers) == 10
  assert w["layers"] == layers and list(report["bits"]["hawq_v2"]) == layers
  assert list(report["trace_status"]) == layers
  assert w["pinned"] == {"stem_conv": 8, "head": 8}
  # Stage records: every stage, with a fingerprint, finished.
  st = _stages(wd)
  assert set(UPSTREAM + FINETUNES + ("search",)) <= set(st)
  for name, rec in st.items():
    assert rec["done"] is True and len(rec["fingerprint"]) == 16 and rec["seconds"] >= 0, name
    assert report["stages"][name]["fingerprint"] == rec["fingerprint"]
    assert report["stages"][name]["reused"] is False
  snap = _json(os.path.join(wd, "config.json"))
  assert snap["search"]["budget"] == "uniform:3" and snap["model"] == "resnet_tiny"


def test_rerun_reuses_every_stage(copy_of, run_dir):
  wd = copy_of
  files, stages = _files(wd), _stages(wd)
  report = pipeline.run(_cfg(), wd, progress=False)
  assert _files(wd) == files, "a stage file was rewritten"
  assert _stages(wd) == stages
  assert all(s["reused"] for s in report["stages"].values()), report["stages"]
  assert report["methods"] == run_dir[1]["methods"]
  assert "| fp32 |" in open(os.path.join(wd, "report.md")).read()
  # The report alone rebuilds the same table from the finished stages.
  os.unlink(os.path.join(wd, "report.md"))
  again = pipeline.report(_cfg(), wd)
  assert again["methods"] == report["methods"] and _files(wd) == files
  assert os.path.isfile(os.path.join(wd, "report.md"))


def test_changed_budget_recomputes_search_and_finetune_only(copy_of, run_dir):
  """'avg:3.5' lets HAWQ-V2 widen some layers; uniform 4 bits does not fit, so uniform stays
  at 3 bits and its fine-tune (same bits, same settings) is legitimately reused."""
  wd, (_, old) = copy_of, run_dir
  before, files = _stages(wd), _files(wd, under=("fp32", "analyze"))
  cfg = _cfg("search.budget=avg:3.5")
  res = pipeline.search(cfg, wd, progress=False)
  new_bits = {l: c["w"] for l, c in res["methods"]["hawq_v2"]["config"].items()}
  old_bits = {l: c["w"] for l, c in old["bits"]["hawq_v2"].items()}
  assert new_bits != old_bits and res["weights"]["budget"]["spec"] == "avg:3.5"
  assert res["methods"]["hawq_v2"]["avg_bits"] <= 3.5 + 1e-9
  assert _files(wd, under=("fp32", "analyze")) == files  # FP32 and analyze reused
  after = _stages(wd)
  assert after["search"]["fingerprint"] != before["search"]["fingerprint"]
  for name in UPSTREAM:
    assert after[name] == before[name], name
  # Before fine-tuning: the report shows the new bits with NO accuracy (never the old one).
  rep = pipeline.report(cfg, wd)
  assert _rows(rep)["hawq_v2"]["accuracy"] is None and _rows(rep)["hawq_v2"]["seeds"] == []
  assert {l: c["w"] for l, c in rep["bits"]["hawq_v2"].items()} == new_bits
  assert _rows(rep)["uniform"]["accuracy"] == _rows(old)["uniform"]["accuracy"]
  # The run fine-tunes the new HAWQ-V2 bits and nothing else.
  rep = pipeline.run(cfg, wd, progress=False)
  st = rep["stages"]
  assert {k for k, v in st.items() if not v["reused"]} == {"finetune/hawq_v2/seed0"}
  assert st["finetune/hawq_v2/seed0"]["fingerprint"] != before["finetune/hawq_v2/seed0"][
      "fingerprint"]
  assert st["finetune/uniform/seed0"]["fingerprint"] == before["finetune/uniform/seed0"][
      "fingerprint"]
  assert _result(wd, "hawq_v2")["bits"] == new_bits
  # Trained here (train_loss is only absent when a checkpoint of the end was resumed).
  assert "train_loss" in _result(wd, "hawq_v2")["train"]
  _assert_report_pairs_its_own_runs(wd, rep)


def test_changed_finetune_setting_recomputes_finetunes_only(copy_of, run_dir):
  wd = copy_of
  before = _stages(wd)
  old_pack = quant.load_packed(os.path.join(wd, "finetune", "hawq_v2", "seed0", "model.amq"))
  rep = pipeline.run(_cfg("finetune.learning_rate=0.03"), wd, progress=False)
  st = rep["stages"]
  assert {k for k, v in st.items() if not v["reused"]} == set(FINETUNES)
  for name in UPSTREAM + ("search",):
    assert _stages(wd)[name] == before[name], name
  for name in FINETUNES:
    assert st[name]["fingerprint"] != before[name]["fingerprint"]
  new_pack = quant.load_packed(os.path.join(wd, "finetune", "hawq_v2", "seed0", "model.amq"))
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(old_pack), jax.tree.leaves(new_pack))), \
      "same weights: the old checkpoints were resumed"
  assert rep["bits"] == run_dir[1]["bits"]
  _assert_report_pairs_its_own_runs(wd, rep)


def test_changed_hessian_setting_recomputes_analyze_and_downstream(copy_of, run_dir):
  wd, (_, old) = copy_of, run_dir
  before = _stages(wd)
  old_traces = _json(os.path.join(wd, "analyze", "traces.json"))["layers"]
  rep = pipeline.run(_cfg("hessian.seed=1"), wd, progress=False)
  st = rep["stages"]
  assert st["fp32"]["reused"] and st["fp32_eval"]["reused"]
  for name in ("analyze.traces", "analyze.eigenvalues", "search"):
    assert not st[name]["reused"] and st[name]["fingerprint"] != before[name]["fingerprint"]
  new_traces = _json(os.path.join(wd, "analyze", "traces.json"))["layers"]
  assert list(new_traces) == list(old_traces)
  assert all(new_traces[l]["trace"] != old_traces[l]["trace"] for l in new_traces)
  # A fine-tune is reused exactly when its bits did not change (uniform's never do).
  assert st["finetune/uniform/seed0"]["reused"]
  same = rep["bits"]["hawq_v2"] == old["bits"]["hawq_v2"]
  assert st["finetune/hawq_v2/seed0"]["reused"] == same
  _assert_report_pairs_its_own_runs(wd, rep)


def test_new_finetune_seed_gets_its_own_directory(copy_of, run_dir):
  wd = copy_of
  cfg = _cfg("finetune.seeds=(1,)")
  res = pipeline.finetune(cfg, wd, progress=False)  # search/bits.json: HAWQ-V2's bits
  assert res["seed"] == 1 and res["method"] == "hawq_v2"
  assert os.path.isfile(os.path.join(wd, "finetune", "hawq_v2", "seed1", "model.amq"))
  assert _stages(wd)["finetune/hawq_v2/seed0"] == _stages(run_dir[0])["finetune/hawq_v2/seed0"]
  assert _result(wd, "hawq_v2", 0) == _result(run_dir[0], "hawq_v2", 0)
  rep = pipeline.report(cfg, wd)
  rows = _rows(rep)
  assert rows["hawq_v2"]["seeds"] == [1]
  assert rows["hawq_v2"]["accuracy"]["mean"] == res["accuracy"]
  assert rows["uniform"]["accuracy"] is None  # seed 1 of uniform was never fine-tuned
  _assert_report_pairs_its_own_runs(wd, rep)


def test_budget_outside_the_feasible_range(copy_of):
  wd = copy_of
  frontier = open(os.path.join(wd, "search", "frontier.json")).read()
  with pytest.raises(BudgetError, match=r"'avg:99'.*feasible average bits are \[2\.\d+, 8\]"):
    pipeline.search(_cfg(), wd, budget="avg:99", progress=False)
  with pytest.raises(BudgetError, match=r"'avg:1'.*feasible average bits are \[2\.\d+, 8\]"):
    pipeline.search(_cfg(), wd, budget="avg:1", progress=False)
  # A rejected budget leaves the previous search as it was.
  assert open(os.path.join(wd, "search", "frontier.json")).read() == frontier
  assert pipeline.report(_cfg(), wd)["methods"][0]["accuracy"] is not None


def test_bits_file_errors_and_unsafe_names(copy_of, tmp_path):
  wd = copy_of
  bad = tmp_path / "bits.json"
  bad.write_text(json.dumps({"stem_conv": {"w": 4, "a": 8}, "no_such/conv": {"w": 4, "a": 8}}))
  with pytest.raises(BitsError, match=r"(?s)no_such/conv.*stage1_block1/conv1.*head") as e:
    pipeline.finetune(_cfg(), wd, bits=str(bad), progress=False)
  assert str(bad) in str(e.value)
  for name in ("../x", "/tmp/x", "a/b"):
    with pytest.raises(WorkdirError, match="not a valid name"):
      pipeline.finetune(_cfg(), wd, name=name, progress=False)
  assert not os.path.exists(os.path.join(os.path.dirname(wd), "x"))
  assert sorted(os.listdir(os.path.join(wd, "finetune"))) == ["hawq_v2", "uniform"]


def test_killed_finetune_resumes_to_the_same_result(copy_of, run_dir):
  """The state a kill between the two checkpoints leaves (step 4 saved, the stage record
  started but not done, no result): the next call resumes from step 4 instead of clearing,
  and ends where the uninterrupted fine-tune ended."""
  wd = copy_of
  out = os.path.join(wd, "finetune", "hawq_v2", "seed0")
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4", "8"]
  shutil.rmtree(os.path.join(out, "checkpoints", "8"))
  kept = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in ("checkpoints/4",
                                                                 "act_ranges.json")}
  for f in ("result.json", "model.amq", "model.amq.state"):
    os.unlink(os.path.join(out, f))
  st = _stages(wd)
  st["finetune/hawq_v2/seed0"] = {"fingerprint": st["finetune/hawq_v2/seed0"]["fingerprint"],
                                  "done": False}
  with open(os.path.join(wd, "stages.json"), "w") as f:
    json.dump(st, f)
  res = pipeline.finetune(_cfg(), wd, progress=False)
  clean = _result(run_dir[0], "hawq_v2")
  assert res["train"]["steps"] == 8
  assert res["accuracy"] == pytest.approx(clean["accuracy"], abs=1e-9)
  assert res["export"]["file_bytes"] == clean["export"]["file_bytes"]
  a = quant.load_packed(os.path.join(run_dir[0], "finetune", "hawq_v2", "seed0", "model.amq"))
  b = quant.load_packed(os.path.join(out, "model.amq"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=1e-5, atol=1e-6)
  assert _stages(wd)["finetune/hawq_v2/seed0"]["done"] is True
  # Resumed, not restarted: step 4 and the calibrated ranges were kept, not rewritten.
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in kept} == kept
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4", "8"]
