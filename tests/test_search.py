"""The search stage's budget handling and baselines, against brute force."""
import itertools

import numpy as np
import pytest

from amq_jax import alloc
from amq_jax.pipeline import BudgetError, Problem, auto_bits


def _problem(seed=0, L=6, pin=None):
  rng = np.random.default_rng(seed)
  params = {f"l{i}": {"kernel": rng.normal(size=(3, 3, int(rng.integers(1, 4)), int(rng.integers(2, 6)))
                                           ).astype(np.float32)} for i in range(L)}
  paths = [f"l{i}/kernel" for i in range(L)]
  traces = {p: float(t) for p, t in zip(paths, rng.lognormal(size=L))}
  return Problem(params, paths, traces, bit_choices=(2, 3, 4, 8), pin_first_last=pin)


def _all(pb):
  opts = [[pb.bits[pb.pinned[l]]] if l in pb.pinned else pb.bits for l in range(len(pb.layers))]
  for bits in itertools.product(*opts):
    yield list(bits), pb.cost_of(bits), pb.omega_of(bits)


@pytest.mark.parametrize("seed,pin", [(0, None), (1, 8), (2, None)])
def test_high_omega_is_the_largest_omega_in_the_window(seed, pin):
  pb = _problem(seed, pin=pin)
  budget, _ = pb.budget("uniform:3")
  got = pb.high_omega(budget, window=0.1)
  best = max((w for _, c, w in _all(pb) if 0.9 * budget <= c <= budget))
  assert pb.cost_of(got) <= budget and pb.cost_of(got) >= 0.9 * budget
  assert pb.omega_of(got) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_hawq_v2_choice_is_least_omega_within_budget(seed):
  pb = _problem(seed, pin=8)
  budget, _ = pb.budget("avg:4.5")
  got = pb.at_budget(pb.front(), budget)
  best = min(w for _, c, w in _all(pb) if c <= budget)
  assert pb.omega_of(got) == pytest.approx(best, rel=1e-12)


def test_random_configs_fit_and_differ():
  pb = _problem(4)
  budget, _ = pb.budget("uniform:4")
  cfgs = [pb.random_config(budget, seed=s) for s in range(3)]
  for c in cfgs:
    assert pb.cost_of(c) <= budget
    # Greedy filling: no single free layer can be raised one step and still fit.
    for l in range(len(c)):
      if c[l] != pb.bits[-1]:
        up = list(c)
        up[l] = pb.bits[pb.bits.index(c[l]) + 1]
        assert pb.cost_of(up) > budget
  assert len({tuple(c) for c in cfgs}) > 1


def test_budget_forms_and_errors():
  pb = _problem(5, pin=8)
  assert pb.budget("uniform:3")[0] == pb.cost_of(pb.uniform_bits(3))
  assert pb.budget("avg:3")[0] == pytest.approx(3 * pb.counts.sum())
  mb = pb.size_mb(pb.uniform_bits(4))
  assert pb.budget(f"{mb}MB")[0] == pytest.approx(pb.cost_of(pb.uniform_bits(4)), abs=8 * len(pb.layers))
  with pytest.raises(BudgetError, match="cannot parse"):
    pb.budget("three bits")
  with pytest.raises(BudgetError, match=r"feasible sizes are \["):
    pb.at_budget(pb.front(), pb.budget("avg:1")[0])
  assert pb.uniform_around(pb.budget("uniform:3")[0]) == (3, 4)


def test_auto_bits_from_python():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": rng.normal(size=(8, 8)).astype(np.float32)},
            "b": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}}
  bits, info = auto_bits(params, {"a/kernel": 10.0, "b/kernel": 0.01}, budget="avg:6")
  # The sensitive layer gets more bits.
  assert bits["a"]["w"] > bits["b"]["w"] and info["avg_bits"] <= 6 + 1e-9
  assert info["size_mb"] == alloc.model_size_mb(params, bits.to_dict())
