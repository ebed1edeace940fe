"""Bad inputs, as a hostile but fair user gives them (issue 13): every one must end in exit
status 2 with ONE line that names the culprit, and leave no partial file behind.

The table ``CASES`` covers the config, budgets, bits files, data, state files in the work
directory, names and work directories, and the Python API. Command-line cases call
``amq_jax.cli.main`` in-process. Cases whose input only a pipeline stage can judge (a
budget outside the feasible range, a bits file given to ``finetune``, damaged stage files,
data files, the lock) run the real stages on ``configs/resnet20_fmnist.py:tiny`` with the
tiny overrides ``FAST``; their ids are listed in ``NEEDS_PIPELINE`` (select them with
``-k pipeline``; they are marked slow: the prepared run takes a few minutes on 2 cores). Two property tests check that random junk budgets and bits files never
give a traceback or exit status 0.

"No partial file left behind" means: a case rejected before any stage runs creates
nothing at all; a case rejected by a stage leaves no temporary file (``*.tmp``) and no
empty file other than the lock, and no new file except the run's records (config.json,
stages.json, the lock file).
"""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
from typing import Callable, NamedTuple

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import amq_jax
from amq_jax import cli, errors, quant
from amq_jax._guard import LOCK_FILE, check_workdir, safe_name, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "resnet20_fmnist.py") + ":tiny"
FMNIST = "/usr/share/datasets/fashion-mnist"
# The smallest run that still goes through every stage (the same overrides everywhere, so
# the prepared work directory's stages are reused by every case).
FAST = ["--config.progress=False", "--config.train_limit=128", "--config.test_limit=64",
        "--config.train.num_epochs=1", "--config.train.batch_size=32",
        "--config.train.eval_batch_size=64", "--config.hessian.num_examples=16",
        "--config.hessian.batch_size=16", "--config.hessian.min_probes=2",
        "--config.hessian.max_probes=2", "--config.hessian.eig_k=2",
        "--config.hessian.top1_iters=2", "--config.hessian.spectrum_iters=4",
        "--config.finetune.num_epochs=None", "--config.finetune.num_steps=2",
        "--config.finetune.batch_size=16", "--config.finetune.eval_batch_size=64",
        "--config.finetune.calib_examples=16"]
ALLOWED_NEW = {"config.json", "stages.json", LOCK_FILE}


class Env:
  """Paths of one case: ``tmp`` (its own folder) and ``wd`` (its work directory: absent for
  early cases, a copy of the prepared run for pipeline cases)."""

  def __init__(self, tmp, wd):
    self.tmp, self.wd = str(tmp), str(wd)

  def file(self, name: str, content) -> str:
    p = os.path.join(self.tmp, "inputs", name)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
      f.write(content.encode() if isinstance(content, str) else content)
    return p

  def cmd(self, command: str, *more: str) -> list[str]:
    return [command, "--config", TINY, "--workdir", self.wd, *FAST, *more]

  def damage(self, rel: str, content: bytes = b'{"truncated": ') -> None:
    with open(os.path.join(self.wd, rel), "wb") as f:
      f.write(content)


class Case(NamedTuple):
  id: str
  area: str                  # config | budget | bits | data | state | workdir | usage | api
  make: Callable              # Env -> argv (command-line case) or a callable (API case)
  culprit: tuple              # substrings the one-line message must contain
  pipeline: bool = False      # needs the real stages (and the prepared work directory)
  fresh: bool = False         # pipeline case on an empty work directory


def cfg_case(id_, override, *culprit):
  return Case(id_, "config", lambda e: e.cmd("train", f"--config.{override}"), culprit)


def _file_case(id_, name, text, *culprit):
  def make(e):
    return ["train", "--config", e.file(name, text), "--workdir", e.wd]
  return Case(id_, "config", make, culprit)


def budget_case(id_, *flags, culprit, pipeline=False):
  return Case(id_, "budget", lambda e: e.cmd("search", *flags), culprit, pipeline)


def bits_case(id_, text, *culprit):
  def make(e):
    return e.cmd("finetune", "--bits", e.file("bits.json", text), "--name", "mine")
  return Case(id_, "bits", make, ("bits.json",) + culprit, pipeline=True)


