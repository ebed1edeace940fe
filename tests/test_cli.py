"""The command line's conventions, tested in-process against a stand-in pipeline (so these
tests take milliseconds and do not depend on any stage): what each command passes to the
pipeline, --json, --strict, --debug, exit statuses, one-line errors and warnings,
out-of-memory advice. End-to-end runs of real stages are in tests/test_bad_inputs.py."""
import json
import os
import sys
import types
import warnings

import numpy as np
import pytest

import amq_jax
from amq_jax import cli, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "resnet20_fmnist.py") + ":tiny"


class FakePipeline(types.ModuleType):
  """Records each call; ``behaviour[command]`` returns a result or raises."""

  def __init__(self):
    super().__init__("amq_jax.pipeline")
    self.calls = []
    self.behaviour = {}
    for name in ("train", "analyze", "search", "finetune", "run", "report"):
      setattr(self, name, self._make(name))

  def _make(self, name):
    def fn(cfg, workdir, **kw):
      self.calls.append((name, cfg, workdir, kw))
      b = self.behaviour.get(name, {"stage": name})
      return b(cfg, workdir, **kw) if callable(b) else b
    return fn


@pytest.fixture
def fake(monkeypatch):
  f = FakePipeline()
  monkeypatch.setitem(sys.modules, "amq_jax.pipeline", f)
  monkeypatch.setattr(amq_jax, "pipeline", f, raising=False)
  return f


def run_cli(capsys, *args):
  rc = cli.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return rc, out, [l for l in err.splitlines() if l.strip()]


def base(cmd, tmp_path, *more):
  return [cmd, "--config", TINY, "--workdir", tmp_path / "wd", *more]


def test_version_and_help(capsys):
  rc, out, _ = run_cli(capsys, "--version")
  assert rc == 0 and out.strip() == f"amq-jax {amq_jax.__version__}"
  rc, out, _ = run_cli(capsys, "--help")
  assert rc == 0 and all(c in out for c in cli.COMMANDS)
  rc, out, _ = run_cli(capsys, "search", "--help")
  assert rc == 0 and "--avg-bits" in out and "--bops" in out and "--json" in out


@pytest.mark.parametrize("flags,budget", [
    ([], None), (["--budget", "0.08MB"], "0.08MB"), (["--avg-bits", "3"], "avg:3"),
    (["--weight-bits", "2.5M"], "bits:2.5M"), (["--bops", "1.2G"], "bops:1.2G")])
@pytest.mark.parametrize("cmd", ["search", "run"])
def test_budget_flags_reach_search_and_run(fake, capsys, tmp_path, cmd, flags, budget):
  rc, _, err = run_cli(capsys, *base(cmd, tmp_path, *flags))
  assert rc == 0, err
  name, cfg, wd, kw = fake.calls[-1]
  assert name == cmd and wd == str(tmp_path / "wd") and kw["budget"] == budget


@pytest.mark.parametrize("flags,culprit", [
    (["--budget", ""], "--budget '' is empty"),
    (["--budget", "  "], "--budget '  ' is empty"),
    (["--avg-bits", "nan"], "--avg-bits 'nan'"),
    (["--avg-bits", "-3"], "--avg-bits '-3'"),
    (["--weight-bits", "1e999"], "--weight-bits '1e999'"),
    (["--bops", "0"], "--bops '0'"),
    (["--budget", "avg:"], "--budget 'avg:'"),
    (["--budget", "3"], "--budget '3'"),
    (["--budget", "1MB", "--avg-bits", "3"], "not allowed with argument"),
])
def test_bad_budget_flags_stop_before_any_work(fake, capsys, tmp_path, flags, culprit):
  rc, out, err = run_cli(capsys, *base("search", tmp_path, *flags))
  assert rc == 2 and out == "" and len(err) == 1, err
  assert err[0].startswith("amq-jax search: error: ") and culprit in err[0]
  assert fake.calls == [] and not os.path.exists(tmp_path / "wd")


def test_each_command_calls_its_stage(fake, capsys, tmp_path):
  bits = tmp_path / "b.json"
  assert run_cli(capsys, *base("train", tmp_path))[0] == 0
  assert run_cli(capsys, *base("analyze", tmp_path, "--force"))[0] == 0
  assert run_cli(capsys, *base("finetune", tmp_path, "--bits", bits, "--name", "mine"))[0] == 0
  assert run_cli(capsys, *base("report", tmp_path))[0] == 0
  assert run_cli(capsys, *base("run", tmp_path, "--baselines", "all"))[0] == 0
  names = [c[0] for c in fake.calls]
  assert names == ["train", "analyze", "finetune", "report", "run"]
  assert fake.calls[1][3] == {"force": True}
  assert fake.calls[2][3] == {"bits": str(bits), "name": "mine"}
  assert fake.calls[4][1].baselines == "all"


def test_config_overrides_reach_the_stage(fake, capsys, tmp_path):
  rc, _, _ = run_cli(capsys, *base("train", tmp_path, "--config.train.batch_size=16",
                                   "--config.hessian.rtol", "0.3"))
  cfg = fake.calls[-1][1]
  assert rc == 0 and cfg.train.batch_size == 16 and cfg.hessian.rtol == 0.3


