"""Bit configurations as data: ``{layer_path: {'w': bits, 'a': bits or None}}``.

A layer path is a module path such as ``'stage1_block1/conv1'``; kernel paths
(``'stage1_block1/conv1/kernel'``) are accepted everywhere and normalized. ``'w'`` is the
weight width, ``'a'`` the width of the layer's INPUT activation (None: kept in float).
Layers not in a configuration stay in float32.

Two forms, both JSON:

* explicit: ``{"stem_conv": {"w": 8, "a": 8}, "stage1_block1/conv1": {"w": 4, "a": null}}``
  (a bare int ``4`` means ``{"w": 4, "a": None}``);
* rules: ``[{"pattern": "stage1_.*", "w": 4, "a": 8}, {"pattern": ".*", "w": 8}]``, regexes
  matched in full (``re.fullmatch``) against each layer path of a model, first match wins;
  ``resolve_rules`` turns them into the explicit form.

>>> cfg = BitConfig({'stem_conv/kernel': 8, 'head': {'w': 4, 'a': 8}})
>>> cfg['stem_conv']
{'w': 8, 'a': None}
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

from amq_jax.quant._math import MAX_BITS, MIN_BITS

__all__ = ["BitConfig", "normalize_path", "resolve_rules", "validate", "as_bit_config",
           "uniform_config"]


def normalize_path(path: str) -> str:
  """Module path of a layer: strips a trailing '/kernel' (and surrounding slashes)."""
  p = str(path).strip("/")
  return p[: -len("/kernel")] if p.endswith("/kernel") else p


def _bits_ok(b) -> bool:
  return (b is None or (isinstance(b, int) and not isinstance(b, bool)
                        and MIN_BITS <= b <= MAX_BITS))


def _entry(v) -> dict:
  if isinstance(v, Mapping):
    unknown = set(v) - {"w", "a"}
    if unknown:
      raise ValueError(f"bit entry {dict(v)} has unknown keys {sorted(unknown)}; use 'w', 'a'")
    w, a = v.get("w"), v.get("a")
  else:
    w, a = v, None
  return {"w": None if w is None else _as_int(w), "a": None if a is None else _as_int(a)}


def _as_int(b):
  try:
    if float(b) == int(b):
      return int(b)
  except (TypeError, ValueError):
    pass
  return b  # left as is, so validation reports it


class BitConfig(Mapping):
  """An immutable mapping ``layer_path -> {'w': int | None, 'a': int | None}``.

  Build from any mapping (kernel paths normalized, ints expanded), from rules with
  :func:`resolve_rules`, or from JSON with :meth:`load`.
  """

  def __init__(self, entries: Mapping[str, Any] | None = None):
    self._d: dict[str, dict] = {}
    for k, v in (entries or {}).items():
      key = normalize_path(k)
      if key in self._d:
        raise ValueError(f"layer {key!r} given twice (as layer and kernel path?)")
      self._d[key] = _entry(v)

  def __getitem__(self, layer: str) -> dict:
    return dict(self._d[normalize_path(layer)])

  def __contains__(self, layer) -> bool:
    return isinstance(layer, str) and normalize_path(layer) in self._d

  def __iter__(self) -> Iterator[str]:
    return iter(self._d)

  def __len__(self) -> int:
    return len(self._d)

  def __repr__(self) -> str:
    return f"BitConfig({self._d})"

  def __eq__(self, other) -> bool:
    return isinstance(other, Mapping) and self.to_dict() == as_bit_config(other).to_dict()

  @property
  def layers(self) -> list[str]:
    return list(self._d)

  def w_bits(self, layer: str) -> int | None:
    return self._d[normalize_path(layer)]["w"] if layer in self else None

  def a_bits(self, layer: str) -> int | None:
    return self._d[normalize_path(layer)]["a"] if layer in self else None

  def to_dict(self) -> dict:
    return {k: dict(v) for k, v in self._d.items()}

  def validate(self, valid_layers: Iterable[str]) -> "BitConfig":
    validate(self, valid_layers)
    return self

  def save(self, path: str | os.PathLike) -> None:
    """Writes the explicit form as JSON."""
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=1, sort_keys=False)

  @classmethod
  def load(cls, path: str | os.PathLike, layers: Sequence[str] | None = None) -> "BitConfig":
    """Reads JSON: an explicit mapping, or a rule list (then ``layers`` is required)."""
    with open(path) as f:
      data = json.load(f)
    if isinstance(data, list):
      if layers is None:
        raise ValueError(f"{path} holds rules; pass the model's layer list to resolve them")
      return resolve_rules(data, layers)
    cfg = cls(data)
    if layers is not None:
      validate(cfg, layers)
    return cfg


def as_bit_config(cfg) -> BitConfig:
  """A ``BitConfig`` from a ``BitConfig`` or a mapping."""
  return cfg if isinstance(cfg, BitConfig) else BitConfig(cfg)


def uniform_config(layers: Iterable[str], w: int | None, a: int | None = None) -> BitConfig:
  """Every layer at ``w``-bit weights (and ``a``-bit input activations)."""
  return BitConfig({normalize_path(l): {"w": w, "a": a} for l in layers})


def resolve_rules(rules: Sequence[Mapping[str, Any]], layers: Sequence[str], *,
                  allow_unmatched_rules: bool = False) -> BitConfig:
  """Applies ``[{'pattern': regex, 'w': ..., 'a': ...}, ...]`` to ``layers``; first match wins.

  Layers no rule matches stay float. A rule that matches no layer is an error (a typo in a
  pattern would otherwise silently keep layers in float) unless ``allow_unmatched_rules``.
  """
  layers = [normalize_path(l) for l in layers]
  out, used = {}, [False] * len(rules)
  for r in rules:
    if "pattern" not in r:
      raise ValueError(f"rule {dict(r)} has no 'pattern'")
  compiled = [re.compile(r["pattern"]) for r in rules]
  for layer in layers:
    for i, (rx, r) in enumerate(zip(compiled, rules)):
      if rx.fullmatch(layer):
        out[layer] = {k: r.get(k) for k in ("w", "a")}
        used[i] = True
        break
  cfg = BitConfig(out)
  unmatched = [r["pattern"] for r, u in zip(rules, used) if not u]
  problems = []
  if unmatched and not allow_unmatched_rules:
    problems.append(f"rules matching no layer: {unmatched}")
  problems += _bit_problems(cfg)
  if problems:
    raise ValueError("invalid bit rules: " + "; ".join(problems) + f". Valid layers: {layers}")
  return cfg


def _bit_problems(cfg: BitConfig) -> list[str]:
  bad = {k: v for k, v in cfg.to_dict().items() if not (_bits_ok(v["w"]) and _bits_ok(v["a"]))}
  if bad:
    return [f"bits out of range [{MIN_BITS}, {MAX_BITS}] (or not integers): {bad}"]
  return []


def validate(config, valid_layers: Iterable[str]) -> BitConfig:
  """Checks a configuration against a model's layers; returns it as a ``BitConfig``.

  Raises ValueError listing unknown layer paths and out-of-range bits, with the valid paths.
  """
  cfg = as_bit_config(config)
  valid = [normalize_path(l) for l in valid_layers]
  vs = set(valid)
  problems = []
  unknown = [l for l in cfg.layers if l not in vs]
  if unknown:
    problems.append(f"unknown layer paths {unknown}")
  problems += _bit_problems(cfg)
  if problems:
    raise ValueError("invalid bit configuration: " + "; ".join(problems)
                     + f". Valid layer paths: {valid}")
  return cfg
