"""Budgets: one grammar for every way a user states how small a model must be.

A budget is parsed once, where it enters (command line, config, Python call), into a
:class:`Budget`; everything after that takes the parsed value. The forms:

=================  =========  ==============================================================
form               kind       meaning
=================  =========  ==============================================================
``'0.08MB'``       ``mb``     model size in MB (10^6 bytes, never MiB): quantized widths plus
                              everything else (float32 parameters, scales); for activations,
                              activation memory per example
``'avg:3'``        ``avg``    average width ``sum_l n_l b_l / sum_l n_l`` (``n_l`` elements)
``'uniform:3'``    ``uniform``  the size of the uniform 3-bit configuration (pinned layers
                              keep their pins); 3 must be one of the bit choices
``'bits:2.5M'``    ``bits``   total width ``sum_l n_l b_l`` in bits
``'bops:1.2G'``    ``bops``   bit operations ``sum_l MACs_l * w_l * a_l`` per example
=================  =========  ==============================================================

Numbers are positive and finite; ``bits`` and ``bops`` take the decimal suffixes
``K M G T`` (10^3 .. 10^12). Kinds and suffixes are case-insensitive. Anything else
(``''``, ``'avg:'``, ``'avg:-1'``, ``'avg:nan'``, ``'bits:1e999'``, ``'uniform:2.5'``,
``None``, the number ``3``) raises :class:`amq_jax.errors.BudgetError` naming the value and
listing these forms.

>>> parse_budget('bops:1.2G')
Budget(kind='bops', value=1200000000.0, spec='bops:1.2G')
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

from amq_jax.errors import BudgetError

__all__ = ["Budget", "parse_budget", "BUDGET_KINDS", "BUDGET_FORMS"]

BUDGET_KINDS = ("mb", "avg", "uniform", "bits", "bops")
BUDGET_FORMS = ("'0.08MB' (size in MB = 10^6 bytes), 'avg:3' (average bits), 'uniform:3' (the "
                "size of uniform 3-bit), 'bits:2.5M' (total bits), 'bops:1.2G' (bit operations; "
                "suffixes K, M, G, T = 10^3..10^12)")

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
# ASCII digits only: Python's \d and float() also accept other scripts' digits.
_NUM = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_MB = re.compile(rf"({_NUM})[ \t]*mb", re.I)
_KEYED = re.compile(r"([a-z]+)[ \t]*:[ \t]*(.*)", re.I | re.S)
_COUNT = re.compile(rf"({_NUM})([kmgt]?)", re.I)
_INT = re.compile(r"[0-9]+")


class Budget(NamedTuple):
  """A parsed budget.

  ``kind``: one of :data:`BUDGET_KINDS`; ``value``: MB for 'mb', average bits for 'avg',
  the width (an int) for 'uniform', bits for 'bits', bit operations for 'bops';
  ``spec``: the text it was parsed from (stripped), for messages and records.
  """
  kind: str
  value: float
  spec: str

  def __str__(self) -> str:
    return self.spec

  def describe(self, what: str = "weights") -> str:
    """A short phrase, e.g. ``'0.08 MB of weights'`` or ``'average 3 activation bits'``."""
    act = what.startswith("act")
    if self.kind == "mb":
      return f"{self.value:g} MB of {'activation memory per example' if act else 'model size'}"
    if self.kind == "avg":
      return f"average {self.value:g} {'activation' if act else 'weight'} bits"
    if self.kind == "uniform":
      return f"the size of uniform {self.value}-bit {'activations' if act else 'weights'}"
    if self.kind == "bits":
      return f"{self.value:.10g} {'activation bits per example' if act else 'weight bits'}"
    return f"{self.value:.4g} bit operations per example"


def _bad(spec, why: str) -> BudgetError:
  return BudgetError(f"invalid budget {spec!r}: {why}. Valid forms: {BUDGET_FORMS}.")


def _positive(spec, text: str, scale: float = 1.0) -> float:
  try:
    v = float(text) * scale
  except (ValueError, OverflowError):
    raise _bad(spec, f"{text!r} is not a number") from None
  if not math.isfinite(v):
    raise _bad(spec, f"{text!r} is not finite")
  if v <= 0:
    raise _bad(spec, "the number must be > 0")
  return v


def parse_budget(spec) -> Budget:
  """Parses a budget string (see the module docstring for the forms).

  Args:
    spec: the budget text, or a :class:`Budget` (returned unchanged).

  Returns:
    A :class:`Budget`.

  Raises:
    BudgetError: anything that is not one of the forms, naming the value and the forms.

  >>> parse_budget(' avg:3.5 ')
  Budget(kind='avg', value=3.5, spec='avg:3.5')
  """
  if isinstance(spec, Budget):
    return spec
  if not isinstance(spec, str):
    raise _bad(spec, f"a budget is text, not a {type(spec).__name__}")
  s = spec.strip()
  if not s:
    raise _bad(spec, "it is empty")
  if (m := _MB.fullmatch(s)):
    return Budget("mb", _positive(spec, m.group(1)), s)
  m = _KEYED.fullmatch(s)
  if not m:
    raise _bad(spec, "unknown form")
  kind, arg = m.group(1).lower(), m.group(2).strip()
  if kind not in BUDGET_KINDS or kind == "mb":
    raise _bad(spec, f"unknown kind {m.group(1)!r}")
  if not arg:
    raise _bad(spec, f"'{kind}:' needs a number")
  if kind == "uniform":
    if not _INT.fullmatch(arg):
      raise _bad(spec, f"'uniform:' takes a whole bit width, got {arg!r}")
    b = int(arg)
    if b < 1:
      raise _bad(spec, "the width must be >= 1")
    return Budget("uniform", b, s)
  if kind == "avg":
    if not re.fullmatch(_NUM, arg):
      raise _bad(spec, f"{arg!r} is not a positive number")
    return Budget("avg", _positive(spec, arg), s)
  c = _COUNT.fullmatch(arg)
  if not c:
    raise _bad(spec, f"{arg!r} is not a positive number with an optional K/M/G/T suffix")
  return Budget(kind, _positive(spec, c.group(1), _SUFFIX[c.group(2).lower()]), s)