def test_json_output_schema(fake, capsys, tmp_path):
  fake.behaviour["search"] = {"methods": {"hawq_v2": {"size_mb": np.float32(0.5),
                                                       "bits": np.array([2, 4]),
                                                       "omega": float("nan")}},
                              "table": "| a |"}

  def noisy(cfg, wd, **kw):
    print("a stray print from a stage")
    return {"ok": 1}
  fake.behaviour["train"] = noisy
  for cmd in ("search", "train"):
    rc, out, err = run_cli(capsys, *base(cmd, tmp_path, "--json"))
    doc = json.loads(out)  # stdout holds exactly one JSON object
    assert rc == 0 and set(doc) == {"command", "workdir", "ok", "result", "error"}
    assert doc["command"] == cmd and doc["ok"] is True and doc["error"] is None
    assert doc["workdir"] == str(tmp_path / "wd")
  assert "a stray print from a stage" in "\n".join(err)
  rc, out, _ = run_cli(capsys, *base("search", tmp_path, "--json"))
  rec = json.loads(out)["result"]["methods"]["hawq_v2"]
  assert rec == {"size_mb": 0.5, "bits": [2, 4], "omega": None}


def test_json_output_on_errors(fake, capsys, tmp_path):
  fake.behaviour["analyze"] = lambda *a, **k: (_ for _ in ()).throw(
      errors.StateError("analyze/traces.json is damaged"))
  rc, out, err = run_cli(capsys, "--json", *base("analyze", tmp_path))  # flag before command
  doc = json.loads(out)
  assert rc == 2 and doc["ok"] is False and doc["result"] is None
  assert doc["error"] == {"type": "StateError", "message": "analyze/traces.json is damaged",
                          "exit_status": 2}
  assert err == ["amq-jax analyze: error: analyze/traces.json is damaged"]
  rc, out, _ = run_cli(capsys, *base("analyze", tmp_path, "--json", "--config.nope=1"))
  assert rc == 2 and json.loads(out)["error"]["type"] == "ConfigError"


def _raiser(exc):
  def fn(*a, **k):
    raise exc
  return fn


@pytest.mark.parametrize("exc", [errors.ConfigError("c"), errors.BudgetError("b"),
                                 errors.BitsError("x"), errors.DataError("d"),
                                 errors.StateError("s"), errors.LayerError("l"),
                                 errors.WorkdirError("w"), errors.NonFiniteError("n")])
def test_every_user_error_is_exit_2_and_one_line(fake, capsys, tmp_path, exc):
  fake.behaviour["run"] = _raiser(exc)
  rc, out, err = run_cli(capsys, *base("run", tmp_path))
  assert rc == 2 and out == "" and err == [f"amq-jax run: error: {exc}"]


def test_multi_line_user_error_becomes_one_line(fake, capsys, tmp_path):
  fake.behaviour["run"] = _raiser(errors.DataError("missing file\n  /x/train.idx\n"))
  rc, _, err = run_cli(capsys, *base("run", tmp_path))
  assert rc == 2 and err == ["amq-jax run: error: missing file /x/train.idx"]


def test_internal_error_exit_1_and_debug_traceback(fake, capsys, tmp_path):
  fake.behaviour["search"] = _raiser(KeyError("methods"))
  rc, out, err = run_cli(capsys, *base("search", tmp_path))
  assert rc == 1 and len(err) == 1 and "Traceback" not in err[0]
  assert "internal error KeyError: 'methods'" in err[0] and "--debug" in err[0]
  rc, _, err = run_cli(capsys, *base("search", tmp_path, "--debug"))
  assert rc == 1 and err[0].startswith("Traceback") and "KeyError" in "\n".join(err)
  fake.behaviour["search"] = _raiser(errors.BudgetError("too small"))
  rc, _, err = run_cli(capsys, "--debug", *base("search", tmp_path))
  assert rc == 2 and err[0].startswith("Traceback")  # --debug: tracebacks for everything
  assert err[-1] == "amq-jax search: error: too small"


