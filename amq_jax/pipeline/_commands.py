"""The commands: config + work directory -> the stages, cached by fingerprint.

``train``, ``analyze``, ``search``, ``finetune``, ``run`` and ``report`` work on every
config (classification and detection alike): the config names a model and a task, and
the stages are the same functions for both (:mod:`amq_jax.pipeline._stages`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from typing import Sequence

import ml_collections

from amq_jax import _guard, _io, adapters, models, quant
from amq_jax.errors import ConfigError, StateError
from amq_jax.pipeline import _stages
from amq_jax.pipeline._task import Task, classification_task
from amq_jax.pipeline._workdir import Workdir, fingerprint

__all__ = ["train", "analyze", "search", "finetune", "run", "report", "build", "Experiment"]


class Experiment:
  """A config's model (float, as a :class:`amq_jax.adapters.Model`), task and work
  directory. Built by :func:`build`; holds data, computes nothing."""

  def __init__(self, cfg, wd: Workdir, model: adapters.Model, task: Task, fp32_fp: str,
               progress: bool):
    self.cfg, self.wd, self.model, self.task = cfg, wd, model, task
    self.fp32_fp, self.progress = fp32_fp, progress

  def __repr__(self) -> str:
    return f"Experiment({self.cfg.get('name', self.cfg.model)}, {self.model}, {self.task})"


# ---------------------------------------------------------------------------------------
# config -> model, task
# ---------------------------------------------------------------------------------------
def _is_detection(cfg) -> bool:
  return cfg.get("task", "classification") == "detection"


def _module(cfg, **extra):
  kw = cfg.get("model_kwargs", {})
  kw = kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)
  return models.get_model(cfg.model, **dict(kw, **extra))


def _task(cfg) -> Task:
  if _is_detection(cfg):
    from amq_jax.detection import detection_task
    return detection_task(cfg)
  from amq_jax import train
  tr, te = train.load_data(cfg)
  nc = cfg.get("model_kwargs", {}).get("num_classes")
  return classification_task(tr, te, augment=bool(cfg.train.get("augment", False)),
                             eval_batch_size=int(cfg.train.get("eval_batch_size", 1000)),
                             num_classes=nc)


def _input_shape(cfg):
  if _is_detection(cfg):
    from amq_jax.detection import detection_input_shape
    return detection_input_shape(cfg)
  return tuple(cfg.input_shape)


def _fp32_fingerprint(cfg) -> str:
  fields = {k: cfg.get(k) for k in ("model", "model_kwargs", "input_shape", "dataset",
                                     "data_dir", "train_limit", "pretrained", "seed", "task",
                                     "canvas", "max_gt", "max_objects", "train_images",
                                     "anchor_scale", "loss")}
  return fingerprint("fp32", fields, cfg.train)


def _fp32_stage(cfg, wd: Workdir, module, sample, task: Task, progress: bool):
  """The float variables: this work directory's, else the shipped checkpoint the config
  names, else trained here (resumable)."""
  import jax
  from amq_jax import train

  fp = _fp32_fingerprint(cfg)
  path = wd.fp32

  def compute():
    # One jitted init (compiling it costs seconds even for a tiny model), called once.
    init_fn = jax.jit(lambda k: module.init(k, sample, **_train_kw(module)))
    name = cfg.get("pretrained")
    shipped = train.shipped_checkpoint(name) if name else None
    if shipped:
      variables = train.restore_variables(shipped, init_fn(jax.random.key(0)))
      source = f"shipped checkpoint {os.path.basename(shipped)}"
    else:
      init = init_fn(jax.random.key(int(cfg.seed)))
      m0 = adapters.from_linen(module, init, sample)
      state, res = train.fit(task.train_loss(m0.apply), m0.params, m0.state, task.train_source,
                             cfg.train, workdir=wd.path("fp32", "train", mkdir=True),
                             seed=int(cfg.seed), desc="fp32", progress=progress,
                             field_prefix="train")
      variables = dict(state.model_state, params=state.params)
      source = f"trained here ({res.get('steps')} steps)"
    train.save_variables(path, jax.device_get(variables))
    _io.write_json(wd.path("fp32", "source.json"), {"source": source})

  wd.cached("fp32", fp, [path], compute, clear=[wd.path("fp32", "train", mkdir=False), path])
  target = jax.eval_shape(lambda: module.init(jax.random.key(0), sample, **_train_kw(module)))
  import numpy as np
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
  try:
    variables = train.restore_variables(path, target)
  except Exception as e:  # noqa: BLE001 - any decoding error means a damaged/foreign file
    raise StateError(f"{path} cannot be read as the variables of model {cfg.model!r} ({e}); "
                     "delete it (or the work directory) and run again") from None
  return variables, fp


def _train_kw(module) -> dict:
  from amq_jax.adapters._model import _takes_train
  return {"train": False} if _takes_train(module) else {}


def build(cfg, workdir: str, *, progress: bool | None = None, train_if_missing: bool = True
          ) -> Experiment:
  """The config's float model (trained or loaded, cached) and task."""
  import jax.numpy as jnp
  wd = Workdir(workdir)
  progress = bool(cfg.get("progress", True)) if progress is None else progress
  module = _module(cfg)
  sample = jnp.zeros((1,) + tuple(_input_shape(cfg)), jnp.float32)
  task = _task(cfg)
  if not train_if_missing and wd.record("fp32") is None and not cfg.get("pretrained"):
    raise StateError(f"no FP32 model in {wd.root}; run `amq-jax train` (or `run`) first")
  variables, fp = _fp32_stage(cfg, wd, module, sample, task, progress)
  _check_finite(variables, wd.fp32)
  model = adapters.from_linen(module, variables, sample)
  exp = Experiment(cfg, wd, model, task, fp, progress)
  fp32_eval(exp)
  return exp


