"""Benchmark: per-layer curvature traces to a stated precision on the shipped ResNet20.

On the trained ResNet20 of the package (``amq_jax/assets/resnet20_fmnist.msgpack``) and
real Fashion-MNIST training images (256 by default), measures for each method the wall
time and the work until EVERY layer's trace has a relative standard error ``<= rtol``
(5%):

* ``per_layer``: Hutchinson on the Hessian, one restricted (one-layer) HVP per probe;
* ``hutchpp``: Hutch++ on the Hessian, per layer (``--sketch-size`` columns);
* ``ggn``: generalized Gauss-Newton from output-space probes, all layers per backward pass;
* ``fisher``: Monte-Carlo Fisher (sampled labels), all layers per backward pass;
* ``ggn_exact``: the exact GGN trace, 10 per-example backward passes (one per class).

The stopping rule is ``layer_traces``' Student-t rule at ``confidence=0.6827``: the
half-width ``t * stderr`` (``t ~ 1``) must be ``<= rtol * |trace|``, i.e. a relative
standard error of at most ``rtol``. Work is reported in the method's own unit
(restricted HVPs, VJPs) and in GRADIENT-EQUIVALENTS: wall seconds over the seconds of one
full gradient over every kernel on the same images, measured in the same process (compile
excluded everywhere: each method runs once with 1 probe first). A method stopped by
``--time-cap`` reports how many layers reached ``rtol`` and a projection of the work still
needed from each layer's sample variance (``k_l = (std_l / (rtol |mean_l|))^2`` probes).

Also the Spearman rank correlation across layers of each method's traces against the
Hessian ``per_layer`` traces (do GGN and Hessian rank the layers alike?), and the load
average before and after (run on a quiet machine: other jobs on the cores distort
every figure).

Usage::

    python benchmarks/bench_curvature.py --out bench_curvature.json           # full
    python benchmarks/bench_curvature.py --quick --out /tmp/bench_curvature.json
    python benchmarks/bench_curvature.py --methods per_layer,hutchpp --layers 0,1,-2,-1

``--layers`` restricts every method to some kernels (Hutch++ vs per_layer on a few layers
finishes where all 22 do not).

``--quick`` (32 images, 30 s cap per method, rtol 0.2) only checks that everything runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from amq_jax import _io, _paths, hessian  # noqa: E402
from _shipped import shipped_resnet20  # noqa: E402

CONFIDENCE_1SE = 0.6827  # two-sided: t_{0.841, k-1} ~ 1 standard error


def _data(n):
  from amq_jax.data import fashion_mnist
  ds = fashion_mnist.load("train", limit=n)
  return {"image": jnp.asarray(ds.images), "label": jnp.asarray(ds.labels, jnp.int32)}


def _grad_seconds(loss_fn, params, batches, wrt, reps, mesh):
  """Median wall time of one full gradient over ``wrt`` summed over ``batches``, each batch
  sharded over ``mesh`` as the estimators shard it (same devices, same unit)."""
  grad = jax.jit(lambda w, p, b: jax.grad(lambda w_: loss_fn(_paths.merge(p, w_), b))(w))
  w = hessian._sharding.replicate(_paths.select(params, wrt), mesh)
  params = hessian._sharding.replicate(params, mesh)
  batches = [hessian.shard_batch(b, mesh) for b in batches]
  jax.block_until_ready([grad(w, params, b) for b in batches])  # compile
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready([grad(w, params, b) for b in batches])
    ts.append(time.perf_counter() - t)
  return statistics.median(ts), ts


def _units(method, est, sketch):
  """Work in the method's unit, from the estimates (probes per layer)."""
  if method == "per_layer":
    return sum(e.probes for e in est.values()), "restricted HVPs"
  if method == "hutchpp":
    return (sum(e.probes + (2 * min(sketch, e.num_params) if e.num_params > sketch else 0)
                for e in est.values()), "restricted HVPs")
  if method == "ggn_exact":
    return 10, "per-example backward passes (classes)"
  return max(e.probes for e in est.values()), "VJPs (all layers each)"


def _rse(e):
  return float(e.stderr / abs(e.trace)) if e.trace else float("inf")


def _need(est, rtol):
  """Probes each layer would need to reach rtol, from its sample variance (>= 10)."""
  need = {}
  for p, e in est.items():
    s = np.asarray(e.samples)
    if s.size < 2 or np.all(s == s[0]):
      need[p] = max(s.size, 10)
      continue
    need[p] = max(10, int(np.ceil((s.std(ddof=1) / (rtol * max(abs(s.mean()), 1e-30))) ** 2)))
  return need


