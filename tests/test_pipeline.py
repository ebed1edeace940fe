"""End to end on a slice of Fashion-MNIST with a tiny model: run, resume, errors, export."""
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from amq_jax import pipeline, quant, train
from amq_jax.config import load_config

CFG = "configs/resnet20_fmnist.py:tiny"
CLI = [sys.executable, "-m", "amq_jax.cli"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """One complete `amq-jax run` of the tiny config (through the real CLI)."""
  wd = tmp_path_factory.mktemp("run")
  out = subprocess.run(CLI + ["run", "--config", CFG, "--workdir", str(wd),
                              "--config.progress=False"], capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return wd


def test_run_end_to_end(run_dir):
  report = json.loads((run_dir / "report.json").read_text())
  rows = {r["method"]: r for r in report["methods"]}
  assert set(rows) == {"hawq_v2", "uniform"}
  hv2, uni = rows["hawq_v2"], rows["uniform"]
  # HAWQ-V2's configuration fits the budget (the size of uniform 3-bit) and has the least
  # Omega among configurations of its size, so no more than uniform's.
  assert hv2["size_mb"] <= report["budget"]["size_mb"] + 1e-9
  assert hv2["omega"] <= uni["omega"] + 1e-12
  bits = set(report["bits"]["hawq_v2"].values())
  assert len(bits) > 1, "expected a mixed-precision configuration"
  for r in rows.values():
    assert r["payload_bytes"] == r["computed_bytes"]
    assert r["exported_accuracy"] == pytest.approx(r["accuracy"], abs=1e-9)
    assert 0.0 <= r["accuracy"] <= 1.0
  for f in ("frontier.png", "bits.png", "accuracy_vs_size.png", "top_eigenvalues.png"):
    assert (run_dir / "figures" / f).stat().st_size > 1000
  md = (run_dir / "report.md").read_text()
  assert "| hawq_v2 |" in md and "| uniform |" in md
  traces = json.loads((run_dir / "analyze" / "traces.json").read_text())["layers"]
  assert list(traces)[0] == "stem_conv/kernel" and len(traces) == 10


def test_rerun_skips_finished_stages(run_dir):
  before = {p: os.path.getmtime(run_dir / p) for p in
            ("analyze/traces.json", "finetune/hawq_v2/result.json", "fp32/variables.msgpack")}
  t0 = time.time()
  out = subprocess.run(CLI + ["run", "--config", CFG, "--workdir", str(run_dir),
                              "--config.progress=False"], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  for p, m in before.items():
    assert os.path.getmtime(run_dir / p) == m, f"{p} was recomputed"
  assert "hawq_v2" in out.stdout
  (run_dir / "report.md").unlink()
  out = subprocess.run(CLI + ["report", "--config", CFG, "--workdir", str(run_dir)],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| hawq_v2 |" in (run_dir / "report.md").read_text()
  for p, m in before.items():
    assert os.path.getmtime(run_dir / p) == m


def test_exported_model_evaluates_identically(run_dir):
  cfg = load_config(CFG)
  ctx = pipeline.Context(cfg, str(run_dir), train_if_missing=False, progress=False)
  path = run_dir / "finetune" / "hawq_v2" / "model.amq"
  variables, bits, ranges = pipeline.load_exported(str(path))
  result = json.loads((run_dir / "finetune" / "hawq_v2" / "result.json").read_text())
  ev = ctx.evaluate(pipeline.qat_apply_fn(ctx.model, bits, ranges), variables)
  assert ev["accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-9)
  assert os.path.getsize(path) == result["export"]["file_bytes"]
  # The packed file is smaller than float32 storage of the same params by > 4x on kernels.
  assert result["export"]["payload_bytes"] < 0.5 * 4 * sum(
      np.size(x) for x in jax.tree.leaves(variables["params"]))


def test_search_budget_errors(run_dir, tmp_path):
  base = CLI + ["search", "--config", CFG, "--workdir", str(run_dir)]
  out = subprocess.run(base + ["--budget", "0.0001MB"], capture_output=True, text=True)
  assert out.returncode == 2 and "below the smallest feasible model" in out.stderr
  assert "feasible sizes are [" in out.stderr
  out = subprocess.run(base + ["--budget", "lots"], capture_output=True, text=True)
  assert out.returncode == 2 and "cannot parse budget" in out.stderr
  out = subprocess.run(base + ["--avg-bits", "4"], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "| stem_conv |" in out.stdout


def test_bits_file_with_unknown_layer(run_dir, tmp_path):
  bad = tmp_path / "bits.json"
  bad.write_text(json.dumps({"stem_conv": {"w": 4, "a": 8}, "no_such/conv": {"w": 4, "a": 8}}))
  out = subprocess.run(CLI + ["finetune", "--config", CFG, "--workdir", str(run_dir),
                              "--bits", str(bad)], capture_output=True, text=True)
  assert out.returncode == 2
  assert "no_such/conv" in out.stderr and "stage1_block1/conv1" in out.stderr


def test_missing_checkpoint(tmp_path):
  out = subprocess.run(CLI + ["analyze", "--config", CFG, "--workdir", str(tmp_path)],
                       capture_output=True, text=True)
  assert out.returncode == 2 and "amq-jax train" in out.stderr


def test_finetune_resume_after_kill(run_dir, tmp_path):
  """Kill `amq-jax finetune` mid-way, restart, compare with the uninterrupted fine-tune."""
  wd = tmp_path / "wd"
  shutil.copytree(run_dir / "fp32", wd / "fp32")
  shutil.copytree(run_dir / "search", wd / "search")
  args = CLI + ["finetune", "--config", CFG, "--workdir", str(wd), "--config.progress=False",
                "--config.finetune.num_epochs=3", "--config.checkpoint_every_steps=2"]
  clean = subprocess.run(args + ["--name", "clean"], capture_output=True, text=True, timeout=600)
  assert clean.returncode == 0, clean.stderr[-2000:]
  proc = subprocess.Popen(args + ["--name", "killed"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  ck = wd / "finetune" / "killed" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ck.exists() and any(p.name.isdigit() and int(p.name) >= 10 for p in ck.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "fine-tuning ended before it could be killed"
  proc.kill()
  proc.wait()
  assert not (wd / "finetune" / "killed" / "result.json").exists()
  again = subprocess.run(args + ["--name", "killed"], capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  a = quant.load_packed(str(wd / "finetune" / "clean" / "model.amq"))
  b = quant.load_packed(str(wd / "finetune" / "killed" / "model.amq"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
