"""From trace estimates to the per-layer sensitivities used in Omega, with a stated policy.

HAWQ-V2's Omega is ``avg_trace_l * ||Q_b(W_l) - W_l||^2`` and the allocator minimizes its
sum. The sign of ``avg_trace`` therefore matters:

* negative: quantization error would LOWER the objective: the allocator gives the layer
  the fewest bits and counts the damage as a gain;
* zero: the layer's error is free: any width is as good as any other, so the layer gets
  the fewest bits however large its error (the old behaviour, a silent clamp to 0).

A ``'negative'`` or ``'near_zero'`` estimate (see :mod:`amq_jax.hessian._stats`) says that
this layer's curvature cannot be told from zero (or is below it) at the precision reached:
it IS among the least sensitive layers, but not free. The default policy ``'floor'``
replaces it by a small positive value, ``floor_fraction`` (1%) of the median average trace
of the layers with a positive estimate: the layer stays the least sensitive, and its
quantization error is still charged, so a layer whose error explodes at low widths still
gets bits. Every such layer is listed in ``adjusted`` so reports can warn about it; layers
stopped at ``max_probes`` (positive but imprecise) keep their value and are listed too.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from amq_jax.errors import LayerError

__all__ = ["Sensitivity", "sensitivity_traces", "POLICIES"]

POLICIES = ("floor", "zero", "raw", "raise")
_FLAGGED = ("negative", "near_zero")


class Sensitivity(NamedTuple):
  """Per-layer average traces for Omega and how each was obtained.

  Attributes:
    avg_traces: ``{path: float}``, the values to use in Omega (``Tr / n``).
    measured: ``{path: float}``, the estimates' own ``avg_trace``.
    status: ``{path: status}`` of the estimates.
    adjusted: ``{path: note}`` for every layer whose value was replaced or whose estimate
      is not ``'converged'`` (what a report should warn about).
    floor: the value given to negative / near-zero layers under ``'floor'`` (else 0).
    policy: the policy used.
  """
  avg_traces: dict
  measured: dict
  status: dict
  adjusted: dict
  floor: float
  policy: str

  def __repr__(self) -> str:
    return (f"Sensitivity(policy={self.policy!r}, layers={len(self.avg_traces)}, "
            f"adjusted={len(self.adjusted)}, floor={self.floor:.3g})")


def _fields(e) -> tuple[float, str]:
  if hasattr(e, "avg_trace"):
    return float(e.avg_trace), str(getattr(e, "status", "converged"))
  if isinstance(e, Mapping):
    return float(e["avg_trace"]), str(e.get("status", "converged"))
  return float(e), ("negative" if float(e) < 0 else "near_zero" if float(e) == 0
                    else "converged")


def sensitivity_traces(estimates: Mapping, *, policy: str = "floor",
                       floor_fraction: float = 0.01) -> Sensitivity:
  """Average traces for Omega from ``{path: TraceEstimate}`` (module docstring).

  Args:
    estimates: ``{path: TraceEstimate}`` (or the dicts of ``estimates_to_json``, or plain
      floats, whose status is taken from their sign).
    policy: what a ``'negative'`` or ``'near_zero'`` layer gets:

      * ``'floor'`` (default): ``floor_fraction * median`` of the positive average
        traces of the other layers;
      * ``'zero'``: 0 (its quantization error is free);
      * ``'raw'``: the measured value, even if negative (for analysis only);
      * ``'raise'``: a :class:`~amq_jax.errors.LayerError` naming the layers.
    floor_fraction: see ``'floor'``; in (0, 1].

  Returns:
    :class:`Sensitivity`.

  Raises:
    LayerError: ``policy='raise'`` and some layer is negative or near zero, or
      ``policy='floor'`` and no layer has a positive estimate to take the median of.

  Example:
    >>> s = hessian.sensitivity_traces(est)
    >>> s.avg_traces['head/kernel'], s.adjusted
  """
  if policy not in POLICIES:
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
  if not 0 < floor_fraction <= 1:
    raise ValueError(f"floor_fraction must be in (0, 1], got {floor_fraction}")
  measured, status = {}, {}
  for p, e in estimates.items():
    measured[p], status[p] = _fields(e)
  flagged = [p for p in measured if status[p] in _FLAGGED]
  adjusted, floor = {}, 0.0
  values = dict(measured)
  if flagged and policy == "raise":
    raise LayerError(
        "trace estimate(s) " + ", ".join(f"{p} ({status[p]}, avg {measured[p]:.3g})"
                                         for p in flagged)
        + " cannot be told from zero or are negative; raise max_probes, use more examples, "
        "train the model closer to a minimum, or choose policy='floor'")
  if flagged and policy == "floor":
    pos = [v for p, v in measured.items() if status[p] not in _FLAGGED and v > 0]
    if not pos:
      raise LayerError(
          f"no layer has a positive trace estimate (statuses: {sorted(set(status.values()))}); "
          "the model is not near a minimum or the estimates are too noisy: raise "
          "max_probes or num_examples, or train the model first")
    floor = floor_fraction * float(np.median(pos))
  for p in measured:
    s = status[p]
    if s in _FLAGGED:
      if policy == "floor":
        values[p] = floor
        adjusted[p] = (f"{s} estimate ({measured[p]:.3g}) floored at {floor:.3g} "
                       f"({floor_fraction:g} x median positive avg trace)")
      elif policy == "zero":
        values[p] = 0.0
        adjusted[p] = f"{s} estimate ({measured[p]:.3g}) set to 0: quantization error free"
      else:
        adjusted[p] = f"{s} estimate ({measured[p]:.3g}) used as measured"
    elif s == "max_probes":
      adjusted[p] = f"stopped at max_probes before the precision asked ({measured[p]:.3g} kept)"
  return Sensitivity(values, measured, status, adjusted, floor, policy)