def _check_finite(variables, path: str) -> None:
  """A NaN/Inf weight makes every later figure meaningless: name it now."""
  import numpy as np
  from amq_jax import _paths
  from amq_jax.errors import NonFiniteError
  bad = [p for p, v in _paths.flatten(variables).items()
         if hasattr(v, "dtype") and np.issubdtype(v.dtype, np.floating)
         and not np.all(np.isfinite(np.asarray(v)))]
  if bad:
    raise NonFiniteError(f"the FP32 model ({path}) has NaN/Inf values in {bad[:5]}"
                         f"{' and more' if len(bad) > 5 else ''}; retrain it (delete "
                         f"{path} and run `amq-jax train`) or fix the checkpoint")


def fp32_eval(exp: Experiment) -> dict:
  path = exp.wd.path("fp32", "eval.json")
  m = exp.model

  def compute():
    from amq_jax import alloc
    ev = exp.task.evaluate(m.apply, m.params, m.state)
    src = _io.read_json(exp.wd.path("fp32", "source.json")).get("source") if os.path.isfile(
        exp.wd.path("fp32", "source.json")) else "?"
    _io.write_json(path, {"metrics": ev, exp.task.metric: ev[exp.task.metric],
                          "size_mb": alloc.model_size_mb(m.params), "source": src})

  exp.wd.cached("fp32_eval", fingerprint("eval", exp.fp32_fp), [path], compute)
  res = _io.read_json(path, what="the FP32 evaluation")
  chance = exp.task.chance
  if chance and res[exp.task.metric] < 1.5 * chance:
    from amq_jax.errors import NearChanceWarning
    warnings.warn(NearChanceWarning(
        f"the FP32 model's {exp.task.metric} is {res[exp.task.metric]:.3f}, near chance "
        f"({chance:.3f}): quantizing it measures nothing useful; train it longer "
        "(--config.train.num_epochs) or check the data"), stacklevel=2)
  return res