def _lock_held_by_child(e):
  """An API case: another process holds the work directory."""
  os.makedirs(e.wd, exist_ok=True)
  child = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom amq_jax._guard import workdir_lock\n"
       f"with workdir_lock({e.wd!r}):\n  print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert child.stdout.readline().strip() == "held"
    with workdir_lock(e.wd):
      pass
  finally:
    child.kill()
    child.wait()


def _amq_file(e, damage):
  import numpy as np
  p = os.path.join(e.tmp, "inputs", "model.amq")
  os.makedirs(os.path.dirname(p), exist_ok=True)
  quant.export_packed({"dense": {"kernel": np.ones((4, 3), np.float32)}}, {"dense": 4}, p)
  raw = open(p, "rb").read()
  open(p, "wb").write(damage(raw))
  return lambda: quant.load_packed(p)


SYNTAX = "def get_config(:\n"
RAISES = "def get_config(variant=''):\n  raise RuntimeError('no such cluster')\n"
LAYERS = ["stem_conv", "stage1_block1/conv1", "head"]

CASES = [
    # ------------------------------------------------------------------ config
    cfg_case("batch-size-negative", "train.batch_size=-5", "train.batch_size = -5", ">= 1"),
    cfg_case("batch-size-zero", "train.batch_size=0", "train.batch_size = 0"),
    cfg_case("finetune-batch-zero", "finetune.batch_size=0", "finetune.batch_size = 0"),
    cfg_case("hessian-batch-zero", "hessian.batch_size=0", "hessian.batch_size = 0"),
    cfg_case("eval-batch-zero", "train.eval_batch_size=0", "train.eval_batch_size = 0"),
    cfg_case("lr-zero", "train.learning_rate=0", "train.learning_rate = 0.0", "> 0"),
    cfg_case("lr-negative", "finetune.learning_rate=-1", "finetune.learning_rate = -1.0"),
    cfg_case("lr-inf", "train.learning_rate=1e400", "train.learning_rate = inf"),
    cfg_case("lr-nan", "train.learning_rate=nan", "train.learning_rate = nan"),
    cfg_case("lr-text", "train.learning_rate=fast", "train.learning_rate = 'fast'"),
    cfg_case("momentum-one", "train.momentum=1", "train.momentum = 1.0", "[0, 1)"),
    cfg_case("epochs-zero", "train.num_epochs=0", "train.num_epochs = 0.0"),
    cfg_case("optimizer-unknown", "train.optimizer=rmsprop", "'rmsprop'", "'sgd', 'adam'"),
    cfg_case("rtol-zero", "hessian.rtol=0", "hessian.rtol = 0.0", "(0, 1)"),
    cfg_case("rtol-above-one", "hessian.rtol=1.5", "hessian.rtol = 1.5"),
    cfg_case("probes-zero", "hessian.min_probes=0", "hessian.min_probes = 0"),
    cfg_case("probes-max-below-min", "hessian.max_probes=1", "hessian.max_probes = 1",
             "min_probes"),
    cfg_case("estimator-unknown", "hessian.estimator=exact", "hessian.estimator = 'exact'"),
    cfg_case("bit-choices-99", "search.bit_choices=(2,99)", "search.bit_choices", "1..16"),
    cfg_case("bit-choices-empty", "search.bit_choices=()", "search.bit_choices = ()"),
    cfg_case("pin-not-a-choice", "search.pin_first_last=5", "search.pin_first_last = 5"),
    cfg_case("tie-bad-regex", 'search.tie=(("stage1_[",),)', "search.tie", "'stage1_['"),
    cfg_case("config-budget-empty", "search.budget=", "search.budget = ''"),
    cfg_case("config-budget-junk", "search.budget=lots", "search.budget = 'lots'"),
    cfg_case("limit-zero", "train_limit=0", "train_limit = 0"),
    cfg_case("classes-zero", "model_kwargs.num_classes=0", "model_kwargs.num_classes = 0"),
    cfg_case("unknown-field", "nope=1", "'nope'"),
    cfg_case("old-field-name", "learning_rate=0.1", "'learning_rate'",
             "--config.train.learning_rate"),
    cfg_case("section-as-value", "hessian=3", "hessian is a section"),
    Case("override-without-value", "config",
         lambda e: e.cmd("train", "--config.train.batch_size"), ("--config.train.batch_size",)),
    _file_case("config-not-py", "config.yaml", "batch_size: 3\n", "config.yaml", ".py"),
    _file_case("config-syntax-error", "syntax.py", SYNTAX, "syntax.py", "line 1"),
    _file_case("config-raises", "raises.py", RAISES, "raises.py", "RuntimeError",
               "no such cluster"),
    _file_case("config-no-get-config", "empty.py", "X = 1\n", "empty.py", "get_config"),
    Case("config-missing", "config",
         lambda e: ["train", "--config", os.path.join(e.tmp, "none.py"), "--workdir", e.wd],
         ("none.py", "not found")),
    Case("config-unknown-variant", "config",
         lambda e: ["train", "--config", TINY.replace(":tiny", ":huge"), "--workdir", e.wd],
         ("'huge'",)),
    # ------------------------------------------------------------------ budgets
    budget_case("budget-empty", "--budget", "", culprit=("--budget ''", "empty")),
    budget_case("budget-blank", "--budget", "   ", culprit=("--budget '   '",)),
    budget_case("budget-words", "--budget", "small please", culprit=("'small please'",)),
    budget_case("budget-number-only", "--budget", "3", culprit=("'3'",)),
    budget_case("budget-kind-unknown", "--budget", "size:3", culprit=("'size:3'",)),
    budget_case("budget-uniform-fraction", "--budget", "uniform:2.5",
                culprit=("'uniform:2.5'",)),
    budget_case("avg-bits-nan", "--avg-bits", "nan", culprit=("--avg-bits 'nan'",)),
    budget_case("avg-bits-negative", "--avg-bits", "-3", culprit=("--avg-bits '-3'",)),
    budget_case("weight-bits-inf", "--weight-bits", "1e999",
                culprit=("--weight-bits '1e999'",)),
    budget_case("bops-zero", "--bops", "0", culprit=("--bops '0'",)),
    budget_case("bops-text", "--bops", "many", culprit=("--bops 'many'",)),
    budget_case("two-budgets", "--budget", "1MB", "--avg-bits", "3",
                culprit=("not allowed with",)),
    Case("run-budget-empty", "budget", lambda e: e.cmd("run", "--budget", ""),
         ("--budget ''",)),
    budget_case("budget-above-largest", "--budget", "avg:99", culprit=("avg:99",),
                pipeline=True),
    budget_case("budget-1e9MB", "--budget", "1e9MB", culprit=("1e9MB",), pipeline=True),
    budget_case("budget-bits-huge", "--weight-bits", "1e300", culprit=("1e300",),
                pipeline=True),
    budget_case("budget-uniform-99", "--budget", "uniform:99", culprit=("99", "bit choices"),
                pipeline=True),
    budget_case("budget-uniform-not-a-choice", "--budget", "uniform:5",
                culprit=("5", "bit choices"), pipeline=True),
    budget_case("budget-below-smallest", "--budget", "avg:0.01", culprit=("avg:0.01",),
                pipeline=True),
    # ------------------------------------------------------------------ bits files
    bits_case("bits-null", "null", "null"),
    bits_case("bits-number", "3", "number 3"),
    bits_case("bits-list-of-ints", "[1, 2]", "list of numbers"),
    bits_case("bits-empty-mapping", "{}", "empty", "quantize nothing"),
    bits_case("bits-empty-list", "[]", "empty", "quantize nothing"),
    bits_case("bits-1e400", '{"stem_conv": 1e400}', "stem_conv", "1e400"),
    bits_case("bits-nan", '{"stem_conv": NaN}', "stem_conv", "NaN"),
    bits_case("bits-string", '{"stem_conv": "4"}', "stem_conv", "'4'"),
    bits_case("bits-bool", '{"stem_conv": true}', "stem_conv", "true"),
    bits_case("bits-17", '{"stem_conv": {"w": 17, "a": 8}}', "stem_conv", "17"),
    bits_case("bits-bad-regex", '[{"pattern": "stage1_(", "w": 4}]', "'stage1_('"),
    bits_case("bits-unknown-layer", '{"stem": 4}', "'stem'", "Valid layer"),
    bits_case("bits-damaged-json", '{"stem_conv": 4', "not valid JSON"),
    Case("bits-missing", "bits", lambda e: e.cmd("finetune", "--bits",
                                                 os.path.join(e.tmp, "none.json")),
         ("none.json", "does not exist"), pipeline=True),
    # ------------------------------------------------------------------ names, work dirs
    Case("name-absolute", "workdir", lambda e: e.cmd("finetune", "--name", "/abs/dir"),
         ("--name '/abs/dir'",)),
    Case("name-dotdot", "workdir", lambda e: e.cmd("finetune", "--name", "../../x"),
         ("--name '../../x'",)),
    Case("name-separator", "workdir", lambda e: e.cmd("finetune", "--name", "a/b"),
         ("--name 'a/b'",)),
    Case("name-empty", "workdir", lambda e: e.cmd("finetune", "--name", ""), ("--name ''",)),
    Case("workdir-is-a-file", "workdir",
         lambda e: ["train", "--config", TINY, "--workdir", e.file("afile", "x")],
         ("afile", "is a file")),
    Case("workdir-under-a-file", "workdir",
         lambda e: ["train", "--config", TINY, "--workdir",
                    os.path.join(e.file("afile", "x"), "run")], ("afile", "is a file")),
    # ------------------------------------------------------------------ usage
    Case("no-command", "usage", lambda e: [], ("COMMAND",)),
    Case("unknown-option", "usage", lambda e: e.cmd("train", "--epochs", "3"), ("--epochs",)),
    Case("missing-workdir", "usage", lambda e: ["train", "--config", TINY], ("--workdir",)),
    # ------------------------------------------------------------------ data
    Case("data-dir-missing", "data",
         lambda e: e.cmd("train", f"--config.data_dir={os.path.join(e.tmp, 'nodata')}"),
         ("nodata",), pipeline=True, fresh=True),
    Case("data-file-truncated", "data",
         lambda e: e.cmd("train", f"--config.data_dir={_truncated_data(e)}"),
         ("train-images",), pipeline=True, fresh=True),
    # ------------------------------------------------------------------ state files
    Case("state-stages-json", "state", lambda e: (e.damage("stages.json"),
                                                  e.cmd("analyze"))[1], ("stages.json",),
         pipeline=True),
    Case("state-traces-json", "state", lambda e: (e.damage("analyze/traces.json"),
                                                  e.cmd("search"))[1], ("traces.json",),
         pipeline=True),
    Case("state-frontier-json", "state", lambda e: (e.damage("search/frontier.json"),
                                                    e.cmd("report"))[1], ("frontier.json",),
         pipeline=True),
    Case("state-bits-json", "state", lambda e: (e.damage("search/bits.json"),
                                                e.cmd("finetune"))[1], ("bits.json",),
         pipeline=True),
    Case("state-variables-garbage", "state",
         lambda e: (e.damage("fp32/variables.msgpack", b"\x00garbage"), e.cmd("analyze"))[1],
         ("variables.msgpack",), pipeline=True),
    Case("state-variables-other-model", "state",
         lambda e: (_other_model(e), e.cmd("analyze"))[1], ("variables.msgpack",),
         pipeline=True),
    Case("state-nan-weight", "state",
         lambda e: (_nan_weight(e), e.cmd("analyze", "--force"))[1], ("stem_conv",),
         pipeline=True),
    Case("state-locked", "state", lambda e: _locked(e, e.cmd("analyze")),
         ("in use by process",), pipeline=True),
    Case("strict-near-chance", "state", lambda e: e.cmd("train", "--strict"),
         ("near chance", "--strict"), pipeline=True),
    # ------------------------------------------------------------------ Python API
    Case("api-lock-held", "api", lambda e: lambda: _lock_held_by_child(e),
         ("in use by process",)),
    Case("api-safe-name", "api", lambda e: lambda: safe_name("../up"), ("'../up'",)),
    Case("api-check-workdir", "api", lambda e: lambda: check_workdir(e.file("f", "x")),
         ("is a file",)),
    Case("api-amq-bad-magic", "api", lambda e: _amq_file(e, lambda r: b"NOTAMQ00" + r[8:]),
         ("model.amq", "magic")),
    Case("api-amq-header-length", "api",
         lambda e: _amq_file(e, lambda r: r[:8] + b"\xff" * 8 + r[16:]),
         ("model.amq", "header length")),
    Case("api-amq-truncated", "api", lambda e: _amq_file(e, lambda r: r[:-5]),
         ("model.amq", "payload")),
    Case("api-bits-rules-without-layers", "api",
         lambda e: lambda: quant.load_bits_file(e.file("r.json", '[{"pattern": ".*", "w": 4}]'),
                                                None), ("r.json", "rules")),
    Case("api-validate-unknown-layer", "api",
         lambda e: lambda: quant.validate({"stemconv": 4}, LAYERS), ("'stemconv'", "stem_conv")),
    Case("api-budget-parse", "api", lambda e: lambda: _parse_budget("avg:nan"), ("'avg:nan'",)),
]
NEEDS_PIPELINE = [c.id for c in CASES if c.pipeline]


