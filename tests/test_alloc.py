"""Allocation: costs, Omega tables, and the exact frontier against brute-force enumeration."""
from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import alloc, models, quant


# ---------------------------------------------------------------- brute force ground truth

def _all_configs(L, B, groups=(), pinned=None, monotone_order=None):
  """Every valid configuration as an [N, L] choice array (independent of the allocator)."""
  cfgs = np.array(list(itertools.product(range(B), repeat=L)), np.int64).reshape(-1, L)
  ok = np.ones(len(cfgs), bool)
  for g in groups:
    ok &= (cfgs[:, g] == cfgs[:, [g[0]]]).all(axis=1)
  for l, j in (pinned or {}).items():
    ok &= cfgs[:, l] == j
  if monotone_order is not None:
    ok &= (np.diff(cfgs[:, monotone_order], axis=1) >= 0).all(axis=1)
  return cfgs[ok]


def _check_frontier(front, costs, omegas, cfgs):
  """The frontier's points are exactly the non-dominated (cost, omega) points of ``cfgs``."""
  L = costs.shape[0]
  rows = np.arange(L)
  C = costs[rows, cfgs].sum(axis=1)
  W = omegas[rows, cfgs].sum(axis=1)
  fc, fw = front.cost, front.omega
  assert len(front) >= 1
  assert (np.diff(fc) > 0).all() and (np.diff(fw) < 0).all()
  # every point is what its choices cost and perturb, and is a valid configuration
  ch = front.choices.astype(np.int64)
  np.testing.assert_array_equal(costs[rows, ch].sum(axis=1), fc)
  np.testing.assert_array_equal(omegas[rows, ch].sum(axis=1), fw)
  valid = {tuple(c) for c in cfgs}
  assert all(tuple(c) in valid for c in ch)
  # no configuration strictly dominates a frontier point
  dom = ((C[None] <= fc[:, None]) & (W[None] <= fw[:, None])
         & ((C[None] < fc[:, None]) | (W[None] < fw[:, None])))
  assert not dom.any()
  # every configuration is weakly dominated by a frontier point
  weak = ((fc[:, None] <= C[None]) & (fw[:, None] <= W[None])).any(axis=0)
  assert weak.all()


def _instance(rng, L, B, kind):
  if kind == "ties":  # small integers: many equal costs and omegas
    costs = rng.integers(1, 6, (L, B)).astype(float)
    omegas = rng.integers(0, 6, (L, B)).astype(float)
  else:  # integer-valued but wide: exact float sums, few ties
    n = rng.integers(10, 10_000, L).astype(float)
    costs = np.outer(n, [2, 3, 4, 8][:B] + list(range(9, 9 + max(0, B - 4))))
    omegas = np.round(rng.lognormal(8, 2, (L, 1)) * 4.0 ** -np.arange(B)[None]).astype(float)
  return costs, omegas


@pytest.mark.parametrize("L, B, kind, seed", [(1, 4, "wide", 0), (3, 3, "ties", 1),
                                              (5, 4, "ties", 2), (6, 4, "wide", 3),
                                              (8, 4, "wide", 4), (8, 4, "ties", 5)])
def test_frontier_equals_brute_force(L, B, kind, seed):
  rng = np.random.default_rng(seed)
  costs, omegas = _instance(rng, L, B, kind)
  front = alloc.pareto_front(costs, omegas)
  _check_frontier(front, costs, omegas, _all_configs(L, B))
  given = alloc.pareto_front(costs, omegas, order="given")
  np.testing.assert_array_equal(given.cost, front.cost)
  np.testing.assert_array_equal(given.omega, front.omega)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frontier_with_groups_and_pins(seed):
  rng = np.random.default_rng(10 + seed)
  L, B = 7, 4
  costs, omegas = _instance(rng, L, B, "ties" if seed == 1 else "wide")
  groups = [[1, 4], [2, 5, 6]]
  pinned = {0: 3, 5: 1}  # layer 5 pins its whole group
  front = alloc.pareto_front(costs, omegas, groups=groups, pinned=pinned)
  _check_frontier(front, costs, omegas, _all_configs(L, B, groups, pinned))
  ch = front.choices
  assert (ch[:, 0] == 3).all() and (ch[:, [2, 5, 6]] == 1).all() and (ch[:, 1] == ch[:, 4]).all()


