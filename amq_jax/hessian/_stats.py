"""The stopping rule of the trace estimators and the status it gives each layer.

A Hutchinson-type estimator returns ``k`` independent samples ``x_1..x_k`` whose mean is an
unbiased estimate of a trace ``T``. With the sample standard deviation ``s`` (``k - 1``
degrees of freedom), ``(mean - T) / (s / sqrt(k))`` follows Student's t with ``k - 1``
degrees of freedom when the samples are normal, and approximately so otherwise (central
limit theorem). So

    mean +- t_{(1 + c) / 2, k - 1} * s / sqrt(k)

is a ``c``-confidence interval for ``T`` (``c = 0.95`` by default). A layer STOPS when the
interval's half-width ``h`` is small:

    h <= rtol * |mean|      (relative precision)   or   h <= atol   (absolute floor)

after at least ``min_probes`` samples (default 10). With 4 samples the normal quantile
1.96 understates the 95% half-width by 40% (``t_{0.975, 3} = 3.18``) and ``s`` itself is
so noisy that the rule fires mostly on runs whose spread happened to be small, which are
exactly the runs that miss; ``t`` and at least 10 samples remove most of that.

Each layer then gets a ``status``:

* ``'converged'``: the rule was met and the interval lies above zero;
* ``'max_probes'``: stopped by ``max_probes`` (or ``max_time``) before the rule was met,
  the interval above zero (the estimate is positive but less precise than asked);
* ``'negative'``: the interval lies below zero: the block has measurably negative
  curvature (a saddle or an untrained model); a PSD quantity (GGN, Fisher) is never
  negative;
* ``'near_zero'``: the interval contains zero, or ``|mean| <= atol``: the trace cannot be
  told from zero at the precision reached (an exactly zero block has ``s = 0`` and
  stops at ``min_probes`` with this status).

What the Omega table does with the last two is :func:`sensitivity_traces`'s business.
"""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["STATUSES", "t_quantile", "interval", "rule_met", "classify"]

STATUSES = ("converged", "max_probes", "negative", "near_zero")


@functools.lru_cache(maxsize=8192)
def t_quantile(confidence: float, df: int) -> float:
  """Two-sided Student-t quantile ``t_{(1 + confidence) / 2, df}`` (``inf`` for ``df < 1``)."""
  if df < 1:
    return math.inf
  from scipy.stats import t  # scipy ships with jax
  return float(t.ppf(0.5 + 0.5 * confidence, df))


def interval(samples, confidence: float = 0.95) -> tuple[float, float, float]:
  """``(mean, stderr, half_width)`` of the ``confidence`` interval on the samples' mean."""
  s = np.asarray(samples, np.float64).reshape(-1)
  k = s.size
  if k == 0:
    return math.nan, math.inf, math.inf
  mean = float(s.mean())
  if k < 2:
    return mean, math.inf, math.inf
  se = float(s.std(ddof=1) / math.sqrt(k))
  return mean, se, t_quantile(confidence, k - 1) * se


def rule_met(samples, *, rtol: float, atol: float, min_probes: int,
             confidence: float = 0.95) -> bool:
  """Whether the stopping rule of the module docstring holds for ``samples``."""
  if len(samples) < max(min_probes, 2):
    return False
  mean, _, h = interval(samples, confidence)
  return bool(h <= rtol * abs(mean) or h <= atol)


def classify(mean: float, stderr: float, probes: int, *, met: bool, atol: float = 0.0,
             confidence: float = 0.95) -> str:
  """The status (module docstring) of an estimate with this mean, stderr and sample count."""
  if probes < 2 or not math.isfinite(stderr):
    return "near_zero" if abs(mean) <= atol else ("converged" if met else "max_probes")
  h = t_quantile(confidence, probes - 1) * stderr
  if abs(mean) <= atol:
    return "near_zero"
  if mean + h < 0:
    return "negative"
  if mean - h <= 0:
    return "near_zero"
  return "converged" if met else "max_probes"
