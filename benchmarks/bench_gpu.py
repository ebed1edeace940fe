"""Benchmark: ResNet50 per-layer curvature traces on a GPU, synthetic ImageNet-shaped data.

The figures of ``bench_curvature.py`` for a network of ImageNet size: ResNet50
(``models.get_model('resnet50', num_classes=1000)``, 54 Conv/Dense kernels, 25.6 M
parameters) at random init (fixed key) on ``--batches`` batches of ``--batch`` random
224x224x3 images with random labels, drawn with ``jax.random`` (nothing is downloaded).
Every row is timed twice: the first call (``compile_s``: tracing + XLA compile, one step
included) apart from the warm run (``seconds``), both to ``block_until_ready``. The unit of
work is the GRADIENT-EQUIVALENT: a row's warm seconds over the warm seconds of one full
gradient over every kernel on the same batches.

Rows (``--rows``; ``grad`` always runs, it is the unit):

* ``grad``: one gradient of the mean loss over all batches (median of repeats);
* ``hvp``: one forward-over-reverse HVP over all kernels (``hessian.make_hvp``);
* ``ggn``: the generalized Gauss-Newton traces by output-space probes (sampled: with 1000
  classes the exact GGN would take 1000 backward passes per example);
* ``fisher``: the Monte-Carlo Fisher traces (sampled labels);
* ``hessian``: Hutchinson ``per_layer`` on the Hessian, one restricted (one-layer) HVP per
  probe, at most ``--max-probes`` probes per layer.

The three curvature rows run ``hessian.layer_traces(..., rtol=0.05, max_time=cap)`` until
EVERY layer's trace has relative standard error ``<= rtol`` (``confidence=0.6827``: the
interval half-width is ~1 standard error) or the row's time cap ends it; each reports how
many layers got there and a projection of the work still needed from each layer's sample
variance (``k_l = (std_l / (rtol |mean_l|))^2`` probes). The Hessian row compiles one
program per layer; its compile phase is capped too (layers taken spread over the list,
``--compile-threads`` compiles at a time), and the timed run then covers the layers that
compiled, so a short budget gives fewer layers rather than no figure. Run order: grad,
hvp, ggn, hessian, fisher (a squeezed deadline shortens the Fisher row first). Also the Spearman
rank correlation over those layers of the GGN and Fisher traces against the Hessian's.

BatchNorm: Flax initializes running statistics to mean 0 / variance 1, which in inference
mode leaves the 16 residual blocks unnormalized (activations grow block after block and
the softmax saturates: loss ~166 at 224x224 against ln 1000 = 6.9). One train-mode forward
pass on the first batch (on 16 images of its own when ``--batch`` is smaller) sets the
running statistics to that batch's statistics, so inference mode normalizes as training
would (loss ~8).

A global ``--deadline`` (seconds) shortens the last caps and skips rows that no longer fit,
so the run ends by itself before an outer ``timeout``; the JSON (``--out``) is rewritten
after every row, with ``jax.devices()``, the backend and the load average before/after.

Usage::

    python benchmarks/bench_gpu.py --out gpu_resnet50.json          # on a GPU, <= 8 min
    python benchmarks/bench_gpu.py --quick --allow-cpu --out /tmp/gpu_quick.json  # smoke

``--quick`` (32x32 images, batch 2, 1 batch, ~10 s caps, 2 probes per layer) only checks
that everything runs; its figures mean nothing. Exit status: 0 every row ran, 1 a row
failed (its error is in the JSON), 2 no GPU backend (without ``--allow-cpu``) or bad usage.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import statistics
import sys
import time

T_START = time.perf_counter()  # the --deadline counts from here (imports included)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from amq_jax import _io, _paths, hessian, models  # noqa: E402

CONFIDENCE_1SE = 0.6827  # two-sided: t_{0.841, k-1} ~ 1 standard error
ROWS = ("grad", "hvp", "ggn", "fisher", "hessian")
BN_MOMENTUM = 0.9  # amq_jax/models/resnet_imagenet.py::_bn
MIN_ROW_S = 20.0  # a row is skipped when less than this is left before the deadline
CALIB_MIN = 16  # BN calibration examples at least (a smaller --batch gets its own draw)


def _elapsed():
  return time.perf_counter() - T_START


def _data(key, *, batches, batch, image_size, num_classes):
  """``batches`` dicts of N(0, 1) images ``[batch, s, s, 3]`` and uniform int labels."""
  out = []
  for b in range(batches):
    ki, kl = jax.random.split(jax.random.fold_in(key, b))
    out.append({"image": jax.random.normal(ki, (batch, image_size, image_size, 3), jnp.float32),
                "label": jax.random.randint(kl, (batch,), 0, num_classes, jnp.int32)})
  return out


def _calibrate_bn(model, variables, batch):
  """Running BN statistics := the batch statistics of ``batch`` (one train-mode pass).

  Flax updates ``new = m * old + (1 - m) * batch_stat``; from ``old = 0`` (train mode
  normalizes with the batch's own statistics, so ``old`` does not change the pass) that is
  ``batch_stat = new / (1 - m)``, exact to rounding, without a hook into the module.
  ``batch`` needs a few examples (see ``CALIB_MIN``): over 2 examples of a 1x1 feature map
  some variances are ~0, and inference mode then amplifies rounding until the logits blow up.
  """
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
  zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  new = fwd({**variables, "batch_stats": zeros}, batch["image"])["batch_stats"]
  stats = jax.tree.map(lambda n: n / (1 - BN_MOMENTUM), new)
  return {**variables, "batch_stats": stats}


def _timed(fn, reps):
  """``(first_call_s, median_warm_s, warm_runs)`` of ``fn()``, each to block_until_ready."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  runs = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - t)
  return first, statistics.median(runs), runs


def _rse(e):
  return float(e.stderr / abs(e.trace)) if e.trace else float("inf")


def _need(est, rtol):
  """Probes per layer for rse <= rtol, from each layer's sample variance (>= 10)."""
  need = {}
  for p, e in est.items():
    s = np.asarray(e.samples)
    if s.size < 2 or np.all(s == s[0]):
      need[p] = max(int(s.size), 10)
      continue
    need[p] = max(10, int(np.ceil((s.std(ddof=1) / (rtol * max(abs(s.mean()), 1e-30))) ** 2)))
  return need


def _ranks(x):
  """Ranks 1..n of ``x``, ties sharing their mean rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x))
  r[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):
    tie = x == v
    if tie.sum() > 1:
      r[tie] = r[tie].mean()
  return r


def _spearman(a, b):
  """Spearman's rank correlation (Pearson on the ranks); None with < 3 points."""
  if len(a) < 3:
    return None
  ra, rb = _ranks(a), _ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return None
  return float(np.corrcoef(ra, rb)[0, 1])


def _spread_order(n):
  """0..n-1 ordered so that every prefix is spread over the range (bit-reversal order):
  a compile budget that stops early still samples shallow, middle and deep layers."""
  bits = max(1, int(np.ceil(np.log2(max(n, 2)))))
  rev = lambda i: int(format(i, f"0{bits}b")[::-1], 2)  # noqa: E731
  return sorted(range(n), key=rev)


def _curvature_summary(est, dt, t_grad, rtol, unit_sum):
  """The per-row figures shared by ggn, fisher and hessian."""
  probes = {p: e.probes for p, e in est.items()}
  units = sum(probes.values()) if unit_sum else max(probes.values())
  need = _need(est, rtol)
  need_units = sum(need.values()) if unit_sum else max(need.values())
  at = sum(_rse(e) <= rtol or e.stderr == 0 for e in est.values())
  return {
      "seconds": dt, "grad_equivalents": dt / t_grad, "units": int(units),
      "layers": len(est), "layers_at_rtol": int(at), "all_at_rtol": bool(at == len(est)),
      "statuses": {s: sum(e.status == s for e in est.values()) for s in hessian.STATUSES},
      "max_rse": max(_rse(e) for e in est.values()),
      "projected_units_to_rtol": int(need_units),
      "projected_grad_equivalents_to_rtol": float(need_units * dt / max(units, 1) / t_grad),
      "traces": {p: e.trace for p, e in est.items()},
      "estimates": hessian.estimates_to_json(est)}


def _compile_layers(warm_one, order, budget, threads):
  """Compiles layers ``order[0], order[1], ...`` (``threads`` at a time) until ``budget``
  seconds have passed; in-flight compiles are awaited. Returns ``(done, seconds, errors)``."""
  t0 = time.perf_counter()
  done, errors, todo = {}, {}, list(order)
  with cf.ThreadPoolExecutor(max_workers=threads) as pool:
    live = {}
    while todo or live:
      while todo and len(live) < threads and not errors and time.perf_counter() - t0 < budget:
        i = todo.pop(0)
        live[pool.submit(warm_one, i)] = i
      if not live:
        break
      fin, _ = cf.wait(live, return_when=cf.FIRST_COMPLETED)
      for f in fin:
        i = live.pop(f)
        try:
          done[i] = f.result()
        except Exception as e:  # noqa: BLE001 - reported in the JSON; stops new compiles
          errors[i] = f"{type(e).__name__}: {e}"
  return done, time.perf_counter() - t0, errors


def _table(result):
  r = result["rows"]
  lines = [f"## ResNet50, {result['batches']} x {result['batch']} synthetic "
           f"{result['image_size']}x{result['image_size']}x3 images, "
           f"{result['layers']} layers, {result['backend']} "
           f"({result['device_kind']}){' (quick)' if result['quick'] else ''}", "",
           f"rse <= {result['rtol']}; load average before {result['load_before'][0]:.2f}"
           + (f", after {result['load_after'][0]:.2f}" if "load_after" in result else "")
           + ".", "",
           "| row | compile (s) | warm (s) | gradient-equivalents | work | layers at rtol | "
           "projected grad-eq to rtol | Spearman vs Hessian |",
           "|---|---|---|---|---|---|---|---|"]
  for name, x in r.items():
    if "error" in x or "skipped" in x:
      why = " ".join(str(x.get("error") or x.get("skipped")).split()).replace("|", "/")
      lines.append(f"| {name} | | | | {why[:120]} | | | |")
      continue
    at = f"{x['layers_at_rtol']}/{x['layers']}" if "layers_at_rtol" in x else ""
    proj = x.get("projected_grad_equivalents_to_rtol")
    sp = result.get("spearman_vs_hessian", {}).get(name)
    lines.append(f"| {name} | {x['compile_s']:.1f} | {x['seconds']:.3f} | "
                 f"{x['grad_equivalents']:.1f} | {x['work']} | {at} | "
                 f"{'' if proj is None else f'{proj:.0f}'} | "
                 f"{'' if sp is None else f'{sp:.3f}'} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="gpu_resnet50.json")
  ap.add_argument("--batch", type=int, default=None, help="examples per batch (default 64)")
  ap.add_argument("--batches", type=int, default=None, help="number of batches (default 2)")
  ap.add_argument("--image-size", type=int, default=None, help="default 224")
  ap.add_argument("--time-cap", type=float, default=None,
                  help="seconds per curvature row, and for the Hessian row's compile phase "
                       "(default 90; quick 10)")
  ap.add_argument("--deadline", type=float, default=None,
                  help="seconds for the whole run from start: later caps shrink, rows that "
                       "no longer fit are skipped (default 450, under gpu_check.sh's 480 s "
                       "timeout; quick 1800)")
  ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {ROWS}")
  ap.add_argument("--rtol", type=float, default=0.05)
  ap.add_argument("--max-probes", type=int, default=None,
                  help="Hessian per_layer probes per layer at most (default 200; quick 2)")
  ap.add_argument("--vjp-probes-per-step", type=int, default=4,
                  help="GGN/Fisher probes per jitted step (one forward pass serves them)")
  ap.add_argument("--compile-threads", type=int, default=None,
                  help="Hessian per-layer programs compiled at a time (default 4; quick 2)")
  ap.add_argument("--reps", type=int, default=None, help="warm repeats of grad/hvp (default 7)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--quick", action="store_true",
                  help="32x32 images, batch 2, 1 batch, 10 s caps, 2 probes/layer: smoke run")
  ap.add_argument("--allow-cpu", action="store_true",
                  help="run on a non-GPU backend (smoke runs only; figures mean nothing)")
  args = ap.parse_args(argv)
  q = args.quick
  pick = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
  batch, n_batches = pick(args.batch, 64, 2), pick(args.batches, 2, 1)
  size, cap = pick(args.image_size, 224, 32), pick(args.time_cap, 90.0, 10.0)
  deadline, max_probes = pick(args.deadline, 450.0, 1800.0), pick(args.max_probes, 200, 2)
  threads, reps = pick(args.compile_threads, 4, 2), pick(args.reps, 7, 2)
  rows = [r for r in args.rows.split(",") if r]
  bad = [r for r in rows if r not in ROWS]
  if bad:
    ap.error(f"--rows: unknown {bad}; choose from {','.join(ROWS)}")
  if min(batch, n_batches, size, max_probes, threads, reps) < 1 or cap <= 0:
    ap.error("--batch, --batches, --image-size, --max-probes, --compile-threads, --reps "
             "must be >= 1 and --time-cap > 0")

  backend = jax.default_backend()
  if backend != "gpu" and not args.allow_cpu:
    print(f"bench_gpu: error: JAX's backend is {backend!r} (devices {jax.devices()}), not "
          "'gpu'; this benchmark measures a GPU. Run it where a CUDA build of jax sees the "
          "GPU (e.g. jax[cuda12] matching the driver), or pass --allow-cpu (with --quick) "
          "for a smoke run whose figures mean nothing.", file=sys.stderr)
    return 2
  ndev = len(jax.devices())
  if batch % ndev:
    ap.error(f"--batch {batch} must be a multiple of the device count {ndev} (the batch is "
             "sharded over all devices)")

  load_before = os.getloadavg()
  calib_on = "batch 0" if batch >= CALIB_MIN else f"{CALIB_MIN} other synthetic images"
  result = {"model": "resnet50",
            "weights": f"random init, key {args.seed}, BN calibrated on {calib_on}",
            "data": "synthetic: N(0,1) images, uniform labels (jax.random)",
            "batch": batch, "batches": n_batches, "image_size": size, "num_classes": 1000,
            "rtol": args.rtol, "confidence": CONFIDENCE_1SE, "time_cap_s": cap,
            "deadline_s": deadline, "max_probes_hessian": max_probes,
            "vjp_probes_per_step": args.vjp_probes_per_step, "compile_threads": threads,
            "quick": q, "backend": backend, "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": platform.machine(),
            "cpus": os.cpu_count(), "argv": sys.argv[1:], "load_before": list(load_before),
            "rows": {}}

  def save():
    result["table_md"] = _table(result)
    _io.write_json(args.out, result)

  def log(msg):
    print(f"[bench_gpu {_elapsed():6.1f}s] {msg}", flush=True)

  # --- model, data, BN calibration ----------------------------------------------------
  t = time.perf_counter()
  model = models.get_model("resnet50", num_classes=1000)
  key = jax.random.key(args.seed)
  batches = _data(jax.random.fold_in(key, 1), batches=n_batches, batch=batch,
                  image_size=size, num_classes=1000)
  variables = model.init(jax.random.fold_in(key, 0), batches[0]["image"][:1], train=False)
  calib = batches[0] if batch >= CALIB_MIN else _data(
      jax.random.fold_in(key, 4), batches=1, batch=CALIB_MIN, image_size=size,
      num_classes=1000)[0]
  variables = _calibrate_bn(model, variables, calib)
  params = variables["params"]
  loss_fn = hessian.linen_loss_fn(model, variables)
  logits_fn = hessian.linen_logits_fn(model, variables)
  wrt = _paths.quantizable_paths(params)
  mesh = hessian.default_mesh()
  loss0 = float(jax.jit(loss_fn)(params, batches[0]))
  result.update(layers=len(wrt), num_params=int(sum(np.prod(v.shape) for v in
                                                    _paths.select(params, wrt).values())),
                setup_s=time.perf_counter() - t, initial_loss=loss0)
  log(f"ResNet50 ready: {len(wrt)} layers, {result['num_params']:,} kernel parameters, "
      f"{n_batches} x {batch} images {size}x{size}, loss {loss0:.3f} (ln 1000 = 6.908), "
      f"{result['setup_s']:.1f} s; devices {jax.devices()}")
  save()
  failed = False

  # --- grad and hvp ----------------------------------------------------------------------
  hvp = hessian.make_hvp(loss_fn, params, batches, wrt=wrt, mesh=mesh)
  pb = hvp._problem  # noqa: SLF001 - the same placed params/batches for the gradient
  grad = jax.jit(lambda w, p, b: jax.grad(lambda w_: loss_fn(_paths.merge(p, w_), b))(w))
  first, t_grad, runs = _timed(lambda: [grad(pb.w, pb.params, b) for b in pb.batches], reps)
  result["rows"]["grad"] = {"compile_s": max(first - t_grad, 0.0), "first_call_s": first,
                            "seconds": t_grad, "runs": runs, "grad_equivalents": 1.0,
                            "work": f"1 gradient over {n_batches} batch(es)"}
  log(f"grad: {t_grad * 1e3:.1f} ms warm (median of {reps}), first call {first:.1f} s")
  save()

  if "hvp" in rows:
    try:
      v = pb.replicate({p: jax.random.rademacher(jax.random.fold_in(key, 100 + i), x.shape,
                                                 x.dtype) for i, (p, x) in enumerate(pb.w.items())})
      first, t_hvp, runs = _timed(lambda: hvp(v), reps)
      result["rows"]["hvp"] = {"compile_s": max(first - t_hvp, 0.0), "first_call_s": first,
                               "seconds": t_hvp, "runs": runs,
                               "grad_equivalents": t_hvp / t_grad,
                               "work": f"1 HVP over all {len(wrt)} kernels"}
      log(f"hvp: {t_hvp * 1e3:.1f} ms warm = {t_hvp / t_grad:.2f} gradients, first call "
          f"{first:.1f} s")
    except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
      failed = True
      result["rows"]["hvp"] = {"error": f"{type(e).__name__}: {e}"}
      log(f"hvp: FAILED {e}")
    save()

  # --- curvature rows ----------------------------------------------------------------
  common = dict(rtol=args.rtol, confidence=CONFIDENCE_1SE, progress=False, mesh=mesh)

  def left():
    return deadline - _elapsed()

  def vjp_row(name):
    kw = dict(curvature=name, logits_fn=logits_fn, wrt=wrt, mesh=mesh, progress=False,
              probes_per_step=args.vjp_probes_per_step)
    t = time.perf_counter()
    hessian.layer_traces(None, params, batches, key=jax.random.key(10_000 + args.seed),
                         min_probes=1, max_probes=1, **kw)
    compile_s = time.perf_counter() - t
    row_cap = max(min(cap, left() - 10), 1.0)
    t = time.perf_counter()
    est = hessian.layer_traces(None, params, batches, key=jax.random.fold_in(key, 2),
                               min_probes=10, max_probes=1_000_000, max_time=row_cap,
                               **{**kw, **{k: common[k] for k in ("rtol", "confidence")}})
    dt = time.perf_counter() - t
    r = _curvature_summary(est, dt, t_grad, args.rtol, unit_sum=False)
    r.update(compile_s=compile_s, cap_s=row_cap,
             work=f"{r['units']} VJP probes (all layers each)")
    return r

  def hessian_row():
    order = [wrt[i] for i in _spread_order(len(wrt))]

    def warm_one(p):
      t = time.perf_counter()
      hessian.layer_traces(loss_fn, params, batches, key=jax.random.key(10_000 + args.seed),
                           wrt=[p], estimator="per_layer", min_probes=1, max_probes=1,
                           mesh=mesh, progress=False)
      return time.perf_counter() - t

    budget = min(cap, (left() - 10) / 2)
    done, compile_s, errors = _compile_layers(warm_one, order, budget, threads)
    if not done:
      raise RuntimeError(f"no layer compiled in {compile_s:.0f} s: {errors}")
    sub = [p for p in wrt if p in done]  # network order
    row_cap = max(min(cap, left() - 10), 1.0)
    t = time.perf_counter()
    est = hessian.layer_traces(loss_fn, params, batches, key=jax.random.fold_in(key, 3),
                               wrt=sub, estimator="per_layer", min_probes=min(10, max_probes),
                               max_probes=max_probes, max_time=row_cap, **common)
    dt = time.perf_counter() - t
    r = _curvature_summary(est, dt, t_grad, args.rtol, unit_sum=True)
    r.update(compile_s=compile_s, cap_s=row_cap, compile_budget_s=budget,
             layers_compiled=len(sub), layers_total=len(wrt), compile_errors=errors,
             compile_s_per_layer=done,
             work=f"{r['units']} restricted HVPs over {len(sub)}/{len(wrt)} layers"
                  f" (<= {max_probes} each)")
    return r

  # The Hessian before the Fisher: when the deadline squeezes a row, let it be the Fisher's
  # (the GGN vs Hessian comparison is the figure this benchmark is for).
  for name in [r for r in ("ggn", "hessian", "fisher") if r in rows]:
    if left() < MIN_ROW_S:
      result["rows"][name] = {"skipped": f"deadline: {left():.0f} s left of {deadline:.0f}"}
      log(f"{name}: skipped ({left():.0f} s left before the deadline)")
      save()
      continue
    try:
      r = hessian_row() if name == "hessian" else vjp_row(name)
      result["rows"][name] = r
      log(f"{name}: compile {r['compile_s']:.1f} s, {r['seconds']:.1f} s warm = "
          f"{r['grad_equivalents']:.0f} gradient-equivalents, {r['work']}, "
          f"{r['layers_at_rtol']}/{r['layers']} layers at rse <= {args.rtol}, projected "
          f"{r['projected_grad_equivalents_to_rtol']:.0f} grad-eq to rtol")
    except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
      failed = True
      result["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
      log(f"{name}: FAILED {type(e).__name__}: {e}")
    h = result["rows"].get("hessian", {})
    if "traces" in h:
      sub = list(h["traces"])
      result["spearman_vs_hessian"] = {
          m: _spearman([h["traces"][p] for p in sub], [result["rows"][m]["traces"][p]
                                                        for p in sub])
          for m in ("ggn", "fisher") if "traces" in result["rows"].get(m, {})}
      result["spearman_layers"] = len(sub)
    save()

  result["load_after"] = list(os.getloadavg())
  result["total_s"] = _elapsed()
  save()
  print(result["table_md"])
  log(f"wrote {args.out}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