# ---------------------------------------------------------------------------------------
# stages with caching
# ---------------------------------------------------------------------------------------
def _analyze_fp(exp: Experiment) -> str:
  # hessian.compare (a second curvature, measured beside) is no input of the first one's
  # traces: leaving it out lets it be toggled without recomputing them.
  hc = {k: v for k, v in exp.cfg.hessian.to_dict().items() if k not in _stages.COMPARE_FIELDS}
  return fingerprint("analyze", exp.fp32_fp, hc)


def _compare_fp(exp: Experiment) -> str:
  return fingerprint("analyze", exp.fp32_fp, _stages.compare_section(exp.cfg.hessian))


def _compare_traces(exp: Experiment, *, force=False) -> dict | None:
  """``analyze/traces_<compare>.json`` (the second curvature), cached on its own."""
  chc = _stages.compare_section(exp.cfg.hessian)
  if chc is None:
    return None
  if chc.curvature != "hessian" and exp.task.logits_fn is None:
    raise ConfigError(f"hessian.compare={chc.curvature!r} needs logits (a task with "
                      "logits_fn); use 'hessian' or None for this task")
  path = exp.wd.path("analyze", f"traces_{chc.curvature}.json")
  exp.wd.cached(f"analyze.traces_{chc.curvature}", _compare_fp(exp), [path], lambda: (
      _io.write_json(path, _stages.analyze_traces(exp.model, exp.task, chc,
                                                  progress=exp.progress))), force=force)
  return _io.read_json(path, what="amq-jax analyze")


def _grid(cfg) -> str:
  """The config's ``quant.grid`` ('amq' for configs written before the field existed)."""
  q = cfg.get("quant")
  return (q.get("grid") if q is not None else None) or "amq"


def _grid_part(cfg) -> tuple:
  """What a stage that quantizes adds to its fingerprint for the grid: nothing for 'amq', so
  work directories made before ``quant.grid`` existed (all on amq's grid) stay valid."""
  g = _grid(cfg)
  return () if g == "amq" else ({"quant.grid": g},)


def _analyze(exp: Experiment, *, force=False) -> dict:
  wd, hc = exp.wd, exp.cfg.hessian
  fp = _analyze_fp(exp)
  def traces():
    res = _stages.analyze_traces(exp.model, exp.task, hc, progress=exp.progress)
    _io.write_json(wd.traces, res)
    _write_jsonl(wd.path("analyze", "metrics.jsonl"), [
        dict(stage="analyze", layer=name, curvature=res["curvature"],
             **{k: e.get(k) for k in ("trace", "stderr", "probes", "status", "avg_trace")})
        for name, e in res["layers"].items()])

  wd.cached("analyze.traces", fp, [wd.traces], traces, force=force)
  out = {"traces": _io.read_json(wd.traces, what="amq-jax analyze")}
  other = _compare_traces(exp, force=force)
  if other is not None:
    out["compare"] = other
  if hc.get("eig_layers") is not None and int(hc.get("top1_iters", 0) or 0) > 0:
    def eig():
      res = _stages.analyze_eigenvalues(exp.model, exp.task, hc, progress=exp.progress)
      _io.write_json(wd.eigenvalues, res)
      try:
        from amq_jax.report import plot_spectra
        plot_spectra(res["spectra"], wd.path("analyze", "eigenvalues.png"))
      except Exception as e:  # noqa: BLE001 - a figure must not lose the computed data
        warnings.warn(f"could not draw analyze/eigenvalues.png: {e}")
    wd.cached("analyze.eigenvalues", fp, [wd.eigenvalues], eig, force=force)
    out["eigenvalues"] = _io.read_json(wd.eigenvalues, what="amq-jax analyze")
  sc = exp.cfg.search
  if sc.get("act_budget"):
    afp = fingerprint(fp, sc.get("act_bit_choices"), exp.cfg.finetune.get("calib_method"),
                      *_grid_part(exp.cfg))
    wd.cached("analyze.activations", afp, [wd.activations], lambda: _io.write_json(
        wd.activations, _stages.analyze_activations(
            exp.model, exp.task, hc, sc.act_bit_choices,
            calib_method=exp.cfg.finetune.get("calib_method", "minmax"),
            progress=exp.progress, grid=_grid(exp.cfg))), force=force)
    out["activations"] = _io.read_json(wd.activations, what="amq-jax analyze")
  return out


