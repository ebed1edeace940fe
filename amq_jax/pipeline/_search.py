"""Stage 'search': Omega tables -> exact frontier -> the configuration at the budget.

Also the baselines at the same budget (uniform, ||Q(W)-W|| only, HAWQ-V1 ranking, the
highest-Omega configuration of the budget's size, random configurations).
"""
from __future__ import annotations

import os
import re
import time
from typing import Sequence

import numpy as np

from amq_jax import _paths, alloc, quant
from amq_jax.pipeline._common import Context, read_json, write_json

DEFAULT_METHODS = ("hawq_v2", "uniform")
ALL_METHODS = ("hawq_v2", "uniform", "uniform_above", "weight_norm", "hawq_v1", "high_omega",
               "random")


class BudgetError(ValueError):
  """A budget that cannot be parsed or met; says the feasible range."""


class Problem:
  """Per-layer tables of one model: bits, sizes, BOPs, Omega for each method."""

  def __init__(self, params, kernel_paths, avg_traces, top_eigs=None, *,
               bit_choices=(2, 3, 4, 8), symmetric=True, act_bits=None, pin_first_last=None,
               tie=()):
    """Tables for the layers ``kernel_paths`` (in forward order) of ``params``.

    Args:
      avg_traces: ``{kernel_path: Tr(H_l)/n_l}`` (or TraceEstimates).
      top_eigs: ``{kernel_path: top eigenvalue}`` for the HAWQ-V1 baseline, or None.
      bit_choices: weight widths. pin_first_last: width for the first and last layers.
      tie: tuples of layer regexes whose layers share one width.
    """
    self.params = params
    self.kernel_paths = list(kernel_paths)
    self.layers = [p.rsplit("/", 1)[0] for p in self.kernel_paths]
    self.bits = tuple(int(b) for b in bit_choices)
    flat = _paths.flatten(params)
    self.counts = np.array([np.size(flat[p]) for p in self.kernel_paths], np.float64)
    self.symmetric = bool(symmetric)
    self.act_bits = act_bits
    errs = alloc.quant_errors(params, self.layers, self.bits, symmetric=self.symmetric)
    self.errors = errs
    avg = {k: getattr(v, "avg_trace", v) for k, v in avg_traces.items()}
    # At a minimum the Hessian is PSD and every block's trace >= 0; a negative estimate
    # (an under-trained model, or noise around zero) is clamped to 0 so that it cannot
    # reward quantization error.
    self.avg_traces = np.maximum(np.array([avg[p] for p in self.kernel_paths], np.float64), 0.0)
    self.omega = {
        "hawq_v2": alloc.omega_table(params, self.layers, self.bits, errors=errs,
                                     avg_traces=self.avg_traces)[2],
        "weight_norm": alloc.omega_table(params, self.layers, self.bits, errors=errs,
                                         method="weight_norm")[2]}
    if top_eigs is not None:
      top = np.array([top_eigs[p] for p in self.kernel_paths])
      self.omega["hawq_v1"] = alloc.omega_table(params, self.layers, self.bits, errors=errs,
                                                method="hawq_v1", top_eigs=top)[2]
    self.size_cost = alloc.size_cost_table(self.counts, self.bits)
    self.fixed_bytes = alloc.fixed_size_bytes(params, self.layers, symmetric=self.symmetric)
    self.pinned = {}
    if pin_first_last:
      if int(pin_first_last) not in self.bits:
        raise BudgetError(f"search.pin_first_last={pin_first_last} is not among the bit "
                          f"choices {self.bits}")
      j = self.bits.index(int(pin_first_last))
      self.pinned = {0: j, len(self.layers) - 1: j}
    self.groups = self._groups(tie)

  @classmethod
  def from_context(cls, ctx: Context, traces: dict, eigen: dict | None) -> "Problem":
    sc = ctx.cfg.search
    avg = {k: v["avg_trace"] for k, v in traces["layers"].items()}
    top = None if eigen is None else {k: v["value"] for k, v in eigen["top1"].items()}
    return cls(ctx.params, ctx.kernel_paths, avg, top, bit_choices=sc.bit_choices,
               symmetric=sc.symmetric, act_bits=sc.get("act_bits"),
               pin_first_last=sc.get("pin_first_last"), tie=sc.get("tie", ()))

  def _groups(self, patterns: Sequence[Sequence[str]]):
    groups = []
    for pats in patterns or ():
      idx = [i for i, l in enumerate(self.layers) if any(re.fullmatch(p, l) for p in pats)]
      if len(idx) < 2:
        raise BudgetError(f"search.tie group {list(pats)} matches {len(idx)} layer(s); "
                          f"layers: {self.layers}")
      groups.append(idx)
    return groups or None

  # -- costs ---------------------------------------------------------------------------
  def cost_of(self, bits: Sequence[int]) -> float:
    return float(np.sum(self.counts * np.asarray(bits, np.float64)))

  def size_mb(self, bits: Sequence[int]) -> float:
    return alloc.model_size_mb(self.params, self.config(bits).to_dict(),
                               symmetric=self.symmetric)

  def uniform_bits(self, b: int) -> list[int]:
    out = [int(b)] * len(self.layers)
    for i, j in self.pinned.items():
      out[i] = self.bits[j]
    return out

  def budget(self, spec: str) -> tuple[float, str]:
    """A budget string -> (cost on sum n_l b_l, description).

    Forms: ``'uniform:3'`` (the size of uniform 3-bit, pins included), ``'1.2MB'``,
    ``'avg:3.5'`` (average weight bits), ``'bits:123456'`` (raw weight bits).
    """
    s = str(spec).strip()
    m = re.fullmatch(r"uniform:(\d+)", s)
    if m:
      return self.cost_of(self.uniform_bits(int(m.group(1)))), f"size of uniform {m.group(1)}-bit"
    m = re.fullmatch(r"([0-9.eE+-]+)\s*MB", s, re.I)
    if m:
      return alloc.mb_to_budget(float(m.group(1)), self.fixed_bytes), f"{m.group(1)} MB"
    m = re.fullmatch(r"avg:([0-9.eE+-]+)", s)
    if m:
      return alloc.avg_bits_to_budget(float(m.group(1)), self.counts), f"{m.group(1)} average bits"
    m = re.fullmatch(r"bits:([0-9.eE+-]+)", s)
    if m:
      return float(m.group(1)), f"{m.group(1)} weight bits"
    raise BudgetError(f"cannot parse budget {spec!r}; use e.g. '1.2MB', 'avg:3', 'uniform:3' "
                      "or 'bits:N'")

  def config(self, bits: Sequence[int]) -> quant.BitConfig:
    return quant.BitConfig({l: {"w": int(b), "a": self.act_bits}
                            for l, b in zip(self.layers, bits)})

  def front(self, method: str = "hawq_v2") -> alloc.Frontier:
    return alloc.pareto_front(self.size_cost, self.omega[method], groups=self.groups,
                              pinned=self.pinned)

  def feasible_range_mb(self, f: alloc.Frontier) -> tuple[float, float]:
    return (self.fixed_bytes + f.cost[0] / 8) / 1e6, (self.fixed_bytes + f.cost[-1] / 8) / 1e6

  def at_budget(self, f: alloc.Frontier, budget: float) -> list[int]:
    if budget < f.cost[0] * (1 - 1e-12):
      lo, hi = self.feasible_range_mb(f)
      raise BudgetError(
          f"budget of {self.fixed_bytes / 1e6 + budget / 8e6:.4f} MB is below the smallest "
          f"feasible model ({lo:.4f} MB, every free layer at {min(self.bits)} bits and pinned "
          f"layers as pinned); feasible sizes are [{lo:.4f}, {hi:.4f}] MB. Raise the budget, "
          "add smaller bit choices (search.bit_choices) or unpin layers.")
    return f.bits(f.at_budget(budget).index, self.bits)

  # -- baselines -----------------------------------------------------------------------
  def high_omega(self, budget: float, *, window: float = 0.03) -> list[int]:
    """The largest-Omega configuration whose cost lies in ``[(1 - window) B, B]``.

    The seed's "high perturbation" ablation: the same size as the budget, the most
    perturbation. Exact, by dynamic programming over the (integer) weight-bit cost in units
    of the gcd of all costs: ``best[c]`` is the largest Omega of a configuration of cost
    exactly ``c``. Memory is one byte per layer and cost unit, so this baseline is meant for
    models of up to a few million parameters. When no configuration reaches the window,
    the costliest one under B is returned.
    """
    if self.groups:
      raise BudgetError("the high_omega baseline does not support tied groups (search.tie)")
    w = self.omega["hawq_v2"]
    L, B = w.shape
    cost = np.rint(self.size_cost).astype(np.int64)
    g = int(np.gcd.reduce(cost.ravel()))
    units = cost // g
    M = int(np.floor(budget * (1 + 1e-12) / g))
    if M * L > 2e8:
      raise BudgetError("model too large for the high_omega baseline (dynamic programming "
                        f"over {M} cost units x {L} layers)")
    best = np.full(M + 1, -np.inf)
    best[0] = 0.0
    arg = np.zeros((L, M + 1), np.int8)
    for l in range(L):
      new = np.full(M + 1, -np.inf)
      for j in ([self.pinned[l]] if l in self.pinned else range(B)):
        u = units[l, j]
        if u > M:
          continue
        cand = np.full(M + 1, -np.inf)
        cand[u:] = best[:M + 1 - u] + w[l, j]
        better = cand > new
        new[better] = cand[better]
        arg[l, better] = j
      best = new
    feasible = np.flatnonzero(np.isfinite(best))
    if feasible.size == 0:
      raise BudgetError("no configuration fits the budget")
    lo = int(np.ceil((1 - window) * budget / g))
    inside = feasible[feasible >= lo]
    c = int(inside[np.argmax(best[inside])]) if inside.size else int(feasible[-1])
    choice = []
    for l in reversed(range(L)):
      j = int(arg[l, c])
      choice.append(j)
      c -= int(units[l, j])
    return [self.bits[j] for j in reversed(choice)]

  def random_config(self, budget: float, seed: int) -> list[int]:
    """A random configuration just within the budget: from the highest bits, lower random
    free layers until it fits, then raise random layers while it still fits."""
    rng = np.random.default_rng(seed)
    L, B = len(self.layers), len(self.bits)
    choice = np.full(L, B - 1)
    for i, j in self.pinned.items():
      choice[i] = j
    free = [i for i in range(L) if i not in self.pinned]
    cost = lambda c: float(np.sum(self.size_cost[np.arange(L), c]))  # noqa: E731
    while cost(choice) > budget:
      cand = [i for i in free if choice[i] > 0]
      if not cand:
        raise BudgetError("no configuration fits the budget")
      choice[rng.choice(cand)] -= 1
    for i in rng.permutation(free):
      while choice[i] < B - 1:
        choice[i] += 1
        if cost(choice) > budget:
          choice[i] -= 1
          break
    return [self.bits[j] for j in choice]

  def uniform_around(self, budget: float) -> tuple[int | None, int | None]:
    """Uniform widths (2..16) just at/below and just above the budget."""
    below = above = None
    for b in range(1, 17):
      c = self.cost_of(self.uniform_bits(b))
      if c <= budget * (1 + 1e-12):
        below = b
      elif above is None:
        above = b
    return below, above

  def omega_of(self, bits: Sequence[int], method: str = "hawq_v2") -> float | None:
    w = self.omega.get(method)
    if w is None:
      return None
    total = 0.0
    for l, b in enumerate(bits):
      if b not in self.bits:
        return None
      total += w[l, self.bits.index(b)]
    return float(total)


