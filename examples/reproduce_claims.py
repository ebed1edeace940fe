"""The HAWQ-V2 authors' claims, checked on Fashion-MNIST with ResNet20 at SEVERAL budgets.

  python examples/reproduce_claims.py --workdir runs/claims \
      [--budgets avg:2.25 avg:2.5 avg:3 avg:4] [--seeds 3] [--epochs 0.5] \
      [--methods hawq_v2 weight_norm hawq_v1 high_omega random uniform] [--num-random 3] \
      [--also hessian] [--rank-configs 30] [--rank-qat 10] [--out benchmarks/claims.json]

One float model (the shipped checkpoint), one analysis (traces with the config's curvature,
GGN by default; eigenvalues), optionally traces with a second curvature (``--also hessian``:
the paper's Hessian, whose HAWQ-V2 pick joins the sweep as ``hawq_v2_<curvature>``), then
for every budget every method fine-tuned the same way with ``--seeds`` data orders.
Identical configurations (two methods agreeing) are fine-tuned once. For each method and budget: accuracy after calibrated post-training
quantization (PTQ) and after QAT, mean +- std; a figure of accuracy vs size with error bars.

Does Omega rank configurations? At the first budget's size, ``--rank-configs`` random
configurations (plus the method picks) are evaluated after PTQ, and ``--rank-qat`` of them
after QAT; the Spearman rank correlation between total Omega and accuracy is reported for
each sensitivity (Hessian trace, GGN, HAWQ-V1 eigenvalue, weight norm) with a bootstrap
95% interval (negative = lower Omega, higher accuracy: what the method assumes).

Claims (seed's (a)-(e)), each per budget as a paired comparison over seeds (mean
difference, t-interval) and a verdict: holds / no difference / reversed:
  (a) trace-weighted Omega (hawq_v2) vs ||Q(W)-W||^2 alone (weight_norm);
  (b) least vs highest Omega at the same size (hawq_v2 vs high_omega);
  (c) automatic selection (hawq_v2) vs the HAWQ-V1 ranking (hawq_v1);
  (d) top/second eigenvalue of a few layers (no single dominant outlier);
  (e) search time vs one HAQ episode (one fine-tuning epoch).
Every fine-tune is cached by fingerprint in the work directory: the script resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import numpy as np

from amq_jax import _io, alloc, quant
from amq_jax.config import load_config
from amq_jax.pipeline import _commands, _stages
from amq_jax.pipeline._workdir import fingerprint

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


# Paired comparisons per budget (the seed's claims (a)-(c), and against uniform widths).
PAIRS = {"a_trace_vs_weight_norm": ("hawq_v2", "weight_norm"),
         "b_low_vs_high_omega": ("hawq_v2", "high_omega"),
         "c_hawq_v2_vs_hawq_v1": ("hawq_v2", "hawq_v1"),
         "hawq_v2_vs_uniform": ("hawq_v2", "uniform")}


def spearman(x, y) -> float:
  """Spearman rank correlation; tied values share their mean rank (equal accuracies are
  common after PTQ at low widths), NaN when either side is constant."""
  return _stages.spearman(x, y)


def bootstrap_ci(x, y, *, n=2000, seed=0) -> tuple[float, float]:
  rng = np.random.default_rng(seed)
  x, y = np.asarray(x), np.asarray(y)
  vals = []
  for _ in range(n):
    i = rng.integers(0, len(x), len(x))
    v = spearman(x[i], y[i])
    if np.isfinite(v):
      vals.append(v)
  return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if vals else (
      float("nan"), float("nan"))


def paired(a: list[float], b: list[float]) -> dict:
  """Mean difference a - b over paired seeds, its 95% t-interval and a verdict."""
  d = np.asarray(a) - np.asarray(b)
  n = len(d)
  mean = float(d.mean())
  if n < 2:
    return {"mean_pp": 100 * mean, "ci_pp": None, "n": n, "verdict": "too few seeds"}
  half = T975.get(n - 1, 1.96) * float(d.std(ddof=1)) / math.sqrt(n)
  lo, hi = mean - half, mean + half
  verdict = "holds" if lo > 0 else ("reversed" if hi < 0 else "no difference")
  return {"mean_pp": 100 * mean, "ci_pp": [100 * lo, 100 * hi], "n": n, "verdict": verdict}


def qat(exp, name: str, config: dict, seed: int, epochs: float) -> dict:
  """One cached fine-tune, stored under the configuration's fingerprint (bits, fine-tune
  settings, seed): two methods that pick the same bits share it. The metric before
  fine-tuning is measured with seed 0 only (it does not depend on the seed)."""
  import ml_collections
  fc = ml_collections.ConfigDict(exp.cfg.finetune.to_dict())
  fc.num_epochs = float(epochs)
  fc.num_steps = None
  bits = quant.BitConfig(config)
  test = exp.cfg.get("test_limit")  # the test set the accuracy is measured on
  grid = [] if _grid(exp) == "amq" else [_grid(exp)]  # amq keys unchanged
  key = fingerprint("claims", exp.fp32_fp, bits.to_dict(), fc, test, *grid)[:12]
  out = os.path.join(exp.wd.root, "claims", key, f"seed{seed}")
  rpath = os.path.join(out, "result.json")
  fp = fingerprint("claims", exp.fp32_fp, bits.to_dict(), fc, test, *grid, seed)

  def compute():
    res = _stages.finetune_bits(exp.model, exp.task, bits, fc, out, seed=seed,
                                grid=_grid(exp), progress=exp.progress, desc=f"{name} seed {seed}",
                                evaluate_before=seed == 0, check_export=False)
    _io.write_json(rpath, res)
  exp.wd.cached(f"claims/{key}/seed{seed}", fp, [rpath], compute, clear=[out])
  res = _io.read_json(rpath)
  if seed != 0:
    res["ptq_accuracy"] = qat(exp, name, config, 0, epochs)["ptq_accuracy"]
  return res


def _grid(exp) -> str:
  """The integer grid of the config (``quant.grid``; 'amq' when the config predates it)."""
  q = exp.cfg.get("quant")
  return q.get("grid", "amq") if q is not None else "amq"


def ptq_accuracy(exp, config: dict, calib) -> float:
  """Calibrated post-training accuracy of one configuration, cached by its fingerprint."""
  bits = quant.BitConfig(config)
  grid = [] if _grid(exp) == "amq" else [_grid(exp)]
  key = fingerprint("ptq", exp.fp32_fp, bits.to_dict(), exp.cfg.finetune.calib_method,
                    exp.cfg.get("test_limit"), *grid)[:12]
  path = os.path.join(exp.wd.root, "claims", "ptq", f"{key}.json")
  if os.path.isfile(path):
    return float(_io.read_json(path)["accuracy"])
  ranges = {}
  if _grid(exp) == "amq":  # qwix quantizes inputs per example: no calibrated ranges
    ranges = quant.calibrate_model(exp.model, calib, bits,
                                   method=exp.cfg.finetune.calib_method)
  apply = quant.quantize_model(exp.model, bits, act_ranges=ranges, grid=_grid(exp))
  acc = float(exp.task.evaluate(apply, exp.model.params, exp.model.state)["accuracy"])
  _io.write_json(path, {"accuracy": acc, "bits": bits.to_dict()})
  return acc


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/resnet20_fmnist.py")
  ap.add_argument("--workdir", default="runs/claims")
  ap.add_argument("--budgets", nargs="+", default=["avg:2.25", "avg:2.5", "avg:3", "avg:4"])
  ap.add_argument("--methods", nargs="+",
                  default=["hawq_v2", "weight_norm", "hawq_v1", "high_omega", "random",
                           "uniform"])
  ap.add_argument("--num-random", type=int, default=3,
                  help="random configurations per budget in the sweep (method 'random')")
  ap.add_argument("--also", choices=("hessian", "ggn", "fisher"), default=None,
                  help="traces with a second curvature: its HAWQ-V2 pick joins the sweep "
                       "and its Omega the ranking test")
  ap.add_argument("--also-estimator", default=None,
                  help="estimator for --also hessian (default: the config's)")
  ap.add_argument("--also-max-probes", type=int, default=None)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--epochs", type=float, default=0.5, help="fine-tuning epochs per run")
  ap.add_argument("--rank-configs", type=int, default=30)
  ap.add_argument("--rank-qat", type=int, default=10)
  ap.add_argument("--rank-budget", default=None, help="budget of the ranking test "
                  "(default: the first of --budgets)")
  ap.add_argument("--out", default=None)
  ap.add_argument("overrides", nargs="*", help="config overrides FIELD=VALUE")
  ap.add_argument("--markdown", default=None, metavar="JSON",
                  help="print the tables of a finished (or partial) sweep's JSON, draw its "
                       "figure beside it (JSON -> .png) and exit")
  args = ap.parse_args(argv)
  if args.markdown:
    done = _io.read_json(args.markdown, what="the sweep's results")
    _rerank(done)
    print(to_markdown(done))
    if done.get("budgets"):
      _plot(done, os.path.splitext(args.markdown)[0] + ".png")
    return None
  cfg = load_config(args.config, args.overrides)
  t_start = time.time()
  with _commands._session(cfg, args.workdir):
    exp = _commands.build(cfg, args.workdir)
    t0 = time.perf_counter()
    analysis = _commands._analyze(exp)
    traces, eig = analysis["traces"], analysis["eigenvalues"]
    primary = cfg.hessian.get("curvature", "hessian")
    analysis_s = time.perf_counter() - t0
    also = None
    if args.also and args.also != primary:
      import ml_collections
      # The section that measured the first curvature, minus the fields naming a second one
      # (hessian.compare*, which are no input of any trace: they would only void the cache).
      hc = ml_collections.ConfigDict({k: v for k, v in cfg.hessian.to_dict().items()
                                      if k not in _stages.COMPARE_FIELDS})
      hc.curvature = args.also
      if args.also_estimator:
        hc.estimator = args.also_estimator
      if args.also_max_probes:
        hc.max_probes = args.also_max_probes
      path = exp.wd.path("analyze", f"traces_{args.also}.json")
      exp.wd.cached(f"analyze.{args.also}", fingerprint(args.also, exp.fp32_fp, hc), [path],
                    lambda: _io.write_json(path, _stages.analyze_traces(exp.model, exp.task, hc)))
      also = _io.read_json(path)
    out = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
           "epochs": args.epochs, "curvature": primary, "also": args.also,
           "budgets": {}, "machine": f"{os.uname().nodename}, {os.cpu_count()} CPUs",
           "jax": jax.__version__, "analysis_seconds": analysis_s,
           "traces": {"curvature": primary, "statuses": _statuses(traces)}}
    if also is not None:
      out["traces_also"] = {"curvature": args.also, "statuses": _statuses(also),
                            "seconds": also.get("seconds"),
                            "spearman_vs_primary": _trace_rank(traces, also)}
    wall = lambda: time.time() - t_start  # noqa: E731
    save = lambda: args.out and _io.write_json(args.out, dict(out, seconds=wall()))  # noqa
    # -- does Omega rank configurations? (after PTQ first: cheap, and the premise) ----------
    b0 = args.rank_budget or args.budgets[0]
    pb = _stages.weight_problem(exp.model, traces, eig, cfg.search, grid=_grid(exp))
    calib = exp.task.first_batches(int(cfg.finetune.calib_examples),
                                   min(int(cfg.finetune.calib_examples), 128))
    configs = [alloc.random_bits(pb, b0, seed=5000 + k) for k in range(args.rank_configs)]
    configs += [pb.select(b0, m) for m in pb.methods]
    names = pb.layers
    act = cfg.search.get("act_bits")
    as_config = lambda c: {l: {"w": int(b), "a": act} for l, b in zip(names, c)}  # noqa
    ptq = [ptq_accuracy(exp, as_config(c), calib) for c in configs]
    omegas = {m: [pb.omega_of(c, m) for c in configs] for m in pb.methods}
    omegas[f"hawq_v2[{primary}]"] = omegas.pop("hawq_v2")
    if also is not None:
      pa = _stages.weight_problem(exp.model, also, None, cfg.search, grid=_grid(exp))
      omegas[f"hawq_v2[{args.also}]"] = [pa.omega_of(c, "hawq_v2") for c in configs]
    rank = {"budget": b0, "configs": len(configs), "ptq": {}, "qat": {},
            "raw": {"bits": [list(map(int, c)) for c in configs], "ptq": ptq, "qat": [],
                    "omega": omegas}}
    for m, om in omegas.items():
      rank["ptq"][m] = {"spearman": spearman(om, ptq), "ci95": bootstrap_ci(om, ptq)}
    out["omega_rank"] = rank
    print("omega rank (PTQ)", json.dumps(rank["ptq"]), flush=True)
    save()
    # -- accuracy vs size at every budget --------------------------------------------------
    search_s = None
    for budget in args.budgets:
      t1 = time.perf_counter()
      res = _stages.search_bits(exp.model, traces, eig, None, cfg.search, budget=budget,
                                methods=args.methods, num_random=args.num_random,
                                grid=_grid(exp))
      search_s = search_s or time.perf_counter() - t1
      if also is not None:
        ra = _stages.search_bits(exp.model, also, None, None, cfg.search, budget=budget,
                                 methods=["hawq_v2"], grid=_grid(exp))
        res["methods"][f"hawq_v2_{args.also}"] = ra["methods"]["hawq_v2"]
      rows = {}
      for m, rec in res["methods"].items():
        rs = [qat(exp, f"{budget.replace(':', '')}_{m}", rec["config"], s, args.epochs)
              for s in range(args.seeds)]
        acc = [r["accuracy"] for r in rs]
        rows[m] = {"size_mb": rec["size_mb"], "avg_bits": rec["avg_bits"],
                   "omega": rec["omega"], "ptq": rs[0]["ptq_accuracy"],
                   "qat_mean": float(np.mean(acc)),
                   "qat_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
                   "qat": acc, "bits": rec["bits"],
                   "seconds_per_epoch": rs[0]["seconds"] / args.epochs}
      pairs = dict(PAIRS)
      if also is not None:
        pairs[f"{primary}_vs_{args.also}"] = ("hawq_v2", f"hawq_v2_{args.also}")
      claims = {}
      for key, (a, b) in pairs.items():
        if a in rows and b in rows:
          same = res["methods"][a]["bits"] == res["methods"][b]["bits"]
          claims[key] = dict(paired(rows[a]["qat"], rows[b]["qat"]), same_configuration=same,
                             methods=[a, b])
      out["budgets"][budget] = {"rows": rows, "claims": claims}
      print(budget, json.dumps(claims), flush=True)
      save()
    # -- ... and after QAT, for a subset -------------------------------------------------------
    k = min(args.rank_qat, len(configs))
    qat_acc = [qat(exp, f"rank{i}", as_config(c), 0, args.epochs)["accuracy"]
               for i, c in enumerate(configs[:k])]
    rank["raw"]["qat"] = qat_acc
    for m, om in omegas.items():
      rank["qat"][m] = {"spearman": spearman(om[:k], qat_acc),
                        "ci95": bootstrap_ci(om[:k], qat_acc)}
    save()
    # -- (d), (e) ----------------------------------------------------------------------------
    out["d_top_over_second"] = {k: v["top_over_second"] for k, v in eig["spectra"].items()}
    epoch_s = float(np.median([r["seconds_per_epoch"] for b in out["budgets"].values()
                               for r in b["rows"].values()]))
    e_search = traces["seconds"] + eig["seconds"] + (search_s or 0.0)
    out["e"] = {"search_seconds": e_search, "episode_seconds": epoch_s,
                "speedup_vs_haq_600_episodes": 600 * epoch_s / e_search}
    out["seconds"] = time.time() - t_start
    save()
  _plot(out, os.path.join(args.workdir, "accuracy_vs_size.png"))
  if args.out:
    _plot(out, os.path.splitext(args.out)[0] + ".png")
  print(to_markdown(out))
  return out


def _rerank(out: dict) -> None:
  """Recomputes the ranking test's correlations from its stored raw measurements."""
  rank = out.get("omega_rank")
  if not rank or "raw" not in rank:
    return
  raw = rank["raw"]
  for m, om in raw["omega"].items():
    rank["ptq"][m] = {"spearman": spearman(om, raw["ptq"]), "ci95": bootstrap_ci(om, raw["ptq"])}
    k = len(raw.get("qat") or [])
    if k:
      rank["qat"][m] = {"spearman": spearman(om[:k], raw["qat"]),
                        "ci95": bootstrap_ci(om[:k], raw["qat"])}