def _write_jsonl(path: str, records) -> None:
  """One JSON object per line (the metrics format of every stage that iterates)."""
  import json
  _io.write_text(path, "".join(json.dumps(r, default=_io.to_jsonable) + "\n" for r in records))


def _methods(cfg, methods) -> tuple[str, ...]:
  if methods:
    return tuple(methods)
  if cfg.get("methods"):
    return tuple(cfg.methods)
  return _stages.ALL_METHODS[:-1] if cfg.get("baselines") == "all" else _stages.DEFAULT_METHODS


def _search_fp(exp: Experiment, budget: str, methods) -> str:
  return fingerprint("search", _analyze_fp(exp), exp.cfg.search, budget, list(methods),
                     exp.cfg.get("num_random", 3), *_grid_part(exp.cfg))


def _search(exp: Experiment, analysis: dict, budget: str | None, methods) -> dict:
  wd, sc = exp.wd, exp.cfg.search
  budget = sc.budget if budget is None else budget
  if budget is not None and not str(budget).strip():
    from amq_jax.errors import BudgetError
    raise BudgetError("the budget is empty; give one, e.g. --budget 0.1MB, --avg-bits 3 or "
                      "--config.search.budget=uniform:3")
  methods = _methods(exp.cfg, methods)
  fp = _search_fp(exp, budget, methods)

  def compute():
    res = _stages.search_bits(exp.model, analysis["traces"], analysis.get("eigenvalues"),
                              analysis.get("activations"), sc, budget=budget, methods=methods,
                              num_random=exp.cfg.get("num_random", 3), grid=_grid(exp.cfg))
    res["budget_spec"] = str(budget)
    # Cleared only now: a budget that is rejected above leaves the previous search intact.
    shutil.rmtree(wd.path("search", mkdir=False), ignore_errors=True)
    for m, rec in res["methods"].items():
      _io.write_json(wd.method_bits(m), rec)
    _io.write_json(wd.bits, res["methods"]["hawq_v2"]["config"])
    _io.write_json(wd.frontier, res)
    try:
      from amq_jax.report import frontier_view, plot_frontier
      plot_frontier(frontier_view(res), wd.path("search", "frontier.png"))
    except Exception as e:  # noqa: BLE001
      warnings.warn(f"could not draw search/frontier.png: {e}")

  wd.cached("search", fp, [wd.frontier, wd.bits], compute)
  res = _io.read_json(wd.frontier, what="amq-jax search")
  if analysis.get("compare") is not None:
    res["curvature_compare"] = _curvature_compare(exp, analysis, str(budget), fp)
  return res


def _curvature_compare(exp: Experiment, analysis: dict, budget: str, search_fp: str) -> dict:
  """``search/curvature_compare.json``: both curvatures' traces and HAWQ-V2 picks at the
  search's budget, cached on the search and the second traces (toggling it leaves the
  search alone)."""
  path = exp.wd.path("search", "curvature_compare.json")

  def compute():
    res = _stages.compare_curvatures(exp.model, analysis["traces"], analysis["compare"],
                                     exp.cfg.search, budget=budget, grid=_grid(exp.cfg))
    res["search_fingerprint"] = search_fp  # the report pairs it only with this search
    _io.write_json(path, res)

  exp.wd.cached("search.curvature_compare", fingerprint("curvature_compare", search_fp,
                                                        _compare_fp(exp)), [path], compute)
  return _io.read_json(path, what="amq-jax search")


def _seeds(cfg) -> list[int]:
  seeds = cfg.finetune.get("seeds") or (cfg.get("seed", 0),)
  return [int(s) for s in seeds]