def _projection(method, est, rtol, sketch):
  """Units each method would need for every layer to reach rtol (sample variances)."""
  need = _need(est, rtol)
  if method == "per_layer":
    return sum(need.values())
  if method == "hutchpp":
    return sum(need[p] + (2 * sketch if e.num_params > sketch else 0) for p, e in est.items())
  return max(need.values())


def _pick_layers(paths, spec, ap):
  if not spec:
    return paths
  out = []
  for tok in (t.strip() for t in spec.split(",") if t.strip()):
    hits = ([paths[int(tok)]] if tok.lstrip("-").isdigit() and -len(paths) <= int(tok) < len(paths)
            else [p for p in paths if tok in p])
    if not hits:
      ap.error(f"--layers: {tok!r} matches none of {paths}")
    out += [p for p in hits if p not in out]
  return [p for p in paths if p in out]


def _spearman(a, b):
  from scipy.stats import spearmanr
  return float(spearmanr(a, b).statistic)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="bench_curvature.json")
  ap.add_argument("--quick", action="store_true",
                  help="32 images, 30 s cap per method, rtol 0.2: checks that it runs")
  ap.add_argument("--num-examples", type=int, default=None, help="default 256 (quick 32)")
  ap.add_argument("--batch-size", type=int, default=128)
  ap.add_argument("--rtol", type=float, default=None, help="default 0.05 (quick 0.2)")
  ap.add_argument("--time-cap", type=float, default=None,
                  help="seconds per method (default 3600, quick 30)")
  ap.add_argument("--methods", default="per_layer,hutchpp,ggn,fisher,ggn_exact")
  ap.add_argument("--sketch-size", type=int, default=hessian._trace.DEFAULT_SKETCH)
  ap.add_argument("--vjp-probes-per-step", type=int, default=4,
                  help="GGN/Fisher probes per jitted step (one forward pass serves them)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--layers", default="",
                  help="only these layers: comma-separated indices into the 22 kernels "
                       "(execution order) or substrings of their paths (default all)")
  args = ap.parse_args(argv)
  quick = args.quick
  n = args.num_examples or (32 if quick else 256)
  rtol = args.rtol or (0.2 if quick else 0.05)
  cap = args.time_cap or (30.0 if quick else 3600.0)
  bs = min(args.batch_size, n)
  if n % bs:
    ap.error(f"--num-examples {n} must be a multiple of --batch-size {bs}")
  load_before = os.getloadavg()

  model, variables = shipped_resnet20(ap)
  params = variables["params"]
  data = _data(n)
  batches = [jax.tree.map(lambda a: a[i:i + bs], data) for i in range(0, n, bs)]
  loss_fn = hessian.linen_loss_fn(model, variables)
  logits_fn = hessian.linen_logits_fn(model, variables)
  wrt = _pick_layers(_paths.quantizable_paths(params), args.layers, ap)
  mesh = hessian.default_mesh()

  t_grad, grad_runs = _grad_seconds(loss_fn, params, batches, wrt, 3 if quick else 7, mesh)
  print(f"[bench] one full gradient over {n} images: {t_grad:.3f} s (median)", flush=True)
  result = {"model": "resnet20", "weights": "shipped", "num_examples": n, "batch_size": bs,
            "layers": len(wrt), "layer_paths": wrt, "rtol": rtol, "confidence": CONFIDENCE_1SE,
            "time_cap_s": cap, "quick": quick, "sketch_size": args.sketch_size,
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_before": list(load_before), "grad_seconds": t_grad,
            "grad_seconds_runs": grad_runs}

  def run(method, key, **kw):
    common = dict(key=key, wrt=wrt, mesh=mesh, progress=not quick)
    if method == "ggn_exact":
      return hessian.exact_ggn_traces(logits_fn, params, batches, wrt=wrt, mesh=mesh)
    if method in ("ggn", "fisher"):
      return hessian.layer_traces(None, params, batches, curvature=method, logits_fn=logits_fn,
                                  probes_per_step=args.vjp_probes_per_step, **common, **kw)
    return hessian.layer_traces(loss_fn, params, batches, estimator=method,
                                sketch_size=args.sketch_size, **common, **kw)

  runs = {}
  for method in [m for m in args.methods.split(",") if m]:
    if method != "ggn_exact":  # compile (and Hutch++'s sketch) outside the timing
      run(method, jax.random.key(10_000 + args.seed), min_probes=1, max_probes=1)
    else:
      run(method, None)
    t = time.perf_counter()
    est = (run(method, None) if method == "ggn_exact" else
           run(method, jax.random.key(args.seed), rtol=rtol, confidence=CONFIDENCE_1SE,
               min_probes=10, max_probes=1_000_000, max_time=cap))
    dt = time.perf_counter() - t
    units, unit = _units(method, est, args.sketch_size)
    at = sum(_rse(e) <= rtol or e.stderr == 0 for e in est.values())
    statuses = {s: sum(e.status == s for e in est.values()) for s in hessian.STATUSES}
    need = None if method == "ggn_exact" else _projection(method, est, rtol, args.sketch_size)
    runs[method] = {
        "seconds": dt, "grad_equivalents": dt / t_grad, "units": units, "unit": unit,
        "layers_at_rtol": int(at), "all_at_rtol": bool(at == len(est)), "statuses": statuses,
        "projected_units_to_rtol": need,
        "projected_seconds_to_rtol": (None if need is None else
                                      float(need * dt / max(units, 1))),
        "max_rse": max(_rse(e) for e in est.values()),
        "projected_probes_per_layer": None if method == "ggn_exact" else _need(est, rtol),
        "traces": {p: e.trace for p, e in est.items()},
        "estimates": hessian.estimates_to_json(est)}
    print(f"[bench] {method}: {dt:.1f} s = {dt / t_grad:.0f} gradient-equivalents, {units} "
          f"{unit}, {at}/{len(est)} layers at rse <= {rtol}"
          + ("" if need is None else f", projected {need} {unit} to rtol"), flush=True)
  result["methods"] = runs

  ref = runs.get("per_layer") or runs.get("hutchpp")
  if ref is not None and len(wrt) > 2:
    base = [ref["traces"][p] for p in wrt]
    result["spearman_vs_hessian"] = {
        m: _spearman(base, [r["traces"][p] for p in wrt]) for m, r in runs.items()
        if r is not ref}
  if "ggn_exact" in runs:
    exact = runs["ggn_exact"]["traces"]
    result["sum_traces"] = {m: float(sum(r["traces"].values())) for m, r in runs.items()}
    result["ggn_sampled_vs_exact_max_rel"] = {
        m: max(abs(runs[m]["traces"][p] - exact[p]) / abs(exact[p]) for p in wrt)
        for m in ("ggn", "fisher") if m in runs}
  result["load_after"] = list(os.getloadavg())

  lines = [f"## Curvature traces to rse <= {rtol}: ResNet20 (shipped), {n} Fashion-MNIST "
           f"training images, {len(wrt)} layers, {len(jax.devices())} "
           f"{jax.devices()[0].platform} device(s){' (quick)' if quick else ''}", "",
           f"One full gradient: {t_grad:.3f} s. Load average before "
           f"{load_before[0]:.2f}, after {result['load_after'][0]:.2f}.", "",
           "| method | wall (s) | gradient-equivalents | work | layers at rtol | "
           "projected work to rtol | Spearman vs Hessian |", "|---|---|---|---|---|---|---|"]
  for m, r in runs.items():
    sp = result.get("spearman_vs_hessian", {}).get(m)
    lines.append(f"| {m} | {r['seconds']:.1f} | {r['grad_equivalents']:.0f} | {r['units']} "
                 f"{r['unit']} | {r['layers_at_rtol']}/{len(wrt)} | "
                 f"{'' if r['projected_units_to_rtol'] is None else r['projected_units_to_rtol']}"
                 f" | {'' if sp is None else f'{sp:.3f}'} |")
  if "per_layer" in runs and "hutchpp" in runs:  # layer by layer: does the sketch pay?
    k = args.sketch_size
    lines += ["", f"Per layer, one-layer HVPs to rse <= {rtol} (projected from sample variances; "
              f"Hutch++ adds 2 x {k} sketch HVPs a layer larger than {k}):", "",
              "| layer | params | Hutchinson | Hutch++ (probes + sketch) |", "|---|---:|---:|---:|"]
    a, b = runs["per_layer"], runs["hutchpp"]
    for p in wrt:
      n_p = b["estimates"][p]["num_params"]
      extra = 2 * k if n_p > k else 0
      lines.append(f"| {p} | {n_p} | {a['projected_probes_per_layer'][p]} | "
                   f"{b['projected_probes_per_layer'][p] + extra} |")
  table = "\n".join(lines)
  print(table)
  result["table_md"] = table
  _io.write_json(args.out, result)
  print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
  main()