def to_markdown(out: dict) -> str:
  """The sweep's tables: accuracy per method and budget, the paired verdicts, Omega ranks."""
  lines = [f"Curvature: {out.get('curvature')}" + (f" (and {out['also']})" if out.get("also")
                                                   else "") +
           f"; {out.get('seeds')} fine-tuning seeds of {out.get('epochs')} epoch QAT each."]
  for budget, b in out.get("budgets", {}).items():
    lines += ["", f"**{budget}**", "",
              "| method | size (MB) | avg bits | Omega (trace-weighted) | PTQ | QAT mean +- std |",
              "|---|---:|---:|---:|---:|---:|"]
    for m, r in sorted(b["rows"].items(), key=lambda kv: -kv[1]["qat_mean"]):
      om = r["omega"].get("hawq_v2") if isinstance(r["omega"], dict) else r["omega"]
      lines.append(f"| {m} | {r['size_mb']:.4f} | {r['avg_bits']:.3f} | "
                   f"{om:.4g} | {100 * r['ptq']:.2f} | "
                   f"{100 * r['qat_mean']:.2f} +- {100 * r['qat_std']:.2f} |")
    lines += ["", "| comparison | mean diff (pp) | 95% t-interval (pp) | verdict | same bits | "
              "sizes (MB) |", "|---|---:|---|---|---|---|"]
    for k, c in b["claims"].items():
      ci = "-" if c["ci_pp"] is None else f"[{c['ci_pp'][0]:+.2f}, {c['ci_pp'][1]:+.2f}]"
      pair = c.get("methods") or PAIRS.get(k) or (
          ("hawq_v2", f"hawq_v2_{out['also']}") if out.get("also") else ())
      sizes = [b["rows"][m]["size_mb"] for m in pair if m in b["rows"]]
      size = " vs ".join(f"{x:.4f}" for x in sizes)
      if len(sizes) == 2 and abs(sizes[0] - sizes[1]) > 0.01 * max(sizes):
        size += " (**sizes differ**)"
      lines.append(f"| {k} | {c['mean_pp']:+.2f} | {ci} | {c['verdict']} | "
                   f"{'yes' if c.get('same_configuration') else 'no'} | {size} |")
  rank = out.get("omega_rank")
  if rank:
    lines += ["", f"Omega vs accuracy at {rank['budget']}, {rank['configs']} configurations "
              "(Spearman; negative = lower Omega, higher accuracy):", "",
              "| sensitivity | after PTQ [95% bootstrap] | after QAT [95% bootstrap] |",
              "|---|---|---|"]
    for m, v in rank["ptq"].items():
      q = rank.get("qat", {}).get(m)
      fmt = lambda x: f"{x['spearman']:+.2f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}]"  # noqa
      lines.append(f"| {m} | {fmt(v)} | {fmt(q) if q else '-'} |")
  return "\n".join(lines)


