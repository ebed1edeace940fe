"""Budgets and the allocation Problem: the grammar, the feasible range, and selection against
brute force for every budget kind, for weights and activations."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from amq_jax import alloc
from amq_jax.errors import AmqError, BudgetError, ConfigError, NonFiniteError

BITS = (2, 3, 4, 8)


# ------------------------------------------------------------------------------ grammar

@pytest.mark.parametrize("spec,kind,value", [
    ("0.08MB", "mb", 0.08), (" 1.5 mb ", "mb", 1.5), ("2e-2MB", "mb", 0.02), (".5MB", "mb", 0.5),
    ("avg:3", "avg", 3.0), ("AVG: 4.25", "avg", 4.25), ("avg:1e0", "avg", 1.0),
    ("uniform:3", "uniform", 3), ("uniform:08", "uniform", 8),
    ("bits:123456", "bits", 123456.0), ("bits:2.5M", "bits", 2.5e6), ("bits:1e3k", "bits", 1e6),
    ("bops:1.2G", "bops", 1.2e9), ("bops:3T", "bops", 3e12), ("bops:7", "bops", 7.0),
    ("bops:5k", "bops", 5e3),
])
def test_parse_budget_forms(spec, kind, value):
  b = alloc.parse_budget(spec)
  assert (b.kind, b.spec) == (kind, spec.strip())
  assert b.value == pytest.approx(value, rel=1e-15)
  assert type(b.value) is (int if kind == "uniform" else float)
  assert alloc.parse_budget(b) is b  # parsed once: a Budget passes through


BAD = ["", " ", "avg:", "avg:-1", "avg:0", "avg:nan", "avg:inf", "avg:1e999", "bits:1e999",
       "bops:1e999T", "uniform:2.5", "uniform:0", "uniform:-3", "uniform:three", "1e9XB",
       "0MB", "-1MB", "MB", "nanMB", "3", "avg3", "avg:3:4", "avg:3MB", "size:3", "mb:3",
       "bits:1.2X", "bops:1.2GG", "avg:1_0", "avg:٣", "bits:0x10", "bops:-1G", "bits:",
       "uniform:", ":3", None, 3, 3.5, True, ["avg:3"], b"avg:3"]


@pytest.mark.parametrize("spec", BAD, ids=repr)
def test_every_malformed_budget_names_the_value_and_the_forms(spec):
  with pytest.raises(BudgetError) as e:
    alloc.parse_budget(spec)
  msg = str(e.value)
  assert repr(spec) in msg and "Valid forms" in msg
  for example in ("'0.08MB'", "'avg:3'", "'uniform:3'", "'bits:", "'bops:1.2G'"):
    assert example in msg
  assert "\n" not in msg


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(),
    st.text(alphabet="0123456789.eE+-: \tavgunifombpstKkMGTXB_", max_size=14),
    st.builds(lambda k, t: k + t, st.sampled_from(["avg:", "uniform:", "bits:", "bops:", ""]),
              st.text(alphabet="0123456789.eE+-kKMGTnaif ", max_size=10)),
    st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.integers(), max_size=2)))
def test_junk_budgets_raise_only_budget_error(spec):
  try:
    b = alloc.parse_budget(spec)
  except BudgetError:
    return
  # Whatever parses is a well-formed budget.
  assert b.kind in alloc.BUDGET_KINDS and np.isfinite(b.value) and b.value > 0
  assert isinstance(spec, str) and b.spec == spec.strip()


# ------------------------------------------------------------------ problems and brute force

def _problem(seed, L=5, *, kind="weights", pin=None, tie=False, bits=BITS, sens=True):
  rng = np.random.default_rng(seed)
  layers = [f"layer{l}" for l in range(L)]
  counts = rng.integers(5, 400, L)
  errors = counts[:, None] * np.exp(-0.7 * np.asarray(bits))[None] * rng.uniform(0.5, 2, (L, 1))
  tr = rng.lognormal(size=L)
  tr[rng.integers(L)] = -0.3  # a noisy negative trace: clamped to 0
  kw = dict(kind=kind, avg_traces=tr if sens else None, top_eigs=rng.lognormal(size=L) * 10,
            macs=counts * rng.integers(1, 50, L), other_bits=rng.choice([4, 8], L),
            fixed_bytes=float(rng.integers(0, 5000)))
  if pin:
    kw["pinned"] = alloc.pins_first_last(layers, pin)
  if tie:
    kw["tied"] = [[layers[1], layers[3]]]
  return alloc.Problem(layers, counts, bits, errors, **kw)


def _configs(pb):
  """Every allowed configuration (widths), by enumeration independent of the Problem."""
  opts = [[pb.pinned[l]] if l in pb.pinned else list(pb.bit_choices) for l in pb.layers]
  for bits in itertools.product(*opts):
    if all(len({bits[pb.layers.index(l)] for l in g}) == 1 for g in pb.tied):
      yield list(bits)


def _cost(pb, bits, unit):
  """The unit costs, written out from their definitions."""
  n, b = pb.counts, np.asarray(bits, float)
  if unit == "bops":
    return float(np.sum(pb.macs * b * pb.other_bits))
  s = float(np.sum(n * b))
  return {"bits": s, "avg": s / n.sum(), "mb": (pb.fixed_bytes + s / 8) / 1e6}[unit]


def _spec(kind, value):
  if kind == "mb":
    return f"{value!r}MB"
  if kind == "bops":
    return f"bops:{value / 1e3!r}K"
  return f"{kind}:{value!r}"


@pytest.mark.parametrize("seed,kind,pin,tie", [
    (0, "weights", None, False), (1, "weights", 8, False), (2, "activations", 8, True),
    (3, "activations", None, True), (4, "weights", 4, True)])
def test_select_is_least_omega_within_every_budget_kind(seed, kind, pin, tie):
  pb = _problem(seed, kind=kind, pin=pin, tie=tie)
  cfgs = list(_configs(pb))
  rng = np.random.default_rng(seed + 100)
  for unit in ("mb", "avg", "bits", "bops"):
    costs = np.array([_cost(pb, c, unit) for c in cfgs])
    lo, hi = pb.feasible_range(unit)
    assert (lo, hi) == pytest.approx((costs.min(), costs.max()), rel=1e-12)
    for value in [*rng.uniform(lo, hi, 6), hi]:
      spec = _spec(unit, float(value))
      limit = alloc.parse_budget(spec).value
      for method in pb.methods:
        got = pb.select(spec, method)
        om = np.array([pb.omega_of(c, method) for c in cfgs])
        ok = costs <= limit * (1 + 1e-9)
        assert _cost(pb, got, unit) <= limit * (1 + 1e-9)
        assert pb.omega_of(got, method) == pytest.approx(om[ok].min(), rel=1e-12, abs=1e-300)
        assert got in cfgs
  for b in pb.bit_choices:  # 'uniform:b' is the size of the uniform configuration
    u = pb.uniform(b)
    assert pb.budget_to_cost(f"uniform:{b}") == _cost(pb, u, "bits")
    got = pb.select(f"uniform:{b}")
    assert _cost(pb, got, "bits") <= _cost(pb, u, "bits")
    assert pb.omega_of(got) <= pb.omega_of(u) + 1e-12


@pytest.mark.parametrize("kind", ["weights", "activations"])
def test_budgets_outside_the_range_state_the_range(kind):
  pb = _problem(7, kind=kind, pin=8)
  for unit, spec_hi, spec_lo in [("avg", "avg:99", "avg:1"), ("mb", "1e9MB", "1e-9MB"),
                                 ("bits", "bits:1e300", "bits:1"), ("bops", "bops:999T", "bops:1")]:
    lo, hi = pb.feasible_range(unit)
    for spec, where in ((spec_hi, "above the largest"), (spec_lo, "below the smallest")):
      with pytest.raises(BudgetError) as e:
        pb.select(spec)
      msg = str(e.value)
      assert where in msg and repr(spec) in msg and f"[{lo:.6g}, {hi:.6g}]" in msg
      with pytest.raises(BudgetError):
        alloc.choose(pb, spec, alloc.METHODS)
  for spec in ("uniform:99", "uniform:5", "uniform:1"):
    with pytest.raises(BudgetError, match=r"not one of the bit choices \(2, 3, 4, 8\)"):
      pb.select(spec)
  # The ends themselves are feasible.
  lo, hi = pb.feasible_range("avg")
  assert pb.select(_spec("avg", lo)) == pb.uniform(2)
  assert pb.cost(pb.select(_spec("avg", hi)), "avg") <= hi * (1 + 1e-12)


def test_problem_input_errors():
  layers, n = ["a", "b", "c"], [10, 20, 30]
  err = np.ones((3, 4))
  with pytest.raises(BudgetError, match=r"'a' is pinned to 5 bits.*\(2, 3, 4, 8\)"):
    alloc.Problem(layers, n, BITS, err, pinned={"a": 5})
  with pytest.raises(BudgetError, match="not among the weights layers"):
    alloc.Problem(layers, n, BITS, err, pinned={"z": 8})
  with pytest.raises(BudgetError, match="two tied groups"):
    alloc.Problem(layers, n, BITS, err, tied=[["a", "b"], ["b", "c"]])
  with pytest.raises(BudgetError, match="different widths"):
    alloc.Problem(layers, n, BITS, err, tied=[["a", "b"]], pinned={"a": 8, "b": 2})
  with pytest.raises(AmqError, match="strictly increasing"):
    alloc.Problem(layers, n, (4, 2), np.ones((3, 2)))
  bad = np.ones((3, 4))
  bad[1, 2] = np.nan
  with pytest.raises(NonFiniteError, match=r"\['b'\]"):
    alloc.Problem(layers, n, BITS, bad)
  with pytest.raises(NonFiniteError, match=r"\['c'\]"):
    alloc.Problem(layers, n, BITS, err, avg_traces=[1.0, 2.0, float("inf")])
  pb = alloc.Problem(layers, n, BITS, err, avg_traces=[1, 2, 3])
  with pytest.raises(ConfigError, match="top_eigs="):
    pb.select("avg:3", "hawq_v1")
  with pytest.raises(BudgetError, match="macs= and other_bits="):
    pb.select("bops:1G")
  with pytest.raises(ConfigError, match="unknown method"):
    alloc.choose(pb, "avg:3", ("hawq_v2", "hawq_v9"))


def test_pareto_front_takes_pins_as_bits():
  pb = _problem(11)
  t, w = pb.cost_table(), pb.omega()
  by_bits = alloc.pareto_front(t, w, pinned_bits={0: 8, 4: 3}, bit_choices=BITS)
  by_cols = alloc.pareto_front(t, w, pinned={0: 3, 4: 1})
  np.testing.assert_array_equal(by_bits.cost, by_cols.cost)
  np.testing.assert_array_equal(by_bits.choices, by_cols.choices)
  with pytest.raises(BudgetError, match="not among the bit choices"):
    alloc.pareto_front(t, w, pinned_bits={0: 5}, bit_choices=BITS)


# ------------------------------------------------------------------------------ baselines

@pytest.mark.parametrize("seed,pin,tie", [(0, None, False), (1, 8, False), (2, None, True)])
def test_high_omega_is_the_largest_omega_in_the_window(seed, pin, tie):
  pb = _problem(seed, L=6, pin=pin, tie=tie)
  cfgs = list(_configs(pb))
  for spec in ("uniform:3", "avg:4.5"):
    c = pb.budget_to_cost(spec)
    got = alloc.high_omega(pb, spec, window=0.1)
    inside = [pb.omega_of(x) for x in cfgs if 0.9 * c <= pb.cost(x) <= c]
    assert 0.9 * c <= pb.cost(got) <= c and got in cfgs
    assert pb.omega_of(got) == pytest.approx(max(inside), rel=1e-12)


def test_random_configs_fit_are_maximal_and_seeded():
  pb = _problem(4, L=6, tie=True, pin=8)
  got = [alloc.random_bits(pb, "avg:4.5", seed=s) for s in range(6)]
  c = pb.budget_to_cost("avg:4.5")
  units = [g for g in pb.tied] + [(l,) for l in pb.layers
                                  if l not in pb.pinned and not any(l in g for g in pb.tied)]
  for bits in got:
    assert bits in list(_configs(pb)) and pb.cost(bits) <= c
    for g in units:  # no free unit can be raised one step and still fit
      i = pb.layers.index(g[0])
      if bits[i] != BITS[-1]:
        up = [BITS[BITS.index(b) + 1] if l in g else b for l, b in zip(pb.layers, bits)]
        assert pb.cost(up) > c
  assert len({tuple(b) for b in got}) > 1
  assert alloc.random_bits(pb, "avg:4.5", seed=2) == got[2]


def test_choose_uniform_and_all_methods():
  pb = _problem(5, pin=8)
  assert alloc.uniform_around(pb, "uniform:3") == (3, 4)
  assert alloc.uniform_around(pb, "uniform:8") == (8, None)
  out = alloc.choose(pb, "uniform:3", alloc.METHODS, num_random=2)
  assert list(out) == ["hawq_v2", "uniform", "uniform_above", "weight_norm", "hawq_v1",
                       "high_omega", "random0", "random1"]
  assert out["uniform"] == pb.uniform(3) and out["uniform_above"] == pb.uniform(4)
  assert out["uniform"][0] == 8 and out["uniform"][-1] == 8
  c = pb.budget_to_cost("uniform:3")
  for name, bits in out.items():
    assert all(b in BITS for b in bits)
    assert name == "uniform_above" or pb.cost(bits) <= c
  assert pb.omega_of(out["hawq_v2"]) <= min(pb.omega_of(b) for m, b in out.items()
                                            if m != "uniform_above")
  assert pb.omega_of(out["high_omega"]) >= pb.omega_of(out["hawq_v2"])
  rec = alloc.allocate(pb, "uniform:3", ("hawq_v2", "uniform"))
  assert rec["budget"]["cost"] == c and rec["methods"]["uniform"]["bits"]["layer0"] == 8
  assert rec["frontier"]["points"] == len(pb.frontier())
  assert rec["methods"]["hawq_v2"]["omega"]["hawq_v2"] == pb.omega_of(out["hawq_v2"])
  # uniform at a BOPs budget: the widest uniform width whose BOPs fit
  lo, hi = pb.feasible_range("bops")
  below, above = alloc.uniform_around(pb, _spec("bops", (lo + hi) / 2))
  assert pb.cost(pb.uniform(below), "bops") <= (lo + hi) / 2 < pb.cost(pb.uniform(above), "bops")


def test_activation_search_meets_budget_and_beats_uniform():
  """What detection's act_search did, with an activation Problem."""
  rng = np.random.default_rng(1)
  L, bits = 7, (4, 6, 8)
  elems = rng.integers(10, 100, L).astype(float)
  err = np.exp(-np.log(4.0) * np.array(bits))[None, :] * rng.uniform(1, 5, (L, 1)) * elems[:, None]
  traces = rng.uniform(0, 3, L)
  layers = [f"conv{l}" for l in range(L)]
  pb = alloc.Problem(layers, elems, bits, err, kind="activations", avg_traces=traces,
                     pinned=alloc.pins_first_last(layers, 8))
  out = alloc.choose(pb, "uniform:6", ("hawq_v2", "uniform"))
  uni = [8] + [6] * (L - 2) + [8]
  assert out["uniform"] == uni and pb.budget_to_cost("uniform:6") == float(np.dot(elems, uni))
  h = out["hawq_v2"]
  assert h[0] == 8 and h[-1] == 8 and np.dot(elems, h) <= np.dot(elems, uni)
  omega = traces[:, None] * err
  best = min(sum(omega[l, bits.index(b)] for l, b in enumerate(a))
             for combo in itertools.product(bits, repeat=L - 2)
             for a in [[8, *combo, 8]] if np.dot(elems, a) <= np.dot(elems, uni))
  assert pb.omega_of(h) == pytest.approx(best, rel=1e-12)
  assert pb.omega_of(h) <= pb.omega_of(uni)
  # 'MB' for activations is activation memory per example: sum n_l a_l / 8 bytes.
  mb = float(np.dot(elems, uni)) / 8 / 1e6
  assert pb.cost(uni, "mb") == pytest.approx(mb, rel=1e-15)
  assert pb.budget_to_cost(f"{mb!r}MB") == pytest.approx(np.dot(elems, uni), rel=1e-12)
  with pytest.raises(BudgetError, match="below the smallest"):
    pb.select("avg:3")