def _finetune_fp(exp: Experiment, config: dict, seed: int) -> str:
  return fingerprint("finetune", exp.fp32_fp, quant.BitConfig(config).to_dict(),
                     exp.cfg.finetune, seed, exp.cfg.search.get("symmetric", True),
                     *_grid_part(exp.cfg))


def _finetune(exp: Experiment, name: str, bits: quant.BitConfig, seed: int) -> dict:
  wd = exp.wd
  out = wd.finetune_dir(name, seed)
  rpath = os.path.join(out, "result.json")
  fp = _finetune_fp(exp, bits.to_dict(), seed)

  def compute():
    res = _stages.finetune_bits(exp.model, exp.task, bits, exp.cfg.finetune, out, seed=seed,
                                symmetric=bool(exp.cfg.search.get("symmetric", True)),
                                grid=_grid(exp.cfg), progress=exp.progress,
                                desc=f"finetune {name} seed {seed}")
    res["method"] = name
    _io.write_json(rpath, res)

  wd.cached(f"finetune/{name}/seed{seed}", fp, [rpath], compute, clear=[out])
  return _io.read_json(rpath, what="amq-jax finetune")


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _session(cfg, workdir: str):
  from amq_jax.config import validate_config
  validate_config(cfg)  # configs built in Python are checked like those from files
  _guard.check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  with _guard.workdir_lock(workdir):
    _io.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    yield


def train(cfg, workdir: str, *, progress: bool | None = None) -> dict:
  """The float model of the config (trained here unless the config names a shipped one)."""
  with _session(cfg, workdir):
    exp = build(cfg, workdir, progress=progress)
    return fp32_eval(exp)


def analyze(cfg, workdir: str, *, force: bool = False, progress: bool | None = None) -> dict:
  """Per-layer traces (+ eigenvalues, + activation analysis when configured)."""
  with _session(cfg, workdir):
    exp = build(cfg, workdir, progress=progress)
    out = _analyze(exp, force=force)
    if "compare" not in out:
      return out["traces"]
    return dict(out["traces"], compare=_stages.compare_traces(out["traces"], out["compare"]))


def search(cfg, workdir: str, *, budget: str | None = None,
           methods: Sequence[str] | None = None, progress: bool | None = None) -> dict:
  """The configurations of every method at the budget (``search/``)."""
  with _session(cfg, workdir):
    exp = build(cfg, workdir, progress=progress)
    res = _search(exp, _analyze(exp), budget, methods)
    res["table"] = format_bits_table(res)
    return res


def finetune(cfg, workdir: str, *, bits: str | None = None, name: str | None = None,
             progress: bool | None = None) -> dict:
  """QAT of a bits file (default ``search/bits.json``) into ``finetune/<name>/seed<k>``."""
  with _session(cfg, workdir):
    exp = build(cfg, workdir, progress=progress)
    path = bits or exp.wd.bits
    if name is None:
      name = "hawq_v2" if bits is None else os.path.splitext(os.path.basename(path))[0]
    name = _guard.safe_name(name, what="--name")
    if not os.path.isfile(path):
      raise StateError(f"bits file {path} does not exist; run `amq-jax search` first or "
                       "pass --bits FILE")
    cfgb = quant.load_bits_file(path, exp.model.layers.names)
    results = [_finetune(exp, name, cfgb, s) for s in _seeds(cfg)]
    return results[0] if len(results) == 1 else {"method": name, "seeds": results}


def run(cfg, workdir: str, *, budget: str | None = None, methods: Sequence[str] | None = None,
        progress: bool | None = None) -> dict:
  """Everything: FP32 -> analyze -> search -> finetune (each method and seed) -> report.

  Re-running reuses every stage whose fingerprint is unchanged and recomputes the rest.
  """
  with _session(cfg, workdir):
    exp = build(cfg, workdir, progress=progress)
    analysis = _analyze(exp)
    res = _search(exp, analysis, budget, methods)
    results = {}
    for name, rec in res["methods"].items():
      bits = quant.BitConfig(rec["config"])
      results[name] = [_finetune(exp, name, bits, s) for s in _seeds(cfg)]
    return _write_report(exp, analysis, res, results)