def search(ctx: Context, *, budget: str | None = None, methods: Sequence[str] | None = None,
           verbose: bool = True) -> dict:
  """Writes ``search/frontier.json``, ``search/bits.json`` and ``search/methods/*.json``.

  ``bits.json`` is HAWQ-V2's choice at the budget; each method's configuration (and its
  size, Omega and average bits) is in ``search/methods/<method>.json``.
  """
  sc = ctx.cfg.search
  wd = ctx.wd
  budget = budget or sc.budget
  methods = tuple(methods or (ALL_METHODS if ctx.cfg.get("baselines") == "all"
                              else DEFAULT_METHODS))
  unknown = [m for m in methods if m not in ALL_METHODS]
  if unknown:
    raise BudgetError(f"unknown method(s) {unknown}; choose from {list(ALL_METHODS)}")
  traces = read_json(wd.traces)
  eigen = read_json(wd.eigenvalues) if os.path.isfile(wd.eigenvalues) else None
  pb = Problem.from_context(ctx, traces, eigen)
  cost, desc = pb.budget(budget)
  t0 = time.perf_counter()
  front = pb.front("hawq_v2")
  frontier_seconds = time.perf_counter() - t0
  chosen = {"hawq_v2": pb.at_budget(front, cost)}
  below, above = pb.uniform_around(cost)
  for m in methods:
    if m == "uniform":
      if below is None:
        raise BudgetError(f"no uniform width fits the budget ({desc})")
      chosen["uniform"] = pb.uniform_bits(below)
    elif m == "uniform_above" and above is not None:
      chosen["uniform_above"] = pb.uniform_bits(above)
    elif m in ("weight_norm", "hawq_v1"):
      if m not in pb.omega:
        raise BudgetError(f"method {m!r} needs analyze/eigenvalues.json; run amq-jax analyze")
      chosen[m] = pb.at_budget(pb.front(m), cost)
    elif m == "high_omega":
      chosen[m] = pb.high_omega(cost)
    elif m == "random":
      for k in range(int(ctx.cfg.get("num_random", 3))):
        chosen[f"random{k}"] = pb.random_config(cost, seed=1000 + k)
  records = {}
  for name, bits in chosen.items():
    cfg = pb.config(bits)
    rec = {"method": name, "bits": dict(zip(pb.layers, map(int, bits))),
           "size_mb": pb.size_mb(bits), "weight_bits": pb.cost_of(bits),
           "avg_bits": float(alloc.average_bits(pb.counts, bits)),
           "omega_hawq_v2": pb.omega_of(bits), "omega_weight_norm": pb.omega_of(bits, "weight_norm"),
           "omega_hawq_v1": pb.omega_of(bits, "hawq_v1"), "config": cfg.to_dict()}
    write_json(wd.method_bits(name), rec)
    records[name] = rec
  write_json(wd.bits, pb.config(chosen["hawq_v2"]).to_dict())
  uniform_pts = {str(b): {"size_mb": pb.size_mb(pb.uniform_bits(b)),
                          "omega": pb.omega_of(pb.uniform_bits(b))}
                 for b in pb.bits}
  write_json(wd.frontier, {
      "layers": pb.layers, "bit_choices": list(pb.bits), "param_counts": pb.counts.tolist(),
      "budget": {"spec": str(budget), "description": desc, "weight_bits": cost,
                 "size_mb": pb.fixed_bytes / 1e6 + cost / 8e6},
      "fixed_bytes": pb.fixed_bytes, "pinned": {pb.layers[i]: pb.bits[j] for i, j in pb.pinned.items()},
      "frontier_seconds": frontier_seconds, "num_points": len(front),
      "size_mb": (pb.fixed_bytes / 1e6 + front.cost / 8e6).tolist(),
      "omega": front.omega.tolist(), "choices": front.choices.tolist(),
      "uniform": uniform_pts,
      "methods": {k: {"size_mb": v["size_mb"], "omega": v["omega_hawq_v2"]}
                  for k, v in records.items()}})
  if verbose:
    print(format_bits_table(pb.layers, pb.counts, records))
  from amq_jax.report import plot_frontier
  plot_frontier(read_json(wd.frontier), wd.path("search", "frontier.png"))
  return records