# ------------------------------------------------------------------------------ auto_bits

@pytest.mark.parametrize("layers", [
    ["stem", "body", "head"],
    [f"Dense_{i}" for i in range(12)],
    [f"block{i}" for i in (3, 1, 10, 2)]])
def test_auto_bits_pins_first_and_last_in_execution_order(layers):
  L = len(layers)
  assert sorted(layers)[0] != layers[0] or sorted(layers)[-1] != layers[-1]
  rng = np.random.default_rng(L)
  n = rng.integers(50, 500, L)
  err = n[:, None] * np.exp(-0.7 * np.asarray(BITS))[None]
  traces = {f"{l}/kernel": 1e-3 for l in layers}  # kernel paths are accepted as keys
  bits, info = alloc.auto_bits(layers, n, err, traces, budget="uniform:2", pin_first_last=8)
  assert list(bits) == layers  # execution order kept
  assert bits[layers[0]] == 8 and bits[layers[-1]] == 8
  assert all(bits[l] == 2 for l in layers[1:-1])  # 'uniform:2' leaves nothing to spend
  assert info["avg_bits"] == pytest.approx(np.dot(n, list(bits.values())) / n.sum())
  # Without pins, the same budget puts every layer at 2 bits.
  free, _ = alloc.auto_bits(layers, n, err, traces, budget="uniform:2")
  assert set(free.values()) == {2}
  with pytest.raises(BudgetError, match="pinned to 5 bits"):
    alloc.auto_bits(layers, n, err, traces, pin_first_last=5)


def test_auto_bits_gives_sensitive_layers_more_bits():
  layers = ["z_first", "a_second"]
  n = np.array([64, 32])
  err = n[:, None] * np.exp(-0.7 * np.asarray(BITS))[None]
  bits, info = alloc.auto_bits(layers, n, err, [10.0, 0.01], budget="avg:6")
  assert bits["z_first"] > bits["a_second"] and info["avg_bits"] <= 6 + 1e-9
