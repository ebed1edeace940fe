"""Benchmark: the exact size-vs-Omega frontier against one ILP solve per budget.

Problems (weights only; costs = n_l * b bits; b in {2, 3, 4, 8}):

* ResNet50 (torchvision layout): the 54 conv/fc kernels, parameter counts generated from
  the architecture below (``resnet50_layers``), not typed in;
* SqueezeNext-23-like (1.0x) and Inception-V3-like (torchvision layout) shapes, generated
  the same way.

Omega = avg_trace_l * err_l(b) with random positive traces (log-normal) and the squared error
of a per-channel symmetric min/max quantizer on Gaussian weights, modelled as
``err_l(b) = n_l * sigma_l^2 * (k / (2^(b-1) - 1))^2 / 12`` (k ~ 4 sigma range, a random
per-layer sigma): the scale of real tables without loading weights.

Measured: the exact frontier's time (median of several runs) and size; PuLP/CBC's optimum
for 20 budgets spread over the frontier's cost range (same optimum checked) and the ratio
time(20 ILP solves) / time(frontier); frontier sizes and times with bucketing.

Run: ``python benchmarks/bench_alloc.py --out bench_alloc.json``
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from amq_jax import alloc

BITS = (2, 3, 4, 8)


def _conv(cin, cout, kh, kw=None, groups=1):
  return kh * (kh if kw is None else kw) * (cin // groups) * cout


def resnet50_layers(num_classes: int = 1000) -> list[tuple[str, int]]:
  """(name, kernel parameter count) of torchvision ResNet50's 53 convs + fc, forward order."""
  out = [("conv1", _conv(3, 64, 7))]
  inplanes = 64
  for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
    for b in range(blocks):
      name = f"layer{s + 1}.{b}"
      out += [(f"{name}.conv1", _conv(inplanes, planes, 1)),
              (f"{name}.conv2", _conv(planes, planes, 3)),
              (f"{name}.conv3", _conv(planes, planes * 4, 1))]
      if b == 0:
        out.append((f"{name}.downsample", _conv(inplanes, planes * 4, 1)))
      inplanes = planes * 4
  out.append(("fc", inplanes * num_classes))
  return out


def squeezenext23_layers(num_classes: int = 1000) -> list[tuple[str, int]]:
  """SqueezeNext-23 (1.0x)-like: 7x7 stem, blocks [6, 6, 8, 1] of 1x1 / 1x1 / 1x3 / 3x1 / 1x1
  convolutions with 1x1 projection shortcuts, a 1x1 conv to 128 and the classifier."""
  out = [("conv1", _conv(3, 64, 7))]
  cin = 64
  for s, (width, depth) in enumerate(zip((32, 64, 128, 256), (6, 6, 8, 1))):
    for b in range(depth):
      stride = 2 if (s > 0 and b == 0) else 1
      r = 1.0 if stride == 2 else (0.25 if cin > width else 0.5)
      c1 = int(cin * r)
      c2 = int(c1 * 0.5)
      name = f"stage{s + 1}.{b}"
      out += [(f"{name}.conv1", _conv(cin, c1, 1)), (f"{name}.conv2", _conv(c1, c2, 1)),
              (f"{name}.conv3", _conv(c2, c1, 1, 3)), (f"{name}.conv4", _conv(c1, c1, 3, 1)),
              (f"{name}.conv5", _conv(c1, width, 1))]
      if stride == 2 or cin != width:
        out.append((f"{name}.shortcut", _conv(cin, width, 1)))
      cin = width
  out += [("conv2", _conv(cin, 128, 1)), ("fc", 128 * num_classes)]
  return out


def inception_v3_layers(num_classes: int = 1000) -> list[tuple[str, int]]:
  """torchvision Inception-V3's 94 convs (no auxiliary head) + fc."""
  out = []

  def c(name, cin, cout, kh, kw=None):
    out.append((name, _conv(cin, cout, kh, kw)))

  c("Conv2d_1a", 3, 32, 3); c("Conv2d_2a", 32, 32, 3); c("Conv2d_2b", 32, 64, 3)
  c("Conv2d_3b", 64, 80, 1); c("Conv2d_4a", 80, 192, 3)
  cin = 192
  for name, pf in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):  # InceptionA
    c(f"{name}.b1x1", cin, 64, 1); c(f"{name}.b5x5_1", cin, 48, 1)
    c(f"{name}.b5x5_2", 48, 64, 5); c(f"{name}.b3x3dbl_1", cin, 64, 1)
    c(f"{name}.b3x3dbl_2", 64, 96, 3); c(f"{name}.b3x3dbl_3", 96, 96, 3)
    c(f"{name}.bpool", cin, pf, 1)
    cin = 64 + 64 + 96 + pf
  c("Mixed_6a.b3x3", cin, 384, 3); c("Mixed_6a.dbl_1", cin, 64, 1)  # InceptionB
  c("Mixed_6a.dbl_2", 64, 96, 3); c("Mixed_6a.dbl_3", 96, 96, 3)
  cin = 384 + 96 + cin
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    c(f"{name}.b1x1", cin, 192, 1)  # InceptionC
    c(f"{name}.b7_1", cin, c7, 1); c(f"{name}.b7_2", c7, c7, 1, 7); c(f"{name}.b7_3", c7, 192, 7, 1)
    c(f"{name}.b7dbl_1", cin, c7, 1); c(f"{name}.b7dbl_2", c7, c7, 7, 1)
    c(f"{name}.b7dbl_3", c7, c7, 1, 7); c(f"{name}.b7dbl_4", c7, c7, 7, 1)
    c(f"{name}.b7dbl_5", c7, 192, 1, 7); c(f"{name}.bpool", cin, 192, 1)
    cin = 768
  c("Mixed_7a.b3_1", cin, 192, 1); c("Mixed_7a.b3_2", 192, 320, 3)  # InceptionD
  c("Mixed_7a.b7_1", cin, 192, 1); c("Mixed_7a.b7_2", 192, 192, 1, 7)
  c("Mixed_7a.b7_3", 192, 192, 7, 1); c("Mixed_7a.b7_4", 192, 192, 3)
  cin = 320 + 192 + cin
  for name in ("Mixed_7b", "Mixed_7c"):  # InceptionE
    c(f"{name}.b1x1", cin, 320, 1); c(f"{name}.b3_1", cin, 384, 1)
    c(f"{name}.b3_2a", 384, 384, 1, 3); c(f"{name}.b3_2b", 384, 384, 3, 1)
    c(f"{name}.dbl_1", cin, 448, 1); c(f"{name}.dbl_2", 448, 384, 3)
    c(f"{name}.dbl_3a", 384, 384, 1, 3); c(f"{name}.dbl_3b", 384, 384, 3, 1)
    c(f"{name}.bpool", cin, 192, 1)
    cin = 320 + 768 + 768 + 192
  out.append(("fc", cin * num_classes))
  return out