def _statuses(traces: dict) -> dict:
  """How many layers ended in each status (converged / max_probes / negative / near_zero)."""
  counts: dict[str, int] = {}
  for rec in traces["layers"].values() if "layers" in traces else []:
    st = rec.get("status", "converged" if rec.get("converged") else "max_probes")
    counts[st] = counts.get(st, 0) + 1
  return counts


def _trace_rank(a: dict, b: dict) -> float | None:
  """Spearman correlation of two trace files' per-layer traces (common layers)."""
  la, lb = a.get("layers", {}), b.get("layers", {})
  common = [k for k in la if k in lb]
  if len(common) < 3:
    return None
  return spearman([la[k]["trace"] for k in common], [lb[k]["trace"] for k in common])


def _plot(out: dict, path: str) -> None:
  """Accuracy vs size after PTQ (left) and after QAT with error bars over seeds (right)."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11, 4.5))
  axes = fig.subplots(1, 2)
  methods = sorted({m for b in out["budgets"].values() for m in b["rows"]})
  for m in methods:
    pts = sorted((b["rows"][m]["size_mb"], b["rows"][m]["ptq"], b["rows"][m]["qat_mean"],
                  b["rows"][m]["qat_std"]) for b in out["budgets"].values() if m in b["rows"])
    if not pts:
      continue
    x, ptq, y, e = (np.array(v) for v in zip(*pts))
    axes[0].plot(x, 100 * ptq, marker="o", label=m)
    axes[1].errorbar(x, 100 * y, yerr=100 * e, marker="o", capsize=3, label=m)
  for ax, what in zip(axes, ("before QAT (calibrated PTQ)",
                             f"after {out.get('epochs')} epoch QAT (mean +- std, "
                             f"{out.get('seeds')} seeds)")):
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"Accuracy vs size, {what}", fontsize=10)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