def test_out_of_memory_names_the_batch_sizes(fake, capsys, tmp_path):
  import jax
  fake.behaviour["analyze"] = _raiser(jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB.\nmore detail"))
  rc, _, err = run_cli(capsys, *base("analyze", tmp_path))
  assert rc == 2 and len(err) == 1
  assert "out of memory" in err[0] and "--config.hessian.batch_size=32 (now 64)" in err[0]
  fake.behaviour["finetune"] = _raiser(MemoryError())
  rc, _, err = run_cli(capsys, *base("finetune", tmp_path))
  assert rc == 2 and "--config.finetune.batch_size=32 (now 64)" in err[0]
  try:
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: oom")
  except Exception as inner:  # noqa: BLE001
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = inner
  fake.behaviour["run"] = _raiser(wrapped)
  rc, _, err = run_cli(capsys, *base("run", tmp_path))
  assert rc == 2 and "--config.train.batch_size=32" in err[0] and "hessian.batch_size" in err[0]
  fake.behaviour["run"] = _raiser(jax.errors.JaxRuntimeError("INTERNAL: something else"))
  assert run_cli(capsys, *base("run", tmp_path))[0] == 1


def _near_chance(cfg, wd, **kw):
  warnings.warn(errors.NearChanceWarning("the FP32 model's accuracy is 0.11, near chance"))
  warnings.warn("a plain warning\nover two lines")
  return {"accuracy": 0.11}


def test_warnings_are_one_line_and_strict_makes_near_chance_an_error(fake, capsys, tmp_path):
  fake.behaviour["train"] = _near_chance
  rc, out, err = run_cli(capsys, *base("train", tmp_path))
  assert rc == 0 and err == [
      "amq-jax train: warning: the FP32 model's accuracy is 0.11, near chance",
      "amq-jax train: warning: UserWarning: a plain warning over two lines"]
  rc, out, err = run_cli(capsys, *base("train", tmp_path, "--strict"))
  assert rc == 2 and out == "" and len(err) == 1
  assert err[0].startswith("amq-jax train: error: the FP32 model's accuracy is 0.11")
  assert "--strict" in err[0]
  rc, out, _ = run_cli(capsys, "--strict", *base("train", tmp_path, "--json"))
  assert rc == 2 and json.loads(out)["error"]["type"] == "NearChanceWarning"


def test_text_output_has_one_style(fake, capsys, tmp_path):
  fake.behaviour.update(
      train={"accuracy": 0.93, "metrics": {"loss": 0.2, "accuracy": 0.93}},
      analyze={"layers": {"stem_conv": {"trace": 1.5, "stderr": 0.1, "probes": 4},
                          "head": {"trace": 0.25, "stderr": 0.02, "probes": 12}}},
      search={"budget": {"spec": "avg:3"}, "table": "| md |", "weights": {"layers": ["a"]},
              "methods": {"hawq_v2": {"method": "hawq_v2", "size_mb": 0.08, "avg_bits": 3.0,
                                      "bits": [8, 2, 8]}}})
  rc, out, _ = run_cli(capsys, *base("analyze", tmp_path))
  lines = out.splitlines()
  assert rc == 0 and lines[0].startswith("amq-jax analyze: done in ")
  assert lines[1] == "  layers:" and lines[2].split() == ["trace", "stderr", "probes"]
  assert lines[3].split() == ["stem_conv", "1.5", "0.1", "4"]
  rc, out, _ = run_cli(capsys, *base("search", tmp_path))
  assert out.splitlines()[0].startswith("amq-jax search: done in ")
  assert "| md |" not in out and "spec: avg:3" in out
  row = [l for l in out.splitlines() if l.strip().startswith("hawq_v2")][0].split()
  assert row == ["hawq_v2", "0.08", "3"]  # the method column repeats the row name: dropped
  rc, out, _ = run_cli(capsys, *base("train", tmp_path))
  assert out.splitlines()[0].startswith("amq-jax train: done in ")
  assert "  accuracy: 0.93" in out.splitlines()


@pytest.mark.parametrize("args,culprit", [
    ([], "the following arguments are required: COMMAND"),
    (["train"], "the following arguments are required: --config, --workdir"),
    (["fly", "--config", TINY], "invalid choice: 'fly'"),
    (["train", "--config", TINY, "--workdir", "w", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--config", TINY, "--workdir", "w", "--config.train.batch_size"],
     "--config.train.batch_size needs a value"),
    (["search", "--config", TINY, "--workdir", "w", "--baselines", "some"],
     "argument --baselines: invalid choice"),
])
def test_usage_errors_are_one_line(fake, capsys, args, culprit):
  rc, out, err = run_cli(capsys, *args)
  assert rc == 2 and out == "" and len(err) == 1 and culprit in err[0], err
  assert err[0].startswith("amq-jax")
  assert fake.calls == []


def test_names_and_workdirs_checked_before_the_pipeline(fake, capsys, tmp_path):
  for name in ("/abs/dir", "../../x", "a/b", ""):
    rc, _, err = run_cli(capsys, *base("finetune", tmp_path, "--name", name))
    assert rc == 2 and len(err) == 1 and f"--name {name!r}" in err[0]
  f = tmp_path / "file"
  f.write_text("x")
  rc, _, err = run_cli(capsys, "train", "--config", TINY, "--workdir", f)
  assert rc == 2 and "is a file" in err[0]
  rc, _, err = run_cli(capsys, "train", "--config", TINY, "--workdir", f / "sub")
  assert rc == 2 and "cannot be created" in err[0]
  assert fake.calls == [] and sorted(os.listdir(tmp_path)) == ["file"]


def test_interrupt_is_130(fake, capsys, tmp_path):
  fake.behaviour["run"] = _raiser(KeyboardInterrupt())
  rc, _, err = run_cli(capsys, *base("run", tmp_path))
  assert rc == 130 and "interrupted" in err[0]
