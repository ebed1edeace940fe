"""The stages of a run as functions: inputs -> result (plain data). No stage knows the task.

    analyze(model, task, hessian_cfg)              -> traces (+ eigenvalues, activations)
    search(model, analysis, search_cfg, budget)    -> {method: record with its BitConfig}
    finetune(model, task, bits, finetune_cfg, ...) -> result (metrics before/after, export)

The command functions in :mod:`amq_jax.pipeline._commands` read configs, cache these
results in a work directory and write the report.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from amq_jax import _io, alloc, hessian, quant
from amq_jax.adapters import Model
from amq_jax.errors import BudgetError, ConfigError, NonFiniteError
from amq_jax.pipeline._task import Task

__all__ = ["analyze_traces", "analyze_eigenvalues", "analyze_activations", "search_bits",
           "finetune_bits", "compare_section", "compare_traces", "compare_curvatures",
           "spearman", "DEFAULT_METHODS", "ALL_METHODS"]

DEFAULT_METHODS = ("hawq_v2", "uniform")
ALL_METHODS = ("hawq_v2", "uniform", "uniform_above", "weight_norm", "hawq_v1", "high_omega",
               "random", "uniform_act")


def _progress(cfg_value, default=True) -> bool:
  return default if cfg_value is None else bool(cfg_value)


# ---------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------
def analyze_traces(model: Model, task: Task, hc, *, progress: bool = True) -> dict:
  """Per-layer curvature traces of the float model (``hc``: the config's ``hessian``).

  ``hc.curvature``: ``'hessian'`` (Hutchinson on Hessian blocks, the paper's method),
  ``'ggn'`` or ``'fisher'`` (output-space probes; need ``task.logits_fn``; per example
  through the model's layer hooks where it has them).

  ``hc.ggn_method`` (GGN only): ``'sampled'`` (output-space probes to ``rtol``),
  ``'exact'`` (:func:`amq_jax.hessian.exact_ggn_traces`: one backward pass per column of the
  output Hessian's factor, ``C - 1`` for ``C`` classes, per-example gradients through the
  model's layer hooks where it has them; no sampling error) or ``'auto'``: exact when
  :func:`ggn_exact_is_cheaper`.
  """
  batches = task.first_batches(hc.num_examples, hc.batch_size)
  loss_fn = task.curvature_loss(model)
  curvature = hc.get("curvature", "hessian")
  kw = dict(key=jax.random.key(hc.seed), wrt=model.layers.params_paths,
            estimator=hc.estimator, rtol=hc.rtol, min_probes=hc.min_probes,
            max_probes=hc.max_probes, progress=progress)
  kw["curvature"] = curvature
  if curvature != "hessian":
    if task.logits_fn is None:
      raise ConfigError(f"hessian.curvature={curvature!r} needs logits (a task with "
                        "logits_fn); use 'hessian' for this task")
    kw["logits_fn"] = task.logits_fn(model)
    if model.act_apply is not None:  # per-example probes through the layer hooks
      kw["model"] = model
  for name in ("atol", "confidence"):
    if name in hc:
      kw[name] = hc[name]
  t0 = time.time()
  method = "sampled"
  if curvature == "ggn":
    method = hc.get("ggn_method", "sampled")
    if method == "auto":
      method = "exact" if ggn_exact_is_cheaper(model, kw["logits_fn"], batches,
                                               hc.min_probes) else "sampled"
  if method == "exact":
    est = hessian.exact_ggn_traces(kw["logits_fn"], model.params, batches,
                                   wrt=model.layers.params_paths, progress=progress,
                                   model=kw.get("model"))
  else:
    est = hessian.layer_traces(loss_fn, model.params, batches, **kw)
  layers = hessian.estimates_to_json(est)
  by_param = model.layers.by_param()
  out_layers = {}
  for p, e in layers.items():
    out_layers[by_param[p].name] = dict(e, param=p)
  estimator = {"hessian": hc.estimator}.get(
      curvature, "per-example output-space probes" if "model" in kw else "output-space probes")
  if method == "exact":
    estimator = "exact (one per-example pass per class)"
  return {"curvature": curvature, "estimator": estimator,
          "rtol": hc.rtol, "confidence": hc.get("confidence"),
          "num_examples": len(batches) * hc.batch_size, "seconds": time.time() - t0,
          "devices": jax.device_count(), "layers": out_layers}


EXACT_GGN_MAX_BYTES = 1 << 30


def ggn_exact_is_cheaper(model: Model, logits_fn, batches, min_probes: int) -> bool:
  """Whether the exact GGN trace costs no more than sampling it (``ggn_method='auto'``).

  Sampling cannot stop before ``min_probes`` probes, each one backward pass over every
  example; the exact trace is one per-example backward pass per output class ``C``. So exact
  is never the dearer of the two when ``C <= min_probes`` (ResNet20, 10 classes: 8.9 s vs
  68 s for the sampled GGN to 5%, benchmarks/RESULTS.md). It also holds a batch of
  per-example gradients (``batch_size x parameters`` floats): above 1 GiB, sampling.
  """
  out = jax.eval_shape(logits_fn, model.params, batches[0])
  classes = int(out.shape[-1]) if len(out.shape) == 2 else None
  if classes is None or classes > int(min_probes):
    return False
  n = int(sum(model.layers.counts()))
  batch = int(jax.tree_util.tree_leaves(batches[0])[0].shape[0])
  return 4 * n * batch <= EXACT_GGN_MAX_BYTES


def analyze_eigenvalues(model: Model, task: Task, hc, *, progress: bool = True) -> dict:
  """Top eigenvalue of every layer's Hessian block (HAWQ-V1) and the top-k spectrum of
  ``hc.eig_layers`` (is the top eigenvalue an outlier?)."""
  t0 = time.time()
  batches = task.first_batches(hc.num_examples, hc.batch_size)[: max(1, hc.eig_batches)]
  loss_fn = task.curvature_loss(model)
  key = jax.random.key(hc.seed + 1)
  layers = list(model.layers.values())
  it = layers
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(layers, desc="top eigenvalue per layer", unit="layer", dynamic_ncols=True)
  top1 = {}
  for i, l in enumerate(it):
    r = hessian.top_eigenvalues(loss_fn, model.params, batches, key=jax.random.fold_in(key, i),
                                k=1, layer=l.param, method=hc.top1_method, tol=hc.eig_tol,
                                max_iters=hc.top1_iters, progress=False)
    top1[l.name] = {"value": float(r.values[0]), "iterations": int(r.iterations),
                    "converged": bool(r.converged), "residual": float(r.residuals[0])}
  spectra = {}
  for j, name in enumerate(hc.eig_layers):
    l = model.layers[name]
    r = hessian.top_eigenvalues(loss_fn, model.params, batches,
                                key=jax.random.fold_in(key, 1000 + j), k=min(hc.eig_k, l.params),
                                layer=l.param, method="lanczos", tol=hc.eig_tol,
                                max_iters=hc.spectrum_iters, progress=progress)
    vals = [float(v) for v in r.values]
    spectra[l.name] = {"values": vals, "iterations": int(r.iterations),
                       "residuals": [float(x) for x in r.residuals],
                       "converged": bool(r.converged),
                       "top_over_second": vals[0] / vals[1] if len(vals) > 1 and vals[1] else None}
  return {"top1": top1, "spectra": spectra, "num_examples": len(batches) * hc.batch_size,
          "seconds": time.time() - t0}


def _observe_inputs(model: Model, params, state, batches, fn, *, input_key="image"):
  """Runs ``fn(name, x) -> dict of arrays`` on every layer's input; sums over batches."""
  act_apply = model.require_act_hooks()

  def run(params, x):
    acc: dict[str, Any] = {}

    def hook(name, a):
      r = fn(name, a)
      acc[name] = r if name not in acc else jax.tree.map(lambda u, v: u + v, acc[name], r)
      return a
    act_apply(params, state, x, hook, train=False)
    return acc

  run = jax.jit(run)
  total = None
  for b in batches:
    out = jax.device_get(run(params, b[input_key]))
    total = out if total is None else jax.tree.map(lambda u, v: u + v, total, out)
  return total


def activation_errors(model: Model, batches, ranges: Mapping, bit_choices: Sequence[int], *,
                      params=None, input_key: str = "image", grid: str = "amq") -> np.ndarray:
  """``[L, B]`` mean per-example ``||Q_a(x_l) - x_l||^2`` of each layer's input ``x_l``
  (summed over the layer's calls), ``Q_a`` the calibrated ``a``-bit activation quantizer
  (``grid='qwix'``: qwix's dynamic one, a symmetric scale per example; ``ranges`` unused):
  the activation analogue of ``||Q_b(W) - W||^2`` in Omega."""
  bits = [int(b) for b in bit_choices]
  import jax.numpy as jnp

  def q(name, a, b):
    if grid == "qwix":
      return quant.fake_quant(a, b, axis=0, grid="qwix")
    lo, hi = ranges[name]
    return quant.fake_quant_act(a, b, lo, hi)

  def fn(name, a):
    a = a.astype(jnp.float32)
    axes = tuple(range(1, a.ndim))
    return jnp.stack([jnp.sum(jnp.square(q(name, a, b) - a), axis=axes)
                      for b in bits], -1).sum(0)

  tot = _observe_inputs(model, model.params if params is None else params, model.state,
                        batches, fn, input_key=input_key)
  n = sum(int(np.shape(b[input_key])[0]) for b in batches)
  return np.stack([np.asarray(tot[l], np.float64) for l in model.layers.names]) / n


def analyze_activations(model: Model, task: Task, hc, act_bit_choices, *, calib_method: str,
                        progress: bool = True, grid: str = "amq") -> dict:
  """Activation traces (from the task), calibrated ranges and the activation Omega table
  (its errors on ``grid``'s activation quantizer)."""
  if task.activation_traces is None:
    raise ConfigError(f"the {task.name} task has no activation analysis; unset "
                      "search.act_budget")
  t0 = time.time()
  est = task.activation_traces(model, hc, jax.random.key(hc.seed + 2))
  calib = task.first_batches(hc.calib_examples, min(hc.calib_examples, 64))
  ranges = quant.calibrate_model(model, calib, {l: {"w": None, "a": 8} for l in model.layers},
                                 method=calib_method)
  errors = activation_errors(model, calib, ranges, act_bit_choices, grid=grid)
  names = model.layers.names
  sizes = model.layers.in_sizes()
  traces = np.array([est[l][0] for l in names], np.float64)
  return {"layers": names, "act_bit_choices": [int(b) for b in act_bit_choices],
          "traces": {l: {"trace": float(est[l][0]), "stderr": float(est[l][1]),
                         "elems": int(s), "avg_trace": float(t / s)}
                     for l, t, s in zip(names, traces, sizes)},
          "ranges": ranges, "errors": errors.tolist(), "grid": grid,
          "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------
def _ties(model: Model, sc) -> list[list[str]]:
  import re
  groups = []
  for pats in sc.get("tie", ()) or ():
    try:
      idx = [l for l in model.layers.names if any(re.fullmatch(p, l) for p in pats)]
    except re.error as e:
      raise ConfigError(f"search.tie pattern in {list(pats)} is not a valid regex: {e}") from None
    if len(idx) < 2:
      raise ConfigError(f"search.tie group {list(pats)} matches {len(idx)} layer(s); the "
                        f"model's layers are {model.layers.names}")
    groups.append(idx)
  return groups


def weight_problem(model: Model, traces: dict | None, eigen: dict | None, sc, *,
                   grid: str = "amq") -> alloc.Problem:
  """The weight-width :class:`amq_jax.alloc.Problem` of ``model`` (execution order); its
  quantization errors are those of ``grid`` ('amq' or 'qwix', the config's ``quant.grid``)."""
  names = model.layers.names
  bits = tuple(int(b) for b in sc.bit_choices)
  symmetric = bool(sc.get("symmetric", True))
  errors = alloc.quant_errors(model.params, model.layers, bits, symmetric=symmetric, grid=grid)
  fixed = alloc.fixed_size_bytes(model.params, model.layers, symmetric=symmetric)
  avg = None
  if traces is not None:
    if traces and all(isinstance(v, hessian.TraceEstimate) for v in traces.values()):
      # hessian.layer_traces' {weight path: TraceEstimate}, as auto_bits takes it
      by_param = model.layers.by_param()
      traces = {"layers": {by_param[p].name if p in by_param else p: e
                           for p, e in traces.items()}}
    avg = hessian_avg_traces(traces)
  top = None if eigen is None else {k: v["value"] for k, v in eigen["top1"].items()}
  act = sc.get("act_bits")
  return alloc.Problem(names, model.layers.counts(), bits, errors, kind="weights",
                       avg_traces=avg, top_eigs=top, macs=model.layers.macs(),
                       other_bits=act if act else None, fixed_bytes=fixed,
                       pinned=alloc.pins_first_last(names, sc.get("pin_first_last")),
                       tied=_ties(model, sc) or None)


def hessian_avg_traces(traces: dict) -> dict[str, float]:
  """``{layer: Tr/n}`` used in Omega (see ``hessian.sensitivity_traces`` for the treatment
  of negative and near-zero estimates when available)."""
  return dict(hessian.sensitivity_traces(traces["layers"]).avg_traces)


def act_problem(model: Model, acts: dict, sc, weight_bits: Sequence[int]) -> alloc.Problem:
  names = model.layers.names
  avg = {l: acts["traces"][l]["avg_trace"] for l in names}
  return alloc.Problem(names, model.layers.in_sizes(), acts["act_bit_choices"],
                       np.asarray(acts["errors"]), kind="activations", avg_traces=avg,
                       macs=model.layers.macs(), other_bits=list(weight_bits),
                       pinned=alloc.pins_first_last(names, sc.get("act_pin_first_last")),
                       tied=_shared_input_groups(model) if sc.get("tie_shared_inputs") else None)


def _shared_input_groups(model: Model) -> list[list[str]] | None:
  """Layers that read one tensor: one tensor, one activation quantizer, one width."""
  return model.layers.shared_inputs() or None


def search_bits(model: Model, traces: dict | None, eigen: dict | None, acts: dict | None,
                sc, *, budget: str, methods: Sequence[str], num_random: int = 3,
                grid: str = "amq") -> dict:
  """Every method's configuration at ``budget``, the frontier, and (with ``acts`` and
  ``sc.act_budget``) the activation widths chosen the same way at the activation budget.

  ``traces``: :func:`analyze_traces`' result or :func:`amq_jax.hessian.layer_traces`'
  ``{weight path: TraceEstimate}``.

  ``grid``: the integer grid whose quantization errors Omega weighs ('amq' or 'qwix').

  Returns the JSON-able search result: ``{'weights': alloc.allocate(...), 'activations':
  ... or None, 'methods': {name: record}, 'grid': grid}``; each record's ``config`` is the
  full ``{layer: {'w', 'a'}}`` bit configuration (execution order).
  """
  unknown = [m for m in methods if m not in ALL_METHODS]
  if unknown:
    raise ConfigError(f"unknown method(s) {unknown}; choose from {list(ALL_METHODS)}")
  pb = weight_problem(model, traces, eigen, sc, grid=grid)
  wmethods = [m for m in methods if m != "uniform_act"]
  if "hawq_v1" in wmethods and eigen is None:
    raise ConfigError("method 'hawq_v1' needs analyze/eigenvalues.json; run amq-jax analyze")
  t0 = time.perf_counter()
  w = alloc.allocate(pb, budget, wmethods, num_random=num_random)
  w["seconds"] = time.perf_counter() - t0
  w["fixed_bytes"] = pb.fixed_bytes
  names = model.layers.names
  act_default = sc.get("act_bits")
  act_res = None
  act_for: dict[str, list] = {}
  if acts is not None and sc.get("act_budget"):
    hawq_w = w["methods"]["hawq_v2"]["bits"]
    apb = act_problem(model, acts, sc, [hawq_w[l] for l in names])
    act_res = alloc.allocate(apb, sc.act_budget, ("hawq_v2", "uniform"))
    act_for["hawq_v2"] = [act_res["methods"]["hawq_v2"]["bits"][l] for l in names]
    act_for["uniform_act"] = [act_res["methods"]["uniform"]["bits"][l] for l in names]
  records = {}
  for m, rec in w["methods"].items():
    a = act_for.get("hawq_v2", [act_default] * len(names))
    records[m] = dict(rec, method=m, config={l: {"w": int(rec["bits"][l]), "a": a[i]}
                                             for i, l in enumerate(names)})
  if "uniform_act" in methods:
    if "uniform_act" not in act_for:
      raise ConfigError("method 'uniform_act' compares activation widths: set "
                        "search.act_budget (and run the activation analysis)")
    rec = w["methods"]["hawq_v2"]
    records["uniform_act"] = dict(rec, method="uniform_act", config={
        l: {"w": int(rec["bits"][l]), "a": act_for["uniform_act"][i]}
        for i, l in enumerate(names)})
  for m, r in records.items():
    r["act_bits"] = {l: c["a"] for l, c in r["config"].items()}
    if act_res is not None:
      key = "uniform" if m == "uniform_act" else "hawq_v2"
      ar = act_res["methods"][key]
      r["act"] = {k: ar[k] for k in ar if k != "bits"}
    r["size_mb"] = alloc.model_size_mb(model.params, r["config"], layers=model.layers,
                                       symmetric=bool(sc.get("symmetric", True)))
  return {"weights": w, "activations": act_res, "methods": records, "grid": grid}


# ---------------------------------------------------------------------------------------
# a second curvature beside the first (hessian.compare)
# ---------------------------------------------------------------------------------------
COMPARE_FIELDS = ("compare", "compare_max_probes")


def compare_section(hc):
  """The ``hessian`` section that measures the second curvature ``hc.compare``, or None.

  It is ``hc`` with ``curvature = hc.compare`` and, when ``hc.compare_max_probes`` is set,
  ``max_probes`` capped to it (``min_probes`` lowered to the cap if above it); every other
  field (examples, seed, rtol) is shared, so the two measurements differ only in curvature.
  """
  other = hc.get("compare")
  if not other:
    return None
  import ml_collections
  d = {k: v for k, v in (hc.to_dict() if hasattr(hc, "to_dict") else dict(hc)).items()
       if k not in COMPARE_FIELDS}
  d["curvature"] = other
  cap = hc.get("compare_max_probes")
  if cap is not None:
    d["max_probes"] = int(cap)
    d["min_probes"] = min(int(d.get("min_probes", cap)), int(cap))
  return ml_collections.ConfigDict(d)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman rank correlation of two equal-length sequences (tied values share their mean
  rank); NaN when either sequence is constant or has fewer than two values."""
  def ranks(v):
    v = np.asarray(v, np.float64)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v), np.float64)
    r[order] = np.arange(len(v), dtype=np.float64)
    for u in np.unique(v):  # ties: the mean of the ranks they span
      m = v == u
      r[m] = r[m].mean()
    return r
  if len(x) != len(y):
    raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
  if len(x) < 2:
    return float("nan")
  rx, ry = ranks(x), ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
  return float((rx * ry).sum() / den) if den > 0 else float("nan")


def compare_traces(traces: dict, other: dict) -> dict:
  """Two :func:`analyze_traces` results of one model side by side, without any search.

  Returns ``{'curvature', 'compare', 'layers_compared', 'spearman_trace',
  'spearman_avg_trace', 'layers': {layer: {'trace', 'avg_trace', 'status', 'probes' (each
  ``{curvature: value}``), 'ratio' (compare / curvature trace, None at a zero trace)}}}``.
  The rank correlations are what matters to the search: HAWQ-V2 only ranks layers by
  ``Tr / n`` against their quantization errors, so equal ranks give near-equal bits.
  """
  from amq_jax.errors import LayerError
  a, b = traces.get("curvature", "hessian"), other.get("curvature", "hessian")
  if a == b:
    raise ConfigError(f"both trace sets are curvature {a!r}; compare two different ones "
                      f"(hessian.compare must differ from hessian.curvature)")
  la, lb = traces["layers"], other["layers"]
  odd = sorted(set(la) ^ set(lb))
  if odd:
    raise LayerError(f"the {a} and {b} traces cover different layers ({odd}); delete "
                     f"analyze/traces_{b}.json and run `amq-jax analyze` again")
  names = list(la)
  rows = {}
  for l in names:
    ea, eb = la[l], lb[l]
    ta, tb = float(ea["trace"]), float(eb["trace"])
    rows[l] = {"trace": {a: ta, b: tb},
               "avg_trace": {a: float(ea["avg_trace"]), b: float(eb["avg_trace"])},
               "ratio": tb / ta if ta else None,
               "status": {a: ea.get("status"), b: eb.get("status")},
               "probes": {a: ea.get("probes"), b: eb.get("probes")}}
  col = lambda key, c: [rows[l][key][c] for l in names]  # noqa: E731
  return {"curvature": a, "compare": b, "layers_compared": len(names),
          "spearman_trace": spearman(col("trace", a), col("trace", b)),
          "spearman_avg_trace": spearman(col("avg_trace", a), col("avg_trace", b)),
          "layers": rows}


def compare_curvatures(model: Model, traces: dict, other: dict, sc, *, budget: str,
                       grid: str = "amq") -> dict:
  """:func:`compare_traces` plus the HAWQ-V2 bits each curvature picks at ``budget``.

  Both picks come from the one search (:func:`weight_problem` + ``Problem.select``, the
  exact frontier with the same pins, ties and bit choices); each pick's Omega is given
  under both curvatures, so one sees what choosing by the other curvature costs in the
  first one's terms (and the reverse); both on ``grid``'s quantization errors, as the
  search. Adds ``'budget'``, ``'picks': {curvature: {'bits',
  'avg_bits', 'size_mb', 'omega': {curvature: value}}}``, ``'layers_differ'`` (how many
  layers get another width), ``'differ'`` (their names) and ``'bits'`` per layer row.
  """
  out = compare_traces(traces, other)
  a, b = out["curvature"], out["compare"]
  problems = {a: weight_problem(model, traces, None, sc, grid=grid),
              b: weight_problem(model, other, None, sc, grid=grid)}
  names = model.layers.names
  picks = {c: [int(x) for x in pb.select(budget)] for c, pb in problems.items()}
  pa = problems[a]
  out["budget"] = str(budget)
  out["picks"] = {c: {"bits": dict(zip(names, bits)), "avg_bits": pa.cost(bits, "avg"),
                      "size_mb": pa.cost(bits, "mb"),
                      "omega": {o: pb.omega_of(bits) for o, pb in problems.items()}}
                  for c, bits in picks.items()}
  out["differ"] = [l for l, x, y in zip(names, picks[a], picks[b]) if x != y]
  out["layers_differ"] = len(out["differ"])
  for i, l in enumerate(names):
    out["layers"][l]["bits"] = {a: picks[a][i], b: picks[b][i]}
  return out


# ---------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------
def calibrate(model: Model, task: Task, bits: quant.BitConfig, fc) -> dict:
  n = int(fc.calib_examples)
  calib = task.first_batches(n, min(n, 128))
  return quant.calibrate_model(model, calib, bits, method=fc.calib_method)


def finetune_bits(model: Model, task: Task, bits: quant.BitConfig, fc, out_dir: str, *,
                  seed: int, symmetric: bool = True, grid: str = "amq", progress: bool = True,
                  desc: str = "finetune", evaluate_before: bool = True,
                  check_export: bool = True) -> dict:
  """QAT of ``bits`` from the float model into ``out_dir`` (resumable), export, re-check.

  Weights are fake-quantized per output channel (straight-through); inputs of layers with
  an ``'a'`` width use ranges calibrated once on the first training examples. The result
  holds the task metric before (post-training quantization) and after fine-tuning, and of
  the exported packed file evaluated again. A sweep that already knows the metric before
  fine-tuning (``evaluate_before=False``: ``ptq_<metric>`` is None) or needs no proof that the
  packed file evaluates the same (``check_export=False``: still exported and size-checked,
  ``exported_<metric>`` is None) saves one test-set pass each.

  ``grid``: the integer grid of training, export and evaluation ('amq' or 'qwix'; with
  'qwix' inputs are quantized per example as qwix does, so nothing is calibrated). The
  exported file is evaluated with the weights it stores.
  """
  from amq_jax import train

  t0 = time.time()
  os.makedirs(out_dir, exist_ok=True)
  rpath = os.path.join(out_dir, "act_ranges.json")
  if grid == "amq" and any(bits[l]["a"] is not None for l in bits.layers):
    if os.path.isfile(rpath):
      ranges = {k: tuple(v) for k, v in _io.read_json(rpath, what="the fine-tune").items()}
    else:
      ranges = calibrate(model, task, bits, fc)
      _io.write_json(rpath, ranges)
  else:
    ranges = {}
  qapply = quant.quantize_model(model, bits, act_ranges=ranges, symmetric=symmetric, grid=grid)
  before = task.evaluate(qapply, model.params, model.state) if evaluate_before else {}
  state, res = train.fit(task.train_loss(qapply), model.params, model.state,
                         task.train_source, fc, workdir=out_dir, seed=int(seed), desc=desc,
                         progress=progress, field_prefix="finetune")
  params, mstate = state.params, state.model_state
  after = task.evaluate(qapply, params, mstate)
  if not np.isfinite(after.get("loss", 0.0)):
    raise NonFiniteError(f"{desc}: the fine-tuned model's test loss is not finite; lower "
                         f"--config.finetune.learning_rate (now {fc.learning_rate})")
  export = export_model(model, os.path.join(out_dir, "model.amq"), params, mstate, bits,
                        ranges, symmetric=symmetric, grid=grid)
  exported = {}
  if check_export:
    exp_params, exp_state = load_exported(model, os.path.join(out_dir, "model.amq"), grid=grid)
    # The packed weights are on the grid already. Quantizing them again is the identity on
    # amq's grid (so the one compiled step serves), not on qwix's (its range grows by half a
    # step each time): there only the inputs are quantized.
    eapply = qapply
    if grid != "amq":
      eapply = quant.quantize_model(model, quant.BitConfig({
          l: {"w": None, "a": bits[l]["a"]} for l in bits.layers}), act_ranges=ranges,
          symmetric=symmetric, grid=grid)
    exported = task.evaluate(eapply, exp_params, exp_state)
  m = task.metric
  return {"bits": {l: bits[l]["w"] for l in bits.layers},
          "act_bits": {l: bits[l]["a"] for l in bits.layers},
          f"ptq_{m}": before.get(m), m: after[m], f"exported_{m}": exported.get(m),
          "test_metrics": after, "ptq_metrics": before, "export": export,
          "size_mb": export["computed_bytes"] / alloc.MB, "seed": int(seed), "grid": grid,
          "train": {k: v for k, v in res.items() if isinstance(v, (int, float, str))},
          "seconds": time.time() - t0}


def export_model(model: Model, path: str, params, state, bits: quant.BitConfig, ranges, *,
                 symmetric: bool = True, grid: str = "amq") -> dict:
  """Packed weights (``path``, on ``grid``) + float32 inference state (``path + '.state'``);
  the packed payload must equal the size the search used (``sizes_agree``)."""
  import flax.serialization
  info = quant.export_packed(params, bits, path, layers=model.layers, symmetric=symmetric,
                             grid=grid)
  _io.write_bytes(path + ".state", flax.serialization.msgpack_serialize(
      {"state": jax.device_get(state) if state else {},
       "act_ranges": {k: [float(x) for x in v] for k, v in (ranges or {}).items()},
       "bits": bits.to_dict()}))
  computed = alloc.model_size_bytes(params, bits.to_dict(), layers=model.layers,
                                    symmetric=symmetric)
  return {"file_bytes": os.path.getsize(path), "payload_bytes": info["payload_bytes"],
          "header_bytes": info["header_bytes"], "computed_bytes": computed,
          "sizes_agree": info["payload_bytes"] == computed,
          "inference_state_bytes": os.path.getsize(path + ".state")}


def load_exported(model: Model, path: str, *, grid: str | None = None):
  """``(params, state)`` of :func:`export_model`'s files, in ``model``'s tree structure
  (``grid``: require the file to be on that grid; None: either)."""
  import flax.serialization
  from amq_jax import _paths
  flat = quant.load_packed(path, grid=grid)
  flat = _paths.flatten(flat)
  params = _paths.merge(model.params, {k: v for k, v in flat.items()
                                       if k in _paths.flatten(model.params)})
  st = flax.serialization.msgpack_restore(_io.read_bytes(path + ".state", what="the fine-tune"))
  state = model.state
  if st.get("state"):
    state = flax.serialization.from_state_dict(model.state, st["state"])
  return params, state


def auto_bits(model: Model, traces, *, budget: str = "avg:4",
              bit_choices: Sequence[int] = (2, 3, 4, 8), pin_first_last: int | None = None,
              act_bits: int | None = None, symmetric: bool = True, grid: str = "amq"):
  """HAWQ-V2 bits for any adapted model, from Python: the least-Omega configuration within
  ``budget`` on the exact frontier, pins on the first and last layers in EXECUTION order.

  Args:
    model: an :class:`amq_jax.adapters.Model` (Linen, NNX, Equinox or plain JAX).
    traces: :func:`amq_jax.hessian.layer_traces`' result (keyed by weight path) or
      ``{layer name or weight path: Tr/n}``.
    budget: ``'avg:3'``, ``'0.5MB'``, ``'uniform:4'``, ``'bits:N'`` or ``'bops:1.2G'``.
    grid: the deployed integer grid the Omega table is for: 'amq', or 'qwix' (bit choices
      2..8) when the model will run under qwix.

  Returns:
    ``(BitConfig, info)``; info has ``size_mb``, ``avg_bits``, ``omega``, ``bits``.

  >>> traces = hessian.layer_traces(loss_fn, model.params, batch, key=key,
  ...                               wrt=model.layers.params_paths)
  >>> bits, info = pipeline.auto_bits(model, traces, budget='avg:3', pin_first_last=8)
  """
  import ml_collections
  by_param = model.layers.by_param()
  named = {(by_param[k].name if k in by_param else model.layers[k].name): v
           for k, v in dict(traces).items()}
  missing = [l for l in model.layers.names if l not in named]
  if missing:
    from amq_jax.errors import LayerError
    raise LayerError(f"no trace for layers {missing}; measure every layer "
                     "(wrt=model.layers.params_paths)")
  sc = ml_collections.ConfigDict(dict(bit_choices=tuple(bit_choices), symmetric=symmetric,
                                      act_bits=act_bits, pin_first_last=pin_first_last))
  pb = weight_problem(model, {"layers": named}, None, sc, grid=grid)
  names = model.layers.names
  bits = pb.select(budget)
  cfg = quant.BitConfig({l: {"w": int(b), "a": act_bits} for l, b in zip(names, bits)})
  rec = pb.record(bits)
  return cfg, {"size_mb": alloc.model_size_mb(model.params, cfg.to_dict(), layers=model.layers,
                                              symmetric=symmetric),
               "avg_bits": rec["avg_bits"], "omega": rec["omega"].get("hawq_v2"),
               "bits": dict(zip(names, map(int, bits)))}