def test_unavailable_options_and_input_errors():
  rng = np.random.default_rng(3)
  costs, omegas = _instance(rng, 4, 3, "wide")
  costs[2, 0] = np.inf  # layer 2 cannot take choice 0
  front = alloc.pareto_front(costs, omegas)
  cfgs = _all_configs(4, 3)
  cfgs = cfgs[cfgs[:, 2] != 0]
  costs_f = np.where(np.isfinite(costs), costs, 0)
  _check_frontier(front, costs_f, omegas, cfgs)
  with pytest.raises(ValueError, match="two groups"):
    alloc.pareto_front(costs, omegas, groups=[[0, 1], [1, 2]])
  with pytest.raises(ValueError, match="conflicting pins"):
    alloc.pareto_front(costs, omegas, groups=[[0, 1]], pinned={0: 0, 1: 1})
  with pytest.raises(ValueError, match="out of range"):
    alloc.pareto_front(costs, omegas, pinned={0: 7})
  with pytest.raises(ValueError, match=r"\[L, B\]"):
    alloc.pareto_front(costs, omegas[:, :2])


def test_budget_queries():
  rng = np.random.default_rng(7)
  costs, omegas = _instance(rng, 6, 4, "wide")
  front = alloc.pareto_front(costs, omegas)
  cfgs = _all_configs(6, 4)
  rows = np.arange(6)
  C, W = costs[rows, cfgs].sum(1), omegas[rows, cfgs].sum(1)
  lo, hi = C.min(), C.max()
  assert front.cost[0] == lo
  # the ends: min cost -> first point; max cost and beyond -> least omega overall
  assert front.at_budget(lo).index == 0
  assert front.at_budget(hi).omega == W.min() == front.at_budget(10 * hi).omega
  for b in np.linspace(lo, hi, 25):
    p = front.at_budget(b)
    assert p.cost <= b and p.omega == W[C <= b].min()
    np.testing.assert_array_equal(costs[rows, p.choice].sum(), p.cost)
  with pytest.raises(ValueError, match=r"infeasible.*\[%g" % lo):
    front.at_budget(lo - 1)
  assert front.bits(0, (2, 3, 4, 8)) == [[2, 3, 4, 8][j] for j in front.choice(0)]


def test_bucketing_error_bound_and_size():
  rng = np.random.default_rng(8)
  L = 12
  n = rng.integers(100, 100_000, L).astype(float)
  costs = alloc.size_cost_table(n, (2, 3, 4, 8))
  omegas = rng.lognormal(0, 2, (L, 1)) * n[:, None] * 4.0 ** -np.array([2, 3, 4, 8])[None]
  exact = alloc.pareto_front(costs, omegas)
  for eps in (0.01, 0.05, 0.2):
    approx = alloc.pareto_front(costs, omegas, bucket=eps)
    assert len(approx) < len(exact)
    rows = np.arange(L)
    ch = approx.choices.astype(int)
    np.testing.assert_allclose(costs[rows, ch].sum(1), approx.cost)  # real configurations
    # for every exact point, a bucketed point within (1 + eps) in cost, no worse in omega
    ok = ((approx.cost[None] <= exact.cost[:, None] * (1 + eps) * (1 + 1e-12))
          & (approx.omega[None] <= exact.omega[:, None] * (1 + 1e-12))).any(axis=1)
    assert ok.all()
    for b in np.linspace(exact.cost[0], exact.cost[-1], 11):
      assert approx.at_budget(b * (1 + eps)).omega <= exact.at_budget(b).omega * (1 + 1e-12)


def test_monotone_front_equals_brute_force():
  rng = np.random.default_rng(9)
  L, B = 6, 4
  costs, omegas = _instance(rng, L, B, "wide")
  sens = rng.random(L)
  front = alloc.monotone_front(costs, omegas, sensitivity=sens)
  _check_frontier(front, costs, omegas, _all_configs(L, B, monotone_order=np.argsort(sens)))
  # a subset of the configurations: never better than the exact frontier
  exact = alloc.pareto_front(costs, omegas)
  for b in np.linspace(exact.cost[0], exact.cost[-1], 9):
    assert exact.at_budget(b).omega <= front.at_budget(b).omega
  pinned = alloc.monotone_front(costs, omegas, sensitivity=sens, pinned={0: 3}, groups=[[1, 2]])
  order = [l for l in np.argsort(sens) if l not in (0, 2)]
  cfgs = _all_configs(L, B, [[1, 2]], {0: 3})
  sens_u = sens.copy()
  sens_u[1] = sens[1] + sens[2]
  order = [l for l in np.argsort(sens_u) if l not in (0, 2)]
  cfgs = cfgs[(np.diff(cfgs[:, order], axis=1) >= 0).all(axis=1)]
  _check_frontier(pinned, costs, omegas, cfgs)


# ---------------------------------------------------------------- costs and Omega tables

class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(6, (3, 3), strides=2, padding="SAME", name="c1")(x)       # 10x10 -> 5x5
    x = nn.Conv(6, (3, 1), padding="VALID", feature_group_count=3, name="c2")(x)  # 3x5
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(4, name="fc")(x)