def format_bits_table(layers, counts, records: dict) -> str:
  names = list(records)
  head = "| layer | params | " + " | ".join(names) + " |"
  lines = [head, "|" + "---|" * (2 + len(names))]
  for l, n in zip(layers, counts):
    lines.append(f"| {l} | {int(n)} | " + " | ".join(str(records[m]["bits"][l]) for m in names) + " |")
  lines.append("| **size (MB)** | | " + " | ".join(f"{records[m]['size_mb']:.4f}" for m in names) + " |")
  lines.append("| **avg bits** | | " + " | ".join(f"{records[m]['avg_bits']:.3f}" for m in names) + " |")
  lines.append("| **Omega** | | " + " | ".join(
      "n/a" if records[m]["omega_hawq_v2"] is None else f"{records[m]['omega_hawq_v2']:.4g}"
      for m in names) + " |")
  return "\n".join(lines)


def auto_bits(params, avg_traces, *, budget: str = "avg:4", kernel_paths=None,
              bit_choices=(2, 3, 4, 8), pin_first_last=None, act_bits=None, symmetric=True,
              tie=()) -> tuple[quant.BitConfig, dict]:
  """HAWQ-V2 bits for any params pytree, from Python: the least-Omega configuration
  within ``budget`` on the exact frontier.

  Args:
    params: the params pytree (Linen ``variables['params']``, or NNX
      ``nnx.to_pure_dict(state)``).
    avg_traces: ``{kernel_path: Tr(H_l)/n_l}`` or ``hessian.layer_traces``' output.
    budget: ``'avg:3'``, ``'0.5MB'``, ``'uniform:4'`` or ``'bits:N'``.
    kernel_paths: layers to quantize (default: every key of ``avg_traces``, in its order).

  Returns:
    ``(BitConfig, info)`` with info's ``size_mb``, ``avg_bits``, ``omega``, ``frontier_points``.

  >>> traces = hessian.layer_traces(loss_fn, params, batch, key=key)
  >>> bits, info = auto_bits(params, traces, budget='avg:3')
  """
  kp = list(kernel_paths or avg_traces)
  pb = Problem(params, kp, avg_traces, bit_choices=bit_choices, symmetric=symmetric,
               act_bits=act_bits, pin_first_last=pin_first_last, tie=tie)
  cost, _ = pb.budget(budget)
  front = pb.front()
  bits = pb.at_budget(front, cost)
  return pb.config(bits), {"size_mb": pb.size_mb(bits), "avg_bits": alloc.average_bits(pb.counts, bits),
                           "omega": pb.omega_of(bits), "frontier_points": len(front),
                           "bits": dict(zip(pb.layers, bits))}