def make_problem(counts, *, seed: int = 0):
  """Size costs [L, B] (bits) and synthetic HAWQ-V2 omegas [L, B] for parameter counts."""
  rng = np.random.default_rng(seed)
  n = np.asarray(counts, np.float64)
  bits = np.asarray(BITS, np.float64)
  sigma = rng.lognormal(-3.0, 0.5, n.size)
  err = n[:, None] * sigma[:, None] ** 2 * (4.0 / np.maximum(2 ** (bits - 1) - 1, 1)) ** 2 / 12
  traces = rng.lognormal(0.0, 1.5, n.size)
  return alloc.size_cost_table(n, bits), traces[:, None] * err


def _median_time(fn, repeats):
  ts, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), out


def ilp_solve(costs, omegas, budget):
  """min sum omega s.t. sum cost <= budget, one choice per layer (PuLP + CBC, gap 0)."""
  import pulp
  L, B = costs.shape
  prob = pulp.LpProblem("bits", pulp.LpMinimize)
  x = [[pulp.LpVariable(f"x_{l}_{j}", cat="Binary") for j in range(B)] for l in range(L)]
  prob += pulp.lpSum(float(omegas[l, j]) * x[l][j] for l in range(L) for j in range(B))
  prob += pulp.lpSum(float(costs[l, j]) * x[l][j] for l in range(L) for j in range(B)) <= budget
  for l in range(L):
    prob += pulp.lpSum(x[l]) == 1
  prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=0.0))
  if pulp.LpStatus[prob.status] != "Optimal":
    raise RuntimeError(pulp.LpStatus[prob.status])
  return pulp.value(prob.objective)


def bench_resnet50(repeats: int, n_budgets: int) -> dict:
  names, counts = zip(*resnet50_layers())
  costs, omegas = make_problem(counts)
  t, front = _median_time(lambda: alloc.pareto_front(costs, omegas), repeats)
  t_mono, mono = _median_time(lambda: alloc.monotone_front(costs, omegas), max(1, repeats // 2))
  res = {"layers": len(counts), "choices": len(BITS), "params": int(sum(counts)),
         "frontier_points": len(front), "frontier_ms": t * 1e3,
         "monotone_points": len(mono), "monotone_ms": t_mono * 1e3}
  try:
    import pulp  # noqa: F401
  except ImportError:
    res["ilp"] = "pulp not installed"
    return res
  budgets = np.linspace(front.cost[0], front.cost[-1], n_budgets + 2)[1:-1]
  t0 = time.perf_counter()
  ilp = [ilp_solve(costs, omegas, b) for b in budgets]
  t_ilp = time.perf_counter() - t0
  ours = [front.at_budget(b).omega for b in budgets]
  rel = [abs(a - b) / max(abs(b), 1e-300) for a, b in zip(ours, ilp)]
  res.update(ilp_budgets=n_budgets, ilp_total_ms=t_ilp * 1e3, ilp_ms_each=t_ilp * 1e3 / n_budgets,
             same_optimum=bool(max(rel) <= 1e-6), max_rel_diff=max(rel),
             speedup_20_ilp_vs_frontier=t_ilp / t)
  return res


def bench_shapes(repeats: int) -> list[dict]:
  rows = []
  for name, gen in (("resnet50", resnet50_layers), ("squeezenext23_like", squeezenext23_layers),
                    ("inception_v3_like", inception_v3_layers)):
    _, counts = zip(*gen())
    costs, omegas = make_problem(counts, seed=1)
    for eps in (None, 1e-3, 1e-2, 1e-1):
      t, f = _median_time(lambda: alloc.pareto_front(costs, omegas, bucket=eps), repeats)
      rows.append({"model": name, "layers": len(counts), "params": int(sum(counts)),
                   "bucket": eps, "points": len(f), "ms": t * 1e3})
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", help="write the results as JSON here")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--budgets", type=int, default=20)
  args = ap.parse_args(argv)
  r50 = bench_resnet50(args.repeats, args.budgets)
  shapes = bench_shapes(args.repeats)
  print("## ResNet50 (54 layers x 4 choices)\n")
  print("| quantity | value |\n|---|---|")
  for k, v in r50.items():
    print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
  print("\n## Frontier size and time by model shape\n")
  print("| model | layers | bucket eps | points | ms |\n|---|---|---|---|---|")
  for r in shapes:
    print(f"| {r['model']} | {r['layers']} | {r['bucket'] or 'exact'} | {r['points']} | "
          f"{r['ms']:.2f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"resnet50": r50, "shapes": shapes}, f, indent=1)


if __name__ == "__main__":
  main()