def report(cfg, workdir: str) -> dict:
  """Rewrites the report from the finished stages; runs nothing new."""
  wd = Workdir(workdir)
  for p in (wd.traces, wd.frontier):
    if not os.path.isfile(p):
      raise StateError(f"{p} does not exist; run `amq-jax run` (or analyze and search) first")
  with _session(cfg, workdir):
    exp = build(cfg, workdir, train_if_missing=False, progress=False)
    analysis = {"traces": _io.read_json(wd.traces, what="amq-jax analyze")}
    if os.path.isfile(wd.eigenvalues):
      analysis["eigenvalues"] = _io.read_json(wd.eigenvalues, what="amq-jax analyze")
    if os.path.isfile(wd.activations):
      analysis["activations"] = _io.read_json(wd.activations, what="amq-jax analyze")
    res = _io.read_json(wd.frontier, what="amq-jax search")
    cc = _finished_compare(cfg, wd)
    if cc is not None:
      res["curvature_compare"] = cc
    results = {}
    for name, rec in res["methods"].items():
      rs = []
      for s in _seeds(cfg):
        p = os.path.join(wd.finetune_dir(name, s), "result.json")
        st = wd.record(f"finetune/{name}/seed{s}")
        if os.path.isfile(p) and st and st.get("fingerprint") == _finetune_fp(
            exp, rec["config"], s):
          rs.append(_io.read_json(p, what="amq-jax finetune"))
      if rs:
        results[name] = rs
    return _write_report(exp, analysis, res, results)


def _finished_compare(cfg, wd: Workdir) -> dict | None:
  """The saved curvature comparison, if the config asks for one and it belongs to the
  saved search (never a comparison made for another budget or configuration)."""
  other = cfg.hessian.get("compare")
  path = wd.path("search", "curvature_compare.json", mkdir=False)
  st, search = wd.record("search.curvature_compare"), wd.record("search")
  if not other or not os.path.isfile(path) or not (st and st.get("done")) or not search:
    return None
  cc = _io.read_json(path, what="amq-jax search")
  if cc.get("compare") != other or cc.get("search_fingerprint") != search.get("fingerprint"):
    return None
  return cc


def format_bits_table(res: dict) -> str:
  recs = res["methods"]
  names = list(recs)
  layers = res["weights"]["layers"]
  counts = res["weights"]["counts"]
  lines = ["| layer | params | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
  for l, n in zip(layers, counts):
    lines.append(f"| {l} | {int(n)} | " + " | ".join(
        f"{recs[m]['config'][l]['w']}" + (f"/a{recs[m]['config'][l]['a']}"
                                          if res.get("activations") else "")
        for m in names) + " |")
  lines.append("| **size (MB)** | | " + " | ".join(f"{recs[m]['size_mb']:.4f}" for m in names) + " |")
  lines.append("| **avg bits** | | " + " | ".join(f"{recs[m]['avg_bits']:.3f}" for m in names) + " |")
  return "\n".join(lines)


def _write_report(exp: Experiment, analysis: dict, res: dict, results: dict) -> dict:
  from amq_jax.report import frontier_view, write_report
  wd = exp.wd
  fp32 = _io.read_json(wd.path("fp32", "eval.json"), what="the FP32 evaluation")
  return write_report(wd.root, config_name=exp.cfg.get("name", exp.cfg.model),
                      metric=exp.task.metric, fp32=fp32, search=res, results=results,
                      analysis=analysis, stages=wd.stages(), reused=dict(wd.reused),
                      frontier_plot=frontier_view(res),
                      curvature_compare=res.get("curvature_compare"))
