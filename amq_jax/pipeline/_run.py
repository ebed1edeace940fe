"""``amq-jax run``: FP32 -> analyze -> search -> finetune -> report, each stage cached."""
from __future__ import annotations

import os
import time


from amq_jax import alloc, train
from amq_jax.pipeline._analyze import analyze
from amq_jax.pipeline._common import Context, read_json, write_json
from amq_jax.pipeline._finetune import finetune, load_bits
from amq_jax.pipeline._search import ALL_METHODS, DEFAULT_METHODS, search


class Timer:
  """Stage durations, kept in ``timings.json`` across resumed runs (a skipped stage keeps
  the time it took when it ran)."""

  def __init__(self, path):
    self.path = path
    self.t = read_json(path) if os.path.isfile(path) else {}

  def run(self, name, fn, *, done: bool):
    if done and name in self.t:
      return fn()
    t0 = time.time()
    out = fn()
    self.t[name] = time.time() - t0
    write_json(self.path, self.t)
    return out


def fp32_summary(ctx: Context) -> dict:
  path = ctx.wd.path("fp32", "eval.json")
  if not os.path.isfile(path):
    ev = ctx.evaluate(train.linen_apply_fn(ctx.model), ctx.variables)
    write_json(path, {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
                      "size_mb": alloc.model_size_mb(ctx.params), "source": ctx.fp32_source})
  return read_json(path)


def run(cfg, workdir: str, *, methods=None, progress=None) -> dict:
  """The main job. Re-running skips finished stages; a killed run resumes where it stopped.

  Returns the report (also in ``workdir/report.json`` and ``report.md``).
  """
  os.makedirs(workdir, exist_ok=True)
  timer = Timer(os.path.join(workdir, "timings.json"))
  ctx = timer.run("fp32", lambda: Context(cfg, workdir, progress=progress),
                  done=os.path.isfile(os.path.join(workdir, "fp32", "variables.msgpack")))
  fp32 = fp32_summary(ctx)
  timer.run("analyze", lambda: analyze(ctx),
            done=os.path.isfile(ctx.wd.traces) and os.path.isfile(ctx.wd.eigenvalues))
  methods = tuple(methods or (ALL_METHODS if cfg.get("baselines") == "all" else DEFAULT_METHODS))
  records = timer.run("search", lambda: search(ctx, methods=methods, verbose=False),
                      done=False)
  results = {}
  for name in records:
    bits = load_bits(ctx, ctx.wd.method_bits(name))
    results[name] = timer.run(f"finetune {name}", lambda b=bits, n=name: finetune(ctx, b, n),
                              done=os.path.isfile(os.path.join(ctx.wd.finetune_dir(name),
                                                               "result.json")))
  return _write(ctx, fp32, records, results, timer.t)


def _write(ctx: Context, fp32, records, results, timings) -> dict:
  from amq_jax.report import write_report
  return write_report(ctx.wd.root, config_name=ctx.cfg.get("name", ctx.cfg.model), fp32=fp32,
                      frontier=read_json(ctx.wd.frontier), records=records, results=results,
                      eigen=read_json(ctx.wd.eigenvalues), traces=read_json(ctx.wd.traces),
                      timings=dict(timings))


def report(cfg, workdir: str) -> dict:
  """Rewrites the report from the stages that have finished; runs nothing.

  Raises:
    FileNotFoundError: analysis or search has not run yet.
  """
  ctx = Context(cfg, workdir, train_if_missing=False, progress=False)
  for p in (ctx.wd.traces, ctx.wd.eigenvalues, ctx.wd.frontier):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"{p} does not exist; run amq-jax run (or analyze and search)")
  mdir = os.path.dirname(ctx.wd.method_bits("x"))
  records = {os.path.splitext(f)[0]: read_json(os.path.join(mdir, f))
             for f in sorted(os.listdir(mdir)) if f.endswith(".json")}
  results = {}
  for name in records:
    rp = os.path.join(ctx.wd.finetune_dir(name), "result.json")
    if os.path.isfile(rp):
      results[name] = read_json(rp)
  tp = os.path.join(workdir, "timings.json")
  return _write(ctx, fp32_summary(ctx), records, results, read_json(tp) if os.path.isfile(tp) else {})