def test_layer_costs_and_sizes():
  x = jnp.zeros((2, 10, 10, 2))
  model = Net()
  v = jax.jit(model.init)(jax.random.key(0), x)
  lc = alloc.layer_costs(model, v, x)
  assert list(lc) == ["c1", "c2", "fc"]
  assert lc["c1"].params == 3 * 3 * 2 * 6 and lc["c1"].macs == 5 * 5 * 6 * (3 * 3 * 2)
  assert lc["c2"].params == 3 * 1 * 2 * 6 and lc["c2"].macs == 3 * 5 * 6 * (3 * 1 * 6 // 3)
  assert lc["fc"].macs == 90 * 4 and lc["fc"].channels == 4
  assert list(alloc.layer_costs(model, v, x, layers=["fc/kernel"])) == ["fc"]
  with pytest.raises(ValueError, match="unknown layer paths"):
    alloc.layer_costs(model, v, x, layers=["c3"])
  # size: quantized kernels packed + float32 scales; the rest float32 (bias, BN)
  p = v["params"]
  cfg = {"c1": 3, "fc/kernel": {"w": 5, "a": 8}}
  want = (-(-108 * 3 // 8) + 4 * 6) + (-(-360 * 5 // 8) + 4 * 4) + 4 * (6 + 36 + 6 + 6 + 6 + 4)
  assert alloc.model_size_bytes(p, cfg) == want
  assert alloc.model_size_bytes(p, cfg, symmetric=False) == want + 4 * (6 + 4)
  fixed = alloc.fixed_size_bytes(p, ["c1", "fc"])
  assert abs(fixed + (108 * 3 + 360 * 5) / 8 - want) < 2
  budget = alloc.mb_to_budget(want / 1e6, fixed)
  assert abs(budget - (108 * 3 + 360 * 5)) < 16
  assert alloc.average_bits([108, 360], [3, 5]) == pytest.approx((324 + 1800) / 468)
  assert alloc.avg_bits_to_budget(4, [108, 360]) == 4 * 468
  np.testing.assert_array_equal(alloc.bops_cost_table([10, 20], (2, 4), a_bits=8),
                                [[160, 320], [320, 640]])
  assert alloc.bops(10, 4, 8) == 320 and alloc.size_bits(10, 4) == 40


def test_layer_costs_zoo_model():
  model = models.get_model("resnet_tiny")
  x = jnp.zeros((1, 28, 28, 1))
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  lc = alloc.layer_costs(model, v, x)
  assert len(lc) == 10 and list(lc)[0] == "stem_conv" and list(lc)[-1] == "head"
  assert lc["stem_conv"].macs == 28 * 28 * 4 * 9
  assert lc["head"].macs == 16 * 10
  assert lc["stage2_block1/conv1"].out_shape == (14, 14, 8)


def test_omega_table_methods():
  x = jnp.zeros((2, 10, 10, 2))
  v = jax.jit(Net().init)(jax.random.key(1), x)
  p = v["params"]
  layers = ["c1", "c2/kernel", "fc"]
  bits = (2, 4, 8)
  err = np.array([[float(quant.quant_error(k, b, axis=-1)) for b in bits]
                  for k in (p["c1"]["kernel"], p["c2"]["kernel"], p["fc"]["kernel"])])
  traces = {"c1/kernel": 2.0, "c2": 0.5, "fc": 3.0}
  names, got_bits, om = alloc.omega_table(p, layers, bits, avg_traces=traces)
  assert names == ["c1", "c2", "fc"] and got_bits == bits
  np.testing.assert_allclose(om, err * np.array([[2.0], [0.5], [3.0]]), rtol=1e-5)
  _, _, wn = alloc.omega_table(p, layers, bits, method="weight_norm")
  np.testing.assert_allclose(wn, err, rtol=1e-5)
  _, _, v1 = alloc.omega_table(p, layers, bits, method="hawq_v1", top_eigs=[10.0, 20.0, 30.0])
  np.testing.assert_allclose(v1, err * np.array([[10 / 108], [20 / 36], [30 / 360]]), rtol=1e-5)
  assert (np.diff(wn, axis=1) < 0).all()  # more bits, less error

  class Est:  # a hessian.TraceEstimate-like object
    avg_trace = 2.0
  _, _, om2 = alloc.omega_table(p, layers, bits, avg_traces={"c1": Est(), "c2": 0.5, "fc": 3.0})
  np.testing.assert_allclose(om2, om)
  with pytest.raises(ValueError, match="missing for layers"):
    alloc.omega_table(p, layers, bits, avg_traces={"c1": 1.0})
  with pytest.raises(ValueError, match="needs avg_traces"):
    alloc.omega_table(p, layers, bits)
  np.testing.assert_allclose(alloc.omega_from([1.0, 2.0], [[1, 2], [3, 4]]), [[1, 2], [6, 8]])
