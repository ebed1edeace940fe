"""The methods that choose widths at a budget, for weights and activations alike.

Every method takes a :class:`amq_jax.alloc.Problem` and a budget and returns widths in
layer (execution) order, each one of the problem's bit choices, pins and ties kept:

* ``'hawq_v2'``: the least ``sum_l Tr(H_l)/n_l * e_l(b_l)`` within the budget, exactly
  (the frontier; Dong et al. 2020, Sec. 3);
* ``'weight_norm'``, ``'hawq_v1'``: the same search with the sensitivity ``1`` or
  ``lambda_max_l / n_l`` (the ablations without / with first-generation curvature);
* ``'uniform'``: one width for every free layer, the widest whose cost fits;
  ``'uniform_above'``: the next wider one (over the budget; omitted when there is none);
* ``'high_omega'``: the LARGEST-Omega configuration whose cost lies in
  ``[(1 - window) B, B]`` (same size, most perturbation), exact by dynamic programming;
* ``'random'``: ``num_random`` seeded random configurations that just fit.

>>> chosen = choose(problem, 'avg:3', ('hawq_v2', 'uniform', 'random'))
>>> list(chosen)
['hawq_v2', 'uniform', 'random0', 'random1', 'random2']
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from amq_jax.alloc._budget import parse_budget
from amq_jax.alloc._problem import RTOL, Problem
from amq_jax.errors import BudgetError, ConfigError

__all__ = ["METHODS", "DEFAULT_METHODS", "choose", "allocate", "uniform_around",
           "high_omega", "random_bits", "pins_first_last", "auto_bits"]

METHODS = ("hawq_v2", "uniform", "uniform_above", "weight_norm", "hawq_v1", "high_omega",
           "random")
DEFAULT_METHODS = ("hawq_v2", "uniform")


def _axis(budget) -> str:
  return "bops" if parse_budget(budget).kind == "bops" else "size"


def uniform_around(problem: Problem, budget) -> tuple[int | None, int | None]:
  """The widest bit choice whose uniform configuration fits ``budget``, and the next one.

  Returns ``(below, above)``; ``above`` is None when ``below`` is the widest choice. Pins
  are kept in both. With ``'uniform:b'`` the answer is ``(b, the next choice)``.
  """
  c = problem.budget_to_cost(budget)
  t = problem.cost_table(_axis(budget))
  below = above = None
  for b in problem.bit_choices:
    cb = float(t[np.arange(len(problem)), problem.columns(problem.uniform(b))].sum())
    if cb <= c * (1 + RTOL):
      below = b
    elif above is None:
      above = b
  return below, above


def high_omega(problem: Problem, budget, *, method: str = "hawq_v2",
               window: float = 0.03) -> list[int]:
  """The largest-Omega configuration whose cost lies in ``[(1 - window) B, B]``.

  The "high perturbation" ablation: the same size as the budget, the most perturbation.
  Exact, by dynamic programming over the integer cost in units of the gcd ``g`` of all
  costs: ``best[c]`` is the largest Omega of a configuration of cost exactly ``c g``. Memory
  is one byte per merge unit (layer or tied group) and cost unit. When no configuration
  reaches the window, the costliest one within ``B`` is returned.
  """
  if not 0 <= window <= 1:
    raise ConfigError(f"high_omega window must be in [0, 1], got {window}")
  budget = parse_budget(budget)
  B_cost = problem.budget_to_cost(budget)
  w = problem.omega(method)
  table = problem.cost_table(_axis(budget))
  units = problem._units
  uc = [table[m][:, o].sum(axis=0) for m, o in units]
  uw = [w[m][:, o].sum(axis=0) for m, o in units]
  flat = np.concatenate(uc)
  ints = np.rint(flat)
  if not np.allclose(ints, flat, rtol=0, atol=1e-6) or (ints <= 0).any():
    raise BudgetError("the high_omega baseline needs positive whole-number costs (element "
                      "counts and MACs)")
  g = int(np.gcd.reduce(ints.astype(np.int64)))
  steps = [np.rint(c / g).astype(np.int64) for c in uc]
  M = int(np.floor(B_cost * (1 + RTOL) / g))
  if M * len(units) > 2e8:
    raise BudgetError(f"the high_omega baseline would need {M} cost steps x {len(units)} "
                      "layers of dynamic programming; drop it from the methods for a model "
                      "this large")
  best = np.full(M + 1, -np.inf)
  best[0] = 0.0
  arg = np.zeros((len(units), M + 1), np.int8)  # <= 16 options per unit
  for u in range(len(units)):
    new = np.full(M + 1, -np.inf)
    for k, (s, om) in enumerate(zip(steps[u], uw[u])):
      if s > M:
        continue
      cand = np.full(M + 1, -np.inf)
      cand[s:] = best[:M + 1 - s] + om
      better = cand > new
      new[better] = cand[better]
      arg[u, better] = k
    best = new
  feasible = np.flatnonzero(np.isfinite(best))
  if feasible.size == 0:  # cannot happen once budget_to_cost accepted the budget
    raise BudgetError(f"no configuration fits the budget {budget.spec!r}")
  lo = int(np.ceil((1 - window) * B_cost / g * (1 - RTOL)))
  inside = feasible[feasible >= lo]
  c = int(inside[np.argmax(best[inside])]) if inside.size else int(feasible[-1])
  bits = [0] * len(problem)
  for u in reversed(range(len(units))):
    k = int(arg[u, c])
    m, o = units[u]
    for i in m:
      bits[i] = problem.bit_choices[int(o[k])]
    c -= int(steps[u][k])
  return bits


def random_bits(problem: Problem, budget, *, seed: int) -> list[int]:
  """A seeded random configuration that just fits ``budget``.

  From every free layer (or tied group) at the widest choice, lower random ones a step at a
  time until the cost fits, then, in a random order, raise each as far as it still fits; so
  no single free layer can be raised one step without exceeding the budget.
  """
  c_max = problem.budget_to_cost(budget)
  table = problem.cost_table(_axis(budget))
  rng = np.random.default_rng(seed)
  units = problem._units
  B = len(problem.bit_choices)
  free = [k for k, (m, o) in enumerate(units) if o.size > 1]
  rows = np.arange(len(problem))
  choice = np.zeros(len(problem), np.int64)
  for m, o in units:
    choice[m] = o[-1]
  cost = lambda: float(table[rows, choice].sum())  # noqa: E731
  limit = c_max * (1 + RTOL)
  while cost() > limit:
    cand = [k for k in free if choice[units[k][0][0]] > 0]
    if not cand:
      raise BudgetError(f"no configuration fits the budget {parse_budget(budget).spec!r}")
    m = units[rng.choice(cand)][0]
    choice[m] -= 1
  for k in rng.permutation(free):
    m = units[k][0]
    while choice[m[0]] < B - 1:
      choice[m] += 1
      if cost() > limit:
        choice[m] -= 1
        break
  return [problem.bit_choices[j] for j in choice]


def choose(problem: Problem, budget, methods: Sequence[str] = DEFAULT_METHODS, *,
           num_random: int = 3, seed: int = 1000) -> dict[str, list[int]]:
  """Each method's widths at ``budget`` (see the module docstring for the methods).

  Args:
    problem: the weights' or the activations' :class:`Problem`.
    budget: a budget string or :class:`Budget` (parsed once here if a string).
    methods: names from :data:`METHODS`, in the order wanted.
    num_random, seed: ``'random'`` adds ``random0 .. random{num_random-1}``, seeded
      ``seed + k``.

  Returns:
    ``{method: widths in layer order}`` (``'uniform_above'`` absent when no wider uniform
    width exists).

  Raises:
    ConfigError: an unknown method, or one whose sensitivity the problem lacks.
    BudgetError: a budget that cannot be parsed or met.
  """
  if isinstance(methods, str):
    methods = (methods,)
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
  budget = parse_budget(budget)
  problem.budget_to_cost(budget)  # range check before any work
  out: dict[str, list[int]] = {}
  below = above = None
  if "uniform" in methods or "uniform_above" in methods:
    below, above = uniform_around(problem, budget)
  for m in methods:
    if m in ("hawq_v2", "weight_norm", "hawq_v1"):
      out[m] = problem.select(budget, m)
    elif m == "uniform":
      if below is None:
        raise BudgetError(f"no uniform width among {problem.bit_choices} fits the budget "
                          f"{budget.spec!r} ({budget.describe(problem.kind)})")
      out[m] = problem.uniform(below)
    elif m == "uniform_above":
      if above is not None:
        out[m] = problem.uniform(above)
    elif m == "high_omega":
      out[m] = high_omega(problem, budget)
    elif m == "random":
      for k in range(int(num_random)):
        out[f"random{k}"] = random_bits(problem, budget, seed=seed + k)
  return out


def allocate(problem: Problem, budget, methods: Sequence[str] = DEFAULT_METHODS, *,
             num_random: int = 3, seed: int = 1000) -> dict:
  """:func:`choose` plus what a search stage records, as JSON-able data.

  Returns:
    ``{'kind', 'layers', 'bit_choices', 'counts', 'pinned', 'tied', 'budget': {'spec',
    'kind', 'value', 'description', 'cost', 'axis'}, 'frontier': {'cost', 'omega',
    'choices' (widths), 'points'} (HAWQ-V2 when available, else weight_norm, on the
    budget's axis), 'methods': {name: Problem.record(bits)}}``.
  """
  b = parse_budget(budget)
  chosen = choose(problem, b, methods, num_random=num_random, seed=seed)
  axis = _axis(b)
  method = "hawq_v2" if "hawq_v2" in problem.methods else "weight_norm"
  f = problem.frontier(method, axis)
  bits = np.asarray(problem.bit_choices)
  return {
      "kind": problem.kind, "layers": list(problem.layers),
      "bit_choices": list(problem.bit_choices), "counts": problem.counts.tolist(),
      "pinned": dict(problem.pinned), "tied": [list(g) for g in problem.tied],
      "budget": {"spec": b.spec, "kind": b.kind, "value": b.value,
                 "description": b.describe(problem.kind),
                 "cost": problem.budget_to_cost(b), "axis": axis},
      "frontier": {"method": method, "cost": f.cost.tolist(), "omega": f.omega.tolist(),
                   "choices": bits[f.choices].tolist(), "points": len(f)},
      "methods": {name: problem.record(v) for name, v in chosen.items()}}


def pins_first_last(layers: Sequence[str], bits: int | None) -> dict[str, int]:
  """``{first layer: bits, last layer: bits}`` of ``layers`` IN THE ORDER GIVEN (pass the
  forward execution order, never a sorted one); ``{}`` when ``bits`` is None/0."""
  layers = list(layers)
  if not bits or not layers:
    return {}
  return {layers[0]: int(bits), layers[-1]: int(bits)}


def auto_bits(layers: Sequence[str], counts, errors, avg_traces, *, budget="avg:4",
              bit_choices: Sequence[int] = (2, 3, 4, 8), pin_first_last: int | None = None,
              fixed_bytes: float = 0.0, tied: Sequence[Sequence[str]] | None = None,
              macs=None, other_bits=None, kind: str = "weights"
              ) -> tuple[dict[str, int], dict]:
  """HAWQ-V2 widths from plain data: the least-Omega configuration within ``budget``.

  Args:
    layers: layer names in forward EXECUTION order; ``pin_first_last`` pins
      ``layers[0]`` and ``layers[-1]`` (the stem and the head), whatever their names.
    counts: ``[L]`` elements per layer. errors: ``[L, B]`` quantization errors.
    avg_traces: ``Tr(H_l)/n_l`` per layer (sequence in layer order, or mapping by name).
    budget, bit_choices, fixed_bytes, tied, macs, other_bits, kind: as in :class:`Problem`
      and :func:`parse_budget`.

  Returns:
    ``({layer: bits} in execution order, info)`` with info's ``avg_bits``, ``size_mb``
    (``(fixed_bytes + sum n b / 8) / 10^6``), ``omega``, ``frontier_points``, ``budget``.

  >>> bits, info = auto_bits(['stem', 'body', 'head'], n, errors, traces, budget='avg:3',
  ...                        pin_first_last=8)
  """
  pb = Problem(layers, counts, bit_choices, errors, kind=kind, avg_traces=avg_traces,
               macs=macs, other_bits=other_bits, fixed_bytes=fixed_bytes,
               pinned=pins_first_last(layers, pin_first_last), tied=tied)
  b = parse_budget(budget)
  bits = pb.select(b)
  return pb.as_dict(bits), {"avg_bits": pb.cost(bits, "avg"), "size_mb": pb.cost(bits, "mb"),
                            "omega": pb.omega_of(bits),
                            "frontier_points": len(pb.frontier("hawq_v2", _axis(b))),
                            "budget": b.spec}
