"""One allocation problem: per-layer tables for ONE kind of widths (weights or activations).

A :class:`Problem` is plain host data, in the layers' execution order: names, element
counts ``n_l``, MACs per example, the bit choices, the ``[L, B]`` quantization errors
``e_l(b) = ||Q_b(x_l) - x_l||^2`` and per-layer sensitivities. From these it answers:

* the cost of a configuration ``b = (b_1 .. b_L)`` in every budget unit:

  - ``'bits'``: ``S(b) = sum_l n_l b_l`` (weights: kernel elements; activations: input
    elements per example);
  - ``'avg'``: ``S(b) / sum_l n_l``;
  - ``'mb'``: ``(fixed_bytes + S(b) / 8) / 10^6``. For weights ``fixed_bytes`` is everything
    the widths do not change (float32 parameters, per-channel scales;
    :func:`amq_jax.alloc.fixed_size_bytes`), and the figure is the packed size up to the
    rounding of each layer to whole bytes (under one byte per layer). For activations it is
    the activation memory per example, ``sum_l n_l a_l / 8`` bytes (``fixed_bytes`` 0 unless
    given);
  - ``'bops'``: ``sum_l MACs_l * b_l * o_l`` with ``o_l`` the other side's width (activation
    bits when the problem is weights, weight bits when it is activations);

* the perturbation ``Omega(b) = sum_l s_l * e_l(b_l)`` for each sensitivity ``s``
  (HAWQ-V2, Dong et al. 2020, Sec. 3):

  - ``'hawq_v2'``: ``s_l = Tr(H_l) / n_l`` (``avg_traces``; negative estimates are clamped
    to 0: a Hessian block of a minimum is PSD, and a negative trace must not reward error);
  - ``'hawq_v1'``: ``s_l = lambda_max_l / n_l`` (``top_eigs``; clamped to 0 likewise);
  - ``'weight_norm'``: ``s_l = 1`` (quantization error alone);

* the exact cost-vs-Omega frontier (:func:`amq_jax.alloc.pareto_front`) with pins and tied
  groups, the least-Omega configuration within a budget (:meth:`Problem.select`), and the
  feasible range of a budget. A budget outside the range raises
  :class:`amq_jax.errors.BudgetError` stating the range.

Pins and results are always widths in bits, never column indices.

>>> pb = Problem(['stem', 'body', 'head'], [432, 9216, 640], (2, 4, 8), errors,
...              avg_traces=[0.9, 0.05, 0.4], pinned={'stem': 8, 'head': 8})
>>> pb.select('avg:4')
[8, 2, 8]
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from amq_jax.alloc._budget import Budget, parse_budget
from amq_jax.alloc._costs import MB
from amq_jax.alloc._frontier import Frontier, pareto_front
from amq_jax.alloc._omega import _per_layer
from amq_jax.errors import BitsError, BudgetError, ConfigError, LayerError, NonFiniteError

__all__ = ["Problem", "SENSITIVITIES", "UNITS", "RTOL"]

SENSITIVITIES = ("hawq_v2", "weight_norm", "hawq_v1")
UNITS = ("bits", "avg", "mb", "bops")
# Relative slack when comparing a budget with a cost: the MB and average forms go through
# floating point (0.08 * 10^6 is not exactly 80000), and a budget equal to a
# configuration's cost must admit it.
RTOL = 1e-9

_UNIT_NAME = {"bits": "bits", "avg": "average bits", "mb": "MB", "bops": "BOPs"}


class Problem:
  """Per-layer tables of one kind of widths, in execution order (see the module docstring).

  Args:
    layers: layer names in forward execution order (rows of every table).
    counts: ``[L]`` element counts ``n_l`` (weights: kernel parameters; activations:
      input-activation elements per example).
    bit_choices: the widths, strictly increasing (columns of ``errors``).
    errors: ``[L, B]`` squared quantization errors ``||Q_b(x_l) - x_l||^2``.
    kind: ``'weights'`` or ``'activations'`` (wording of messages and of 'mb').
    avg_traces: ``Tr(H_l) / n_l`` per layer: a sequence in layer order or a mapping keyed by
      layer name (or ``'<layer>/kernel'``); floats or objects with ``avg_trace``. Enables
      'hawq_v2'.
    top_eigs: top Hessian eigenvalue per layer, same forms. Enables 'hawq_v1'.
    macs: ``[L]`` multiply-accumulates per example (needed for 'bops' budgets).
    other_bits: the other side's widths for BOPs: one int, a sequence in layer order or a
      ``{layer: bits}`` mapping.
    fixed_bytes: bytes the widths do not change (the 'mb' unit adds them).
    pinned: ``{layer name: bits}``; each width must be one of ``bit_choices``.
    tied: groups of layer names that must share one width (disjoint).

  Raises:
    BudgetError: pins or ties that name unknown layers, widths outside ``bit_choices``,
      overlapping groups, or a group pinned to two widths.
    BitsError: bit choices that are not strictly increasing widths in 1..16.
    NonFiniteError: a NaN/Inf error, trace or eigenvalue (names the layer).
  """

  def __init__(self, layers: Sequence[str], counts, bit_choices: Sequence[int], errors, *,
               kind: str = "weights", avg_traces=None, top_eigs=None, macs=None,
               other_bits=None, fixed_bytes: float = 0.0,
               pinned: Mapping[str, int] | None = None,
               tied: Sequence[Sequence[str]] | None = None):
    if kind not in ("weights", "activations"):
      raise ValueError(f"kind must be 'weights' or 'activations', got {kind!r}")
    self.kind = kind
    self.layers = tuple(str(l) for l in layers)
    L = len(self.layers)
    if L == 0:
      raise LayerError(f"no layers to allocate {kind} widths to")
    dup = sorted({l for l in self.layers if self.layers.count(l) > 1})
    if dup:
      raise LayerError(f"layer names must be unique; repeated: {dup}")
    self.bit_choices = _bit_choices(bit_choices)
    B = len(self.bit_choices)
    self.counts = np.asarray(counts, np.float64).reshape(-1)
    if self.counts.shape != (L,):
      raise ValueError(f"counts has {self.counts.size} values for {L} layers")
    bad = [l for l, n in zip(self.layers, self.counts) if not (np.isfinite(n) and n > 0)]
    if bad:
      raise LayerError(f"layers {bad} have no elements (counts must be > 0)")
    self.errors = np.asarray(errors, np.float64)
    if self.errors.shape != (L, B):
      raise ValueError(f"errors must be [L, B] = [{L}, {B}], got {self.errors.shape}")
    _finite(self.errors, self.layers, "quantization error")
    self._sens = {"weight_norm": np.ones(L)}
    for name, values in (("hawq_v2", avg_traces), ("hawq_v1", top_eigs)):
      if values is not None:
        v = _per_layer(values, self.layers, "avg_traces" if name == "hawq_v2" else "top_eigs")
        _finite(v, self.layers, "avg_traces" if name == "hawq_v2" else "top eigenvalue")
        v = np.maximum(v, 0.0)
        self._sens[name] = v if name == "hawq_v2" else v / self.counts
    self.macs = None if macs is None else _per_layer(macs, self.layers, "macs")
    if other_bits is None or np.ndim(other_bits) == 0 and not isinstance(other_bits, Mapping):
      self.other_bits = None if other_bits is None else np.full(L, float(other_bits))
    else:
      self.other_bits = _per_layer(other_bits, self.layers, "other_bits")
    self.fixed_bytes = float(fixed_bytes)
    self.pinned = self._pins(pinned)
    self.tied = self._ties(tied)
    self._units = self._make_units()
    self._fronts: dict = {}

  # -- construction helpers ---------------------------------------------------------------
  def _pins(self, pinned) -> dict[str, int]:
    pinned = dict(pinned or {})
    unknown = [l for l in pinned if l not in self.layers]
    if unknown:
      raise BudgetError(f"pinned layers {unknown} are not among the {self.kind} layers "
                        f"{list(self.layers)}")
    out = {}
    for l in self.layers:  # execution order
      if l in pinned:
        b = pinned[l]
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or int(b) not in self.bit_choices:
          raise BudgetError(f"layer {l!r} is pinned to {b!r} bits, not one of the bit choices "
                            f"{self.bit_choices}; pin it to one of them or add {b!r} to the "
                            "choices")
        out[l] = int(b)
    return out

  def _ties(self, tied) -> tuple[tuple[str, ...], ...]:
    groups, owner = [], {}
    for g in tied or ():
      g = tuple(g)
      unknown = [l for l in g if l not in self.layers]
      if unknown or not g:
        raise BudgetError(f"tied group {list(g)} names unknown layers {unknown}; layers: "
                          f"{list(self.layers)}")
      for l in g:
        if l in owner:
          raise BudgetError(f"layer {l!r} is in two tied groups ({list(owner[l])} and "
                            f"{list(g)}); merge them into one group")
        owner[l] = g
      pins = sorted({self.pinned[l] for l in g if l in self.pinned})
      if len(pins) > 1:
        raise BudgetError(f"tied group {list(g)} is pinned to different widths {pins}")
      groups.append(g)
    return tuple(groups)

  def _make_units(self):
    """Merge units (a tied group or a lone layer): (layer indices, allowed column indices)."""
    pos = {l: i for i, l in enumerate(self.layers)}
    grouped = {l for g in self.tied for l in g}
    members = [sorted(pos[l] for l in g) for g in self.tied]
    members += [[i] for i, l in enumerate(self.layers) if l not in grouped]
    members.sort(key=lambda m: m[0])
    units = []
    for m in members:
      pins = {self.pinned[self.layers[i]] for i in m if self.layers[i] in self.pinned}
      opts = (np.arange(len(self.bit_choices)) if not pins
              else np.array([self.bit_choices.index(pins.pop())]))
      units.append((np.array(m), opts))
    return units

  # -- basic facts ------------------------------------------------------------------------
  def __len__(self) -> int:
    return len(self.layers)

  def __repr__(self) -> str:
    extra = "".join([f", {len(self.pinned)} pinned" if self.pinned else "",
                     f", {len(self.tied)} tied groups" if self.tied else ""])
    return (f"Problem({self.kind}, {len(self)} layers, {int(self.counts.sum())} elements, "
            f"bits {self.bit_choices}, methods {'/'.join(self.methods)}{extra})")

  @property
  def methods(self) -> tuple[str, ...]:
    """Sensitivities available for Omega (and so for :meth:`select`)."""
    return tuple(m for m in SENSITIVITIES if m in self._sens)

  def sensitivity(self, method: str = "hawq_v2") -> np.ndarray:
    """``[L]`` per-layer weights ``s_l`` of Omega for ``method``."""
    if method not in self._sens:
      need = {"hawq_v2": "avg_traces=", "hawq_v1": "top_eigs="}.get(method)
      if need is None:
        raise ConfigError(f"unknown sensitivity method {method!r}; choose from "
                          f"{list(SENSITIVITIES)}")
      raise ConfigError(f"method {method!r} needs {need} (per-layer Hessian "
                        f"{'traces' if method == 'hawq_v2' else 'top eigenvalues'}); this "
                        f"problem has {list(self.methods)}")
    return self._sens[method]

  def omega(self, method: str = "hawq_v2") -> np.ndarray:
    """``[L, B]`` ``Omega[l, j] = s_l * errors[l, j]``."""
    return self.sensitivity(method)[:, None] * self.errors

  def columns(self, bits: Sequence[int]) -> np.ndarray:
    """``[L]`` column indices of the widths ``bits`` (given in layer order)."""
    bits = list(bits)
    if len(bits) != len(self):
      raise BitsError(f"a configuration needs {len(self)} widths (one per layer), got "
                      f"{len(bits)}")
    bad = [(l, b) for l, b in zip(self.layers, bits) if b not in self.bit_choices]
    if bad:
      raise BitsError(f"widths {bad} are not among the bit choices {self.bit_choices}")
    return np.array([self.bit_choices.index(b) for b in bits])

  def as_dict(self, bits: Sequence[int]) -> dict[str, int]:
    """``{layer: bits}`` in execution order."""
    self.columns(bits)
    return {l: int(b) for l, b in zip(self.layers, bits)}

  def uniform(self, b: int) -> list[int]:
    """Every layer at ``b`` bits except pinned layers, which keep their pins."""
    if b not in self.bit_choices:
      raise BudgetError(f"uniform width {b!r} is not one of the bit choices "
                        f"{self.bit_choices}; use one of "
                        f"{', '.join(repr(f'uniform:{c}') for c in self.bit_choices)}")
    return [self.pinned.get(l, int(b)) for l in self.layers]

  # -- costs ------------------------------------------------------------------------------
  def cost_table(self, axis: str = "size") -> np.ndarray:
    """``[L, B]`` cost of each layer at each width: ``'size'`` ``n_l b`` or ``'bops'``."""
    bits = np.asarray(self.bit_choices, np.float64)
    if axis == "size":
      return self.counts[:, None] * bits[None, :]
    if axis == "bops":
      if self.macs is None or self.other_bits is None:
        missing = " and ".join(n for n, v in (("macs=", self.macs),
                                             ("other_bits=", self.other_bits)) if v is None)
        raise BudgetError(f"a 'bops' budget needs the MACs and the other side's widths; this "
                          f"{self.kind} problem was built without {missing}: pass them, or "
                          "use a size budget ('0.08MB', 'avg:3', 'uniform:3', 'bits:N')")
      return (self.macs * self.other_bits)[:, None] * bits[None, :]
    raise ValueError(f"axis must be 'size' or 'bops', got {axis!r}")

  def cost(self, bits: Sequence[int], unit: str = "bits") -> float:
    """The cost of the configuration ``bits`` (widths in layer order) in ``unit``
    (``'bits'``, ``'avg'``, ``'mb'`` or ``'bops'``; see the module docstring)."""
    j = self.columns(bits)
    axis = "bops" if unit == "bops" else "size"
    return self._to_unit(float(self.cost_table(axis)[np.arange(len(self)), j].sum()), unit)

  def _to_unit(self, c: float, unit: str) -> float:
    if unit in ("bits", "bops"):
      return c
    if unit == "avg":
      return c / float(self.counts.sum())
    if unit == "mb":
      return (self.fixed_bytes + c / 8.0) / MB
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")

  def feasible_range(self, unit: str = "bits") -> tuple[float, float]:
    """``(least, largest)`` cost over every allowed configuration (pins and ties kept)."""
    if isinstance(unit, Budget):
      unit = _unit(unit)
    axis = "bops" if unit == "bops" else "size"
    t = self.cost_table(axis)
    lo = sum(float(t[m][:, o].sum(axis=0).min()) for m, o in self._units)
    hi = sum(float(t[m][:, o].sum(axis=0).max()) for m, o in self._units)
    return self._to_unit(lo, unit), self._to_unit(hi, unit)

  def budget_to_cost(self, budget) -> float:
    """A budget -> the most a configuration may cost on the frontier's axis: ``S(b)`` in
    bits for the size forms ('mb', 'avg', 'uniform', 'bits'), BOPs for 'bops'.

    Raises:
      BudgetError: an unparsable budget, a 'uniform' width outside the bit choices, or a
        budget below the least or above the largest configuration (states the range).
    """
    b = parse_budget(budget)
    if b.kind == "uniform":
      return self.cost(self.uniform(b.value), "bits")
    if b.kind == "mb":
      c = (b.value * MB - self.fixed_bytes) * 8.0
    elif b.kind == "avg":
      c = b.value * float(self.counts.sum())
    else:
      c = float(b.value)
    lo, hi = self.feasible_range("bops" if b.kind == "bops" else "bits")
    if lo * (1 - RTOL) <= c <= hi * (1 + RTOL):
      return c
    unit = _unit(b)
    ulo, uhi = self.feasible_range(unit)
    lo_b, hi_b = min(self.bit_choices), max(self.bit_choices)
    if c < lo:
      where, fix = ("below the smallest", "raise the budget, add narrower bit choices or unpin "
                    "layers")
    else:
      where, fix = "above the largest", "lower the budget or add wider bit choices"
    raise BudgetError(
        f"budget {b.spec!r} ({b.describe(self.kind)}) is {where} configuration of these "
        f"{self.kind}: feasible {_UNIT_NAME[unit]} are [{ulo:.6g}, {uhi:.6g}] (every free "
        f"layer at {lo_b} bits .. every free layer at {hi_b} bits"
        f"{', pins kept' if self.pinned else ''}); {fix}")

  # -- selection --------------------------------------------------------------------------
  def frontier(self, method: str = "hawq_v2", axis: str = "size") -> Frontier:
    """The exact cost-vs-Omega frontier (cost on ``axis``; cached)."""
    key = (method, axis)
    if key not in self._fronts:
      groups = [list(m) for m, _ in self._units if len(m) > 1]
      pins = {int(m[0]): int(o[0]) for m, o in self._units if o.size == 1}
      self._fronts[key] = pareto_front(self.cost_table(axis), self.omega(method),
                                       groups=groups or None, pinned=pins)
    return self._fronts[key]

  def select(self, budget, method: str = "hawq_v2") -> list[int]:
    """The least-Omega configuration (widths in layer order) whose cost fits ``budget``.

    ``method`` picks the sensitivity ('hawq_v2', 'weight_norm', 'hawq_v1'); the search is
    the exact frontier in every case. Raises BudgetError outside the feasible range.
    """
    b = parse_budget(budget)
    c = self.budget_to_cost(b)
    f = self.frontier(method, "bops" if b.kind == "bops" else "size")
    return f.bits(f.at_budget(c, rtol=RTOL).index, self.bit_choices)

  def omega_of(self, bits: Sequence[int], method: str = "hawq_v2") -> float:
    """``Omega(bits)`` for ``method``."""
    j = self.columns(bits)
    return float(self.omega(method)[np.arange(len(self)), j].sum())

  def record(self, bits: Sequence[int]) -> dict:
    """A JSON-able summary of a configuration: ``bits`` ``{layer: width}``, ``size_bits``,
    ``avg_bits``, ``size_mb`` (weights: model size, activations: activation memory per
    example), ``bops`` (when MACs and other widths are known) and ``omega`` per method."""
    out = {"bits": self.as_dict(bits), "size_bits": self.cost(bits, "bits"),
           "avg_bits": self.cost(bits, "avg"), "size_mb": self.cost(bits, "mb")}
    if self.macs is not None and self.other_bits is not None:
      out["bops"] = self.cost(bits, "bops")
    out["omega"] = {m: self.omega_of(bits, m) for m in self.methods}
    return out


def _unit(b: Budget) -> str:
  return {"uniform": "bits"}.get(b.kind, b.kind)


def _bit_choices(bit_choices) -> tuple[int, ...]:
  try:
    bits = tuple(bit_choices)
  except TypeError:
    raise BitsError(f"bit choices must be a sequence of widths, got {bit_choices!r}") from None
  ok = (len(bits) > 0 and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool)
                              and 1 <= b <= 16 for b in bits)
        and all(a < b for a, b in zip(bits, bits[1:])))
  if not ok:
    raise BitsError(f"bit choices {bits!r} must be strictly increasing whole widths in "
                    "1..16, e.g. (2, 3, 4, 8)")
  return tuple(int(b) for b in bits)


def _finite(values: np.ndarray, layers: Sequence[str], what: str) -> None:
  bad = ~np.isfinite(values)
  if bad.any():
    rows = np.flatnonzero(bad.reshape(len(layers), -1).any(axis=1))
    raise NonFiniteError(f"{what} is NaN or Inf for layer(s) "
                         f"{[layers[i] for i in rows]}; re-run the analysis of those layers")
