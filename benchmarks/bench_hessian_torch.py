"""amq-jax's Hessian traces side by side with PyTorch (hand-written loops and PyHessian).

One process, one batch, the same weights in both frameworks:

1. Builds the Flax model (``--model``, default ResNet20) with a trained checkpoint
   (``--variables`` = flax msgpack of ``{'params', 'batch_stats'}``) or a random init, copies
   it into the PyTorch twin (``torch_reference.py``) and checks the eval-mode logits agree.
2. Times, with ``torch.set_num_threads(2)``: a torch gradient; a torch Hessian-vector product
   (fresh: forward + ``create_graph`` backward + double backward; reused: the double
   backward alone on a kept graph, i.e. one PyHessian probe); the torch per-layer loop
   (PyHessian/MQBench style, one HVP per layer per probe) and the torch joint loop (NNCF
   style) until every layer's trace has ``stderr <= rtol * |trace|``.
3. If ``amq_jax.hessian`` imports: its gradient / HVP times and ``layer_traces`` with the
   ``'joint'``, ``'per_layer'`` and ``'adaptive'`` estimators, same stopping rule. Compilation
   is timed apart (a one-probe warm-up call); the estimator times are warm.
4. Cross-check against code we did not write: PyPI ``pyhessian``'s whole-model trace
   (``hessian(model, criterion, data=(x, y), cuda=False).trace(...)``, Conv/Linear weights
   only) must agree with the SUM of the per-layer traces (amq-jax ``per_layer`` if run, else
   the torch per-layer loop), within the combined standard error (z-score printed), and
   amq-jax's per-layer traces with the torch loop's, layer by layer.

Prints a Markdown table (times and ratios; the machine may be shared, so ratios measured in
the same run are the figures to quote) and writes JSON to ``--out``.

    python benchmarks/bench_hessian_torch.py --out /tmp/bench_torch.json
    python benchmarks/bench_hessian_torch.py --variables work/fp32/variables.msgpack
    python benchmarks/bench_hessian_torch.py --quick          # small, about a minute

Random init note: the CIFAR ResNet zero-initializes every block's ``bn2`` scale, which makes
every block conv's Hessian block exactly zero (those layers stop at ``min_probes`` for every
method); with a random init the benchmark therefore sets all BatchNorm scales to 1 unless
``--zero-init-bn`` is given. A trained checkpoint is the representative case.

Measured (2 shared, heavily loaded cores; ResNet20 at 2.1 epochs of Fashion-MNIST training,
batch 128, rtol 0.05, min 10 / max 20 probes): no method reached 5% on every layer within
20 probes; to the cap, torch joint loop / amq-jax joint = 3.9x (3.5x in a 40-probe run),
torch per-layer loop / amq-jax adaptive = 33x; PyHessian's whole-model trace agreed with
every sum of per-layer traces (|z| <= 0.32).

PyHessian 0.1 runs with torch 2.13 unpatched (it imports the deprecated but present
``torch.autograd.Variable``); its ``trace`` stop rule ``|mean_k - mean_{k-1}| / (mean_{k-1} +
1e-6) < tol`` is disabled with ``tol=-inf`` so that it takes exactly ``--pyhessian-probes``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as tr  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from amq_jax import _paths, models, train  # noqa: E402
from amq_jax.data import fashion_mnist  # noqa: E402

try:
  from amq_jax import hessian as amq_hessian
except ImportError as e:  # the JAX engine may not exist yet in a checkout
  amq_hessian = None
  _HESSIAN_IMPORT_ERROR = repr(e)


def _median_time(fn, reps: int) -> float:
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _prepare_variables(args, model):
  if args.variables:
    variables = train.restore_variables(args.variables)
    source = f"checkpoint {args.variables}"
  else:
    variables = train.init_variables(model, models.default_input_shape(args.model), seed=0)
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
    source = "random init (seed 0)"
    if not args.zero_init_bn:
      variables = dict(variables)
      variables["params"] = _paths.map_paths(
          lambda p, v: np.ones_like(v) if p.endswith("scale") else v, variables["params"])
      source += ", BatchNorm scales set to 1"
  variables = {k: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)
               for k, v in variables.items() if k in ("params", "batch_stats")}
  return variables, source


def _summary(traces) -> dict:
  return {p: {"trace": float(e.trace), "stderr": float(e.stderr), "probes": int(e.probes),
              "num_params": int(e.num_params), "converged": bool(e.converged)}
          for p, e in traces.items()}


def _sum_trace(traces) -> tuple[float, float]:
  """Sum of per-layer traces and its standard error (layers treated as independent)."""
  tot = sum(float(e.trace) for e in traces.values())
  se = math.sqrt(sum(float(e.stderr) ** 2 for e in traces.values()))
  return tot, se


def _layer_z(a, b) -> dict:
  zs = {}
  for p in a:
    if p in b:
      se = math.hypot(float(a[p].stderr), float(b[p].stderr))
      d = float(a[p].trace) - float(b[p].trace)
      zs[p] = 0.0 if d == 0 else (d / se if se > 0 else float("inf"))
  return zs


def run_pyhessian(torch_model, x, y, probes: int, seed: int) -> dict:
  from pyhessian import hessian as pyhessian_hessian
  torch.manual_seed(seed)  # PyHessian draws probes from torch's global generator
  t0 = time.perf_counter()
  h = pyhessian_hessian(torch_model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
  t1 = time.perf_counter()
  vals = np.asarray(h.trace(maxIter=probes, tol=-math.inf), np.float64)
  t2 = time.perf_counter()
  for p in torch_model.parameters():  # PyHessian leaves graph-carrying .grad behind
    p.grad = None
  return {"trace": float(vals.mean()), "stderr": float(vals.std(ddof=1) / math.sqrt(vals.size)),
          "probes": int(vals.size), "setup_s": t1 - t0, "seconds": t2 - t1,
          "s_per_probe": (t2 - t1) / vals.size,
          "num_params": int(sum(p.numel() for p in h.params))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=None, help="registry name (default resnet20; "
                  "resnet_tiny with --quick)")
  ap.add_argument("--variables", default=None, help="flax msgpack {'params','batch_stats'}")
  ap.add_argument("--zero-init-bn", action="store_true",
                  help="with a random init, keep the zero-initialized bn2 scales")
  ap.add_argument("--batch", type=int, default=None, help="examples (default 128)")
  ap.add_argument("--rtol", type=float, default=None, help="stop at stderr <= rtol*|trace|")
  ap.add_argument("--min-probes", type=int, default=None)
  ap.add_argument("--max-probes", type=int, default=None)
  ap.add_argument("--pyhessian-probes", type=int, default=None)
  ap.add_argument("--reps", type=int, default=None, help="repetitions of grad/HVP timings")
  ap.add_argument("--estimators", default="joint,per_layer,adaptive",
                  help="amq-jax estimators to run, comma-separated")
  ap.add_argument("--torch-adaptive", action="store_true",
                  help="also time the torch joint loop probing only unconverged layers")
  ap.add_argument("--no-amq", action="store_true", help="skip the amq-jax side")
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--quick", action="store_true", help="small settings for a smoke run")
  ap.add_argument("--out", default=None, help="JSON output path")
  args = ap.parse_args(argv)
  q = args.quick
  args.model = args.model or ("resnet_tiny" if q else "resnet20")
  args.batch = args.batch or (32 if q else 128)
  args.rtol = args.rtol if args.rtol is not None else (0.2 if q else 0.05)
  args.min_probes = args.min_probes or (4 if q else 10)
  args.max_probes = args.max_probes or (12 if q else 200)
  args.pyhessian_probes = args.pyhessian_probes or (10 if q else 60)
  args.reps = args.reps or (2 if q else 3)
  torch.set_num_threads(args.threads)

  out: dict = {"config": {k: v for k, v in vars(args).items()},
               "torch_version": torch.__version__, "jax_version": jax.__version__,
               "jax_devices": [str(d) for d in jax.devices()],
               "torch_threads": torch.get_num_threads()}
  model = models.get_model(args.model)
  variables, source = _prepare_variables(args, model)
  out["weights"] = source
  ds = fashion_mnist.load("train", limit=args.batch)
  batch = {"image": ds.images, "label": ds.labels}
  x = torch.from_numpy(np.ascontiguousarray(ds.images.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(ds.labels.astype(np.int64))

  # 1. Same function in both frameworks.
  tmodel = tr.kernels_only_trainable(tr.torch_model_like(model, variables))
  out["logits_max_abs_diff"] = tr.check_logits_match(model, variables, tmodel, ds.images)
  print(f"# {args.model}, batch {args.batch}, {source}; logits max |diff| "
        f"{out['logits_max_abs_diff']:.2e}", flush=True)

  stop = dict(rtol=args.rtol, min_probes=args.min_probes, max_probes=args.max_probes)
  times: dict = {}
  W = list(tr.kernel_params(tmodel).values())

  # 2. Torch gradient / HVP.
  def t_grad():
    torch.autograd.grad(F.cross_entropy(tmodel(x), y), W)

  gen = torch.Generator().manual_seed(args.seed)
  zt = [tr.rademacher(w.shape, gen) for w in W]

  def t_hvp_fresh():
    g = torch.autograd.grad(F.cross_entropy(tmodel(x), y), W, create_graph=True)
    torch.autograd.grad(g, W, grad_outputs=zt)

  t_grad()  # warm-up (allocator)
  times["torch_grad"] = _median_time(t_grad, args.reps)
  t_hvp_fresh()
  times["torch_hvp_fresh"] = _median_time(t_hvp_fresh, args.reps)
  g_kept = torch.autograd.grad(F.cross_entropy(tmodel(x), y), W, create_graph=True)
  times["torch_hvp_reused"] = _median_time(
      lambda: torch.autograd.grad(g_kept, W, grad_outputs=zt, retain_graph=True), args.reps)
  del g_kept
  print(f"torch grad {times['torch_grad']:.3f}s  HVP fresh {times['torch_hvp_fresh']:.3f}s  "
        f"reused {times['torch_hvp_reused']:.3f}s", flush=True)

  # 3. amq-jax gradient / HVP / compilation.
  amq: dict = {}
  runs: dict = {}
  jax_side = not args.no_amq and amq_hessian is not None
  if not jax_side:
    out["amq_jax"] = ("skipped (--no-amq)" if args.no_amq
                      else f"amq_jax.hessian not importable: {_HESSIAN_IMPORT_ERROR}")
    print(f"amq-jax: {out['amq_jax']}", flush=True)
  else:
    loss_fn = amq_hessian.linen_loss_fn(model, variables)
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    wrt = _paths.quantizable_paths(params)
    w0 = _paths.select(params, wrt)
    grad_fn = jax.jit(jax.grad(lambda w, b: loss_fn(_paths.merge(params, w), b)))
    jbatch = jax.tree_util.tree_map(jnp.asarray, batch)
    t0 = time.perf_counter()
    jax.block_until_ready(grad_fn(w0, jbatch))
    times["amq_grad_compile"] = time.perf_counter() - t0
    times["amq_grad"] = _median_time(lambda: jax.block_until_ready(grad_fn(w0, jbatch)),
                                     args.reps)
    hvp = amq_hessian.make_hvp(loss_fn, params, batch)
    key = jax.random.key(args.seed)
    v = {p: jax.random.rademacher(jax.random.fold_in(key, i), w0[p].shape, jnp.float32)
         for i, p in enumerate(wrt)}
    t0 = time.perf_counter()
    jax.block_until_ready(hvp(v))
    times["amq_hvp_compile"] = time.perf_counter() - t0
    times["amq_hvp"] = _median_time(lambda: jax.block_until_ready(hvp(v)), args.reps)
    print(f"amq-jax grad {times['amq_grad']:.3f}s  HVP {times['amq_hvp']:.3f}s", flush=True)
    # Warm-up: compiles the probe step shared by all estimators (one probe, no stopping).
    t0 = time.perf_counter()
    amq_hessian.layer_traces(loss_fn, params, batch, key=key, estimator="joint",
                             min_probes=1, max_probes=1)
    times["amq_trace_compile"] = time.perf_counter() - t0

  def dump_partial():
    """Writes what is measured so far (``--out`` + '.partial'): long runs can be cut."""
    if args.out:
      part = dict(out, times=times,
                  torch={k: {"seconds": r.seconds, "hvps": r.hvps, "traces": _summary(r.traces)}
                         for k, r in runs.items()},
                  amq={k: {"seconds": sec, "traces": _summary(r)} for k, (r, sec) in amq.items()})
      with open(args.out + ".partial", "w") as f:
        json.dump(part, f, indent=2, default=float)

  def amq_run(est):
    t0 = time.perf_counter()
    r = amq_hessian.layer_traces(loss_fn, params, batch, key=jax.random.fold_in(key, 7),
                                 estimator=est, **stop)
    sec = time.perf_counter() - t0
    amq[est] = (r, sec)
    dump_partial()
    print(f"amq-jax {est}: {sec:.1f}s, max probes {max(e.probes for e in r.values())}, "
          f"converged {sum(e.converged for e in r.values())}/{len(r)}", flush=True)

  def torch_run(name, fn, **kw):
    t_last = [time.perf_counter()]

    def progress(hvps, conv, act):  # a line every ~30 s: long runs on a busy machine
      if time.perf_counter() - t_last[0] > 30:
        t_last[0] = time.perf_counter()
        print(f"  {name}: {hvps} HVPs, {conv} converged, {act} active", flush=True)

    r = fn(tmodel, (x, y), progress=progress, **stop, **kw)
    runs[name] = r
    dump_partial()
    print(f"{name}: {r.seconds:.1f}s, {r.hvps} HVPs, converged "
          f"{sum(e.converged for e in r.traces.values())}/{len(r.traces)}", flush=True)

  # 4. Time-to-rtol. Cheap (joint) methods first, the per-layer loops last, so that a run
  # cut short on a busy machine still has the joint figures in its log.
  estimators = [e for e in args.estimators.split(",") if e] if jax_side else []
  torch_run("torch_joint", tr.joint_traces, seed=args.seed + 1)
  for est in [e for e in estimators if e != "per_layer"]:
    amq_run(est)
  if args.torch_adaptive:
    torch_run("torch_joint_active", tr.joint_traces, seed=args.seed + 2, only_active=True)
  ph = run_pyhessian(tmodel, x, y, args.pyhessian_probes, args.seed + 3)
  times["pyhessian_probe"] = ph["s_per_probe"]
  out["pyhessian"] = ph
  dump_partial()
  print(f"PyHessian trace {ph['trace']:.4g} +- {ph['stderr']:.2g} ({ph['probes']} probes, "
        f"{ph['s_per_probe']:.2f}s/probe)", flush=True)
  torch_run("torch_per_layer", tr.per_layer_traces, seed=args.seed)
  if "per_layer" in estimators:
    amq_run("per_layer")

  # 5. Cross-check with PyHessian: its whole-model trace vs the sum of per-layer traces.
  # Per-layer probes are independent across layers, so the sum's stderr is exact for
  # 'per_layer' and the torch loop; for joint/adaptive (one probe shared by all layers) the
  # layers' errors are correlated and the combined stderr is only indicative.
  sets = {f"amq-jax {e}": r for e, (r, _) in amq.items()}
  sets.update({k.replace("_", " "): r.traces for k, r in runs.items()})
  sums = {}
  for name, traces in sets.items():
    tot, tot_se = _sum_trace(traces)
    sums[name] = {"sum": tot, "stderr": tot_se,
                  "z": (ph["trace"] - tot) / math.hypot(ph["stderr"], tot_se)}
  ref_name = "amq-jax per_layer" if "per_layer" in amq else "torch per layer"
  cross = {"pyhessian": ph, "reference": ref_name, "sums": sums, "z": sums[ref_name]["z"]}
  if "per_layer" in amq:
    zs = _layer_z(amq["per_layer"][0], runs["torch_per_layer"].traces)
    cross["layer_z_amq_vs_torch"] = zs
    cross["layer_max_abs_z"] = max(abs(v) for v in zs.values())
    cross["layers_abs_z_gt_3"] = sum(abs(v) > 3 for v in zs.values())

  # 6. Report.
  rows = []
  for name, r in runs.items():
    rows.append((name.replace("_", " "), r.seconds, r.hvps,
                 max(e.probes for e in r.traces.values()),
                 sum(e.converged for e in r.traces.values())))
  for est, (r, sec) in amq.items():
    # One HVP per step for joint/adaptive; per_layer spends one per layer per probe.
    hv = (sum(e.probes for e in r.values()) if est == "per_layer"
          else max(e.probes for e in r.values()))
    rows.append((f"amq-jax {est}", sec, hv, max(e.probes for e in r.values()),
                 sum(e.converged for e in r.values())))
  L = len(runs["torch_per_layer"].traces)
  # "Best" among the estimators that reached the tolerance on every layer (one stopped by
  # max_probes measured the cap, not the time to the tolerance).
  done = {e: rs for e, rs in amq.items() if all(t.converged for t in rs[0].values())}
  best = min((done or amq).items(), key=lambda kv: kv[1][1]) if amq else None
  ratios = {}
  if best:
    ratios = {"amq_best": best[0], "amq_best_all_converged": bool(done),
              "torch_per_layer_over_amq_best": runs["torch_per_layer"].seconds / best[1][1],
              "torch_joint_over_amq_best": runs["torch_joint"].seconds / best[1][1]}
    for est, (_, sec) in amq.items():
      ratios[f"torch_per_layer_over_amq_{est}"] = runs["torch_per_layer"].seconds / sec
      ratios[f"torch_joint_over_amq_{est}"] = runs["torch_joint"].seconds / sec
    ratios["amq_hvp_over_amq_grad"] = times["amq_hvp"] / times["amq_grad"]
    ratios["amq_grad_over_torch_grad"] = times["amq_grad"] / times["torch_grad"]
    ratios["amq_hvp_over_torch_hvp_fresh"] = times["amq_hvp"] / times["torch_hvp_fresh"]
  ratios["torch_hvp_fresh_over_torch_grad"] = times["torch_hvp_fresh"] / times["torch_grad"]
  ratios["torch_hvp_reused_over_torch_grad"] = times["torch_hvp_reused"] / times["torch_grad"]

  ref_t = best[1][1] if best else runs["torch_per_layer"].seconds
  ref_label = f"amq-jax {best[0]}" if best else "torch per-layer loop"
  print(f"\n## Time until every layer's trace has stderr <= {args.rtol:g} x |trace| "
        f"({args.model}, batch {args.batch}, {L} layers, min {args.min_probes} / max "
        f"{args.max_probes} probes per layer)\n")
  print(f"| method | seconds | HVPs | s/HVP | max probes/layer | layers converged | "
        f"time / {ref_label} |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, sec, hv, mp, conv in rows:
    print(f"| {name} | {sec:.1f} | {hv} | {sec / hv:.3f} | {mp} | {conv}/{L} | "
          f"{sec / ref_t:.2f} |")
  print("\n| operation | seconds | / torch grad |\n|---|---:|---:|")
  for k in ("torch_grad", "torch_hvp_fresh", "torch_hvp_reused", "pyhessian_probe",
            "amq_grad", "amq_hvp", "amq_grad_compile", "amq_hvp_compile", "amq_trace_compile"):
    if k in times:
      print(f"| {k} | {times[k]:.3f} | {times[k] / times['torch_grad']:.2f} |")
  print(f"\nPyHessian whole-model trace {ph['trace']:.4g} +- {ph['stderr']:.2g} "
        f"({ph['probes']} probes) vs sum of per-layer traces:")
  for name, d in sums.items():
    print(f"  {name}: {d['sum']:.4g} +- {d['stderr']:.2g}, z = {d['z']:+.2f}"
          + ("  (reference)" if name == ref_name else ""))
  if "layer_max_abs_z" in cross:
    print(f"amq-jax per_layer vs torch per-layer loop, per layer: max |z| = "
          f"{cross['layer_max_abs_z']:.2f}, {cross['layers_abs_z_gt_3']} of {L} with |z| > 3")
  for k, v in ratios.items():
    print(f"{k}: {v if isinstance(v, str) else f'{v:.2f}'}")

  out.update(times=times, ratios=ratios, cross_check=cross,
             torch={k: {"seconds": r.seconds, "hvps": r.hvps, "traces": _summary(r.traces)}
                    for k, r in runs.items()},
             amq={k: {"seconds": sec, "traces": _summary(r)} for k, (r, sec) in amq.items()})
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2, default=float)
    if os.path.exists(args.out + ".partial"):
      os.remove(args.out + ".partial")
    print(f"\nwrote {args.out}")
  return out


if __name__ == "__main__":
  main()