def _parse_budget(text):
  from amq_jax.alloc import parse_budget
  return parse_budget(text)


def _truncated_data(e) -> str:
  d = os.path.join(e.tmp, "data")
  os.makedirs(d, exist_ok=True)
  for name in os.listdir(FMNIST):
    src = os.path.join(FMNIST, name)
    if name.startswith("train-images"):
      import gzip
      with gzip.open(src, "rb") as f:
        head = f.read(5000)
      open(os.path.join(d, name.removesuffix(".gz")), "wb").write(head)
    else:
      os.symlink(src, os.path.join(d, name))
  return d


def _variables_path(e):
  return os.path.join(e.wd, "fp32", "variables.msgpack")


def _other_model(e):
  from flax import serialization
  import numpy as np
  blob = serialization.msgpack_serialize({"params": {"dense": {"kernel": np.ones((3, 2),
                                                                                  np.float32)}}})
  open(_variables_path(e), "wb").write(blob)


def _nan_weight(e):
  from flax import serialization
  import numpy as np
  v = serialization.msgpack_restore(open(_variables_path(e), "rb").read())
  k = np.array(v["params"]["stem_conv"]["kernel"])
  k.flat[0] = np.nan
  v["params"]["stem_conv"]["kernel"] = k
  open(_variables_path(e), "wb").write(serialization.msgpack_serialize(v))


_children = []


def _locked(e, argv):
  child = subprocess.Popen(
      [sys.executable, "-c", "import time\nfrom amq_jax._guard import workdir_lock\n"
       f"with workdir_lock({e.wd!r}):\n  print('held', flush=True); time.sleep(120)"],
      stdout=subprocess.PIPE, text=True, cwd=ROOT)
  assert child.stdout.readline().strip() == "held"
  _children.append(child)
  return argv


@pytest.fixture(autouse=True)
def _stop_children():
  yield
  while _children:
    c = _children.pop()
    c.kill()
    c.wait()


# --------------------------------------------------------------------------- the runner

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A tiny run through search (FP32 trained here, traces, frontier, bits.json)."""
  wd = str(tmp_path_factory.mktemp("prepared") / "wd")
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = cli.main(["search", "--config", TINY, "--workdir", wd, *FAST])
  assert rc == 0, err.getvalue()[-2000:]
  return wd


def _files(root):
  out = set()
  for d, _, fs in os.walk(root):
    for f in fs:
      out.add(os.path.relpath(os.path.join(d, f), root))
  return out


def _partial(root):
  bad = []
  for rel in _files(root):
    p = os.path.join(root, rel)
    name = os.path.basename(rel)
    if name.endswith(".tmp"):
      bad.append(rel)
    elif os.path.getsize(p) == 0 and name != LOCK_FILE and not os.path.islink(p):
      bad.append(rel)
  return bad


def _ids(cases):
  return [("pipeline-" if c.pipeline else "") + c.area + "-" + c.id for c in cases]


def test_the_table_is_big_enough():
  assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
  assert {c.area for c in CASES} >= {"config", "budget", "bits", "data", "state", "api"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c.pipeline else [])
                                  for c in CASES], ids=_ids(CASES))
def test_bad_input(case, tmp_path, request):
  wd = tmp_path / "wd"
  if case.pipeline and not case.fresh:
    shutil.copytree(request.getfixturevalue("prepared"), wd, symlinks=True)
  env = Env(tmp_path, wd)
  made = case.make(env)
  if case.area == "api":
    with pytest.raises(errors.AmqError) as e:
      made()
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert cli._error(e.value, "api", None)[0] == 2
    for c in case.culprit:
      assert c in msg, (c, msg)
    return
  before = _files(tmp_path)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = cli.main(made)
  lines = [l for l in err.getvalue().splitlines() if l.strip()]
  errs = [l for l in lines if ": error: " in l]
  assert rc == 2, (rc, lines[-5:])
  assert "Traceback" not in err.getvalue()
  assert len(errs) == 1 and errs[0] == lines[-1] and errs[0].startswith("amq-jax"), lines
  assert all(": warning: " in l for l in lines[:-1]), lines  # nothing else on stderr
  for c in case.culprit:
    assert c in errs[0], (c, errs[0])
  after = _files(tmp_path)
  if not case.pipeline:
    assert after == before, sorted(after - before)  # rejected before anything was written
  else:
    new = {os.path.basename(p) for p in after - before}
    assert new <= ALLOWED_NEW | {"source.json"} or case.fresh, sorted(after - before)
    assert _partial(str(wd)) == []


# --------------------------------------------------------------------------- properties

KINDS = ("avg", "uniform", "bits", "bops")
BAD_NUMBERS = ("", "-1", "0", "0.0", "nan", "inf", "-inf", "1e999", "abc", "1..2", "--3",
               "1e", ".", "3x", "0x10", "٣")


_WORDS = re.compile(r"(?i)mb|avg|uniform|bits|bops")
_NUMBERISH = re.compile(r"\s*[0-9.]*[0-9][0-9.]*([eE][+-]?[0-9]+)?\s*[kKmMgGtT]?\s*")


@st.composite
def junk_budgets(draw):
  """``(full budget text, its number part)``, both wrong by construction (no oracle from
  the code under test): arbitrary text without budget words or number shapes, or a budget
  form whose number is not a positive finite ASCII number."""
  form = draw(st.sampled_from(["text", "keyed", "mb"]))
  if form == "text":
    s = draw(st.text(max_size=24))
    assume(not _WORDS.search(s) and not _NUMBERISH.fullmatch(s))
    return s, s
  num = draw(st.sampled_from(BAD_NUMBERS) | st.from_regex(r"-[0-9]{1,4}(\.[0-9]+)?",
                                                          fullmatch=True))
  pad = draw(st.sampled_from(["", " "]))
  if form == "mb":
    return f"{pad}{num}MB", f"{pad}{num}MB"
  return f"{draw(st.sampled_from(KINDS))}:{pad}{num}", pad + num


def _stand_in_pipeline():
  """Stand-in stages that would make the command succeed: reaching one is a failure."""
  m = types.ModuleType("amq_jax.pipeline")
  for name in cli.COMMANDS:
    setattr(m, name, lambda *a, _n=name, **k: {"reached": _n})
  return m


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=junk_budgets(), flag=st.sampled_from(["--budget", "--avg-bits", "--weight-bits",
                                                   "--bops"]),
       command=st.sampled_from(["search", "run"]))
def test_junk_budgets_never_traceback_or_succeed(monkeypatch, tmp_path, junk, flag, command):
  budget = junk[0] if flag == "--budget" else junk[1]
  fake = _stand_in_pipeline()
  monkeypatch.setitem(sys.modules, "amq_jax.pipeline", fake)
  monkeypatch.setattr(amq_jax, "pipeline", fake, raising=False)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = cli.main([command, "--config", TINY, "--workdir", str(tmp_path / "wd"), flag, budget])
  assert rc == 2, (budget, out.getvalue())
  lines = err.getvalue().strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"amq-jax {command}: error: "), lines
  assert "Traceback" not in err.getvalue()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-40, 40) | st.floats(allow_nan=True,
                                                                 allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from(LAYERS + ["stem_conv/kernel", ".*", "stage1_("]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(LAYERS + ["stem", "w", "a", "pattern", "config", "method"])
        | st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _valid_width(v):
  return v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16)


@settings(max_examples=300, deadline=None)
@given(data=JSON | st.binary(max_size=40))
def test_junk_bits_files_never_traceback(tmp_path_factory, data):
  """Any file content: either a BitsError naming the file, or a configuration that is
  really valid (every layer known, every width a whole number in 1..16, something
  quantized)."""
  d = tmp_path_factory.mktemp("bits", numbered=True)
  p = str(d / "junk.json")
  raw = data if isinstance(data, bytes) else json.dumps(data).encode()
  open(p, "wb").write(raw)
  try:
    cfg = quant.load_bits_file(p, LAYERS)
  except errors.AmqError as e:
    assert p in str(e) and "\n" not in str(e) and cli._error(e, "finetune", None)[0] == 2
    return
  assert isinstance(cfg, quant.BitConfig) and len(cfg) >= 1
  for layer, v in cfg.to_dict().items():
    assert layer in LAYERS and _valid_width(v["w"]) and _valid_width(v["a"])
  assert any(v["w"] is not None or v["a"] is not None for v in cfg.to_dict().values())


@st.composite
def broken_bits(draw):
  """A valid configuration with exactly one thing broken: always an error."""
  good = {"stem_conv": {"w": 8, "a": 8}, "stage1_block1/conv1": {"w": 4, "a": 8},
          "head": {"w": 8, "a": None}}
  how = draw(st.sampled_from(["width", "key", "layer", "top", "rule"]))
  layer = draw(st.sampled_from(sorted(good)))
  bad_width = draw(st.sampled_from([0, 17, -3, 2.5, "4", True, False, [4], {"w": 4},
                                    1e400, float("nan")]) | st.integers(17, 10**6)
                   | st.integers(-10**6, 0))
  if how == "width":
    good[layer][draw(st.sampled_from(["w", "a"]))] = bad_width
    return good
  if how == "key":
    good[layer]["bits"] = 4
    return good
  if how == "layer":
    good[draw(st.text(min_size=1, max_size=8).filter(lambda s: s.strip("/") not in LAYERS
                                                     and s.strip("/") + "/kernel" not in LAYERS
                                                     and s not in good))] = 4
    return good
  if how == "top":
    return draw(st.sampled_from([None, 3, "text", [], {}, [1, 2], True]))
  return [{"pattern": draw(st.sampled_from(["stage1_(", "[", "*", "(?P<", "nomatch_.*"])),
           "w": 4}]


@settings(max_examples=200, deadline=None)
@given(data=broken_bits())
def test_broken_bits_files_are_always_errors(tmp_path_factory, data):
  p = str(tmp_path_factory.mktemp("bits", numbered=True) / "bits.json")
  with open(p, "w") as f:
    f.write(json.dumps(data))  # NaN/Infinity written as JSON's common extension
  with pytest.raises(errors.BitsError) as e:
    quant.load_bits_file(p, LAYERS)
  assert p in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(avg=st.floats(8.5, 1e300) | st.floats(1e-6, 0.5))
def test_pipeline_infeasible_budgets_are_errors(prepared, avg):
  """Budgets outside the feasible range (through the real search): exit 2, one line."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = cli.main(["search", "--config", TINY, "--workdir", prepared, *FAST,
                   "--avg-bits", repr(avg)])
  lines = [l for l in err.getvalue().splitlines() if ": error: " in l]
  assert rc == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()


NEEDS_PIPELINE.append("test_pipeline_infeasible_budgets_are_errors")


def test_lock_of_a_killed_process_is_taken_over_and_reentrant(tmp_path):
  """kill -9 of the holder leaves its lock file behind; the next run takes it over."""
  from amq_jax._guard import lock_holder
  wd = str(tmp_path / "wd")
  child = subprocess.Popen(
      [sys.executable, "-c", "import time\nfrom amq_jax._guard import workdir_lock\n"
       f"with workdir_lock({wd!r}):\n  print('held', flush=True); time.sleep(120)"],
      stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert child.stdout.readline().strip() == "held"
    assert lock_holder(wd)["pid"] == child.pid
    with pytest.raises(errors.WorkdirError, match=rf"in use by process {child.pid} "):
      with workdir_lock(wd):
        pass
  finally:
    child.kill()
    child.wait()
  assert lock_holder(wd)["pid"] == child.pid  # the dead holder's record is still there
  with workdir_lock(wd):
    assert lock_holder(wd)["pid"] == os.getpid()
    with workdir_lock(wd):  # re-entrant: run() holds it while calling analyze()
      pass
    assert lock_holder(wd)["pid"] == os.getpid()
  assert lock_holder(wd) is None
