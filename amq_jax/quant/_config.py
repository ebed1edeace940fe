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

Files in either form are read with :func:`load_bits_file`, which checks everything a file
can get wrong (JSON of the wrong type, an empty configuration, widths that are not whole
numbers in 1..16, NaN, ``1e400``, strings, booleans, rules whose regex does not compile,
unknown layers) and raises :class:`~amq_jax.errors.BitsError` naming the file, the culprit
and the valid layers.

>>> cfg = BitConfig({'stem_conv/kernel': 8, 'head': {'w': 4, 'a': 8}})
>>> cfg['stem_conv']
{'w': 8, 'a': None}
"""
from __future__ import annotations

import difflib
import json
import math
import numbers
import operator
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

from amq_jax._io import write_json
from amq_jax.errors import BitsError
from amq_jax.quant._math import MAX_BITS, MIN_BITS

__all__ = ["BitConfig", "normalize_path", "resolve_rules", "validate", "as_bit_config",
           "uniform_config", "load_bits_file", "parse_bits"]


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
      raise BitsError(f"bit entry {dict(v)} has unknown keys {sorted(unknown)}; use 'w', 'a'")
    w, a = v.get("w"), v.get("a")
  else:
    w, a = v, None
  return {"w": None if w is None else _as_int(w), "a": None if a is None else _as_int(a)}


def _as_int(b):
  """Whole numbers (``4``, ``4.0``, NumPy/JAX integers) as int; anything else (booleans,
  text, ``4.5``, NaN, inf) is left as is, so that validation reports it."""
  if isinstance(b, bool) or type(b).__name__ == "bool_":
    return b
  if isinstance(b, numbers.Integral) or (hasattr(b, "__index__") and not isinstance(b, str)):
    try:
      return operator.index(b)
    except TypeError:
      return b
  if isinstance(b, numbers.Real) and math.isfinite(b) and float(b).is_integer():
    return int(b)
  return b


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
        raise BitsError(f"layer {key!r} given twice (as layer and kernel path?)")
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
    """Writes the explicit form as JSON (atomically)."""
    write_json(path, self.to_dict())

  @classmethod
  def load(cls, path: str | os.PathLike, layers: Sequence[str] | None = None, *,
           allow_empty: bool = False) -> "BitConfig":
    """Reads JSON: an explicit mapping, or a rule list (then ``layers`` is required).

    The same as :func:`load_bits_file`; without ``layers`` the layer names are not checked.
    """
    return load_bits_file(path, layers, allow_empty=allow_empty)


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
  compiled = []
  for i, r in enumerate(rules):
    if not isinstance(r, Mapping):
      raise BitsError(f"rule {i} is {_show(r)}, not a mapping like "
                      "{'pattern': 'stage1_.*', 'w': 4, 'a': 8}")
    if "pattern" not in r:
      raise BitsError(f"rule {i} {_show(dict(r))} has no 'pattern'")
    unknown = sorted(set(r) - {"pattern", "w", "a"})
    if unknown:
      raise BitsError(f"rule {i} {_show(dict(r))} has unknown keys {unknown}; use 'pattern', "
                      "'w', 'a'")
    p = r["pattern"]
    if not isinstance(p, str) or not p:
      raise BitsError(f"rule {i} has pattern {_show(p)}; a pattern is a non-empty regex "
                      "string such as 'stage1_.*'")
    try:
      compiled.append(re.compile(p))
    except (re.error, RecursionError, OverflowError) as e:
      raise BitsError(f"rule {i} has pattern {p!r}, which is not a valid regex ({e})") from None
  for layer in layers:
    for i, (rx, r) in enumerate(zip(compiled, rules)):
      if rx.fullmatch(layer):
        out[layer] = {k: _as_int(r.get(k)) for k in ("w", "a")}
        used[i] = True
        break
  cfg = BitConfig(out)
  unmatched = [r["pattern"] for r, u in zip(rules, used) if not u]
  problems = []
  if unmatched and not allow_unmatched_rules:
    problems.append(f"rules matching no layer: {unmatched}")
  problems += _bit_problems(cfg)
  if problems:
    raise BitsError("invalid bit rules: " + "; ".join(problems)
                    + f". Valid layers: {_layer_list(layers)}")
  return cfg


def _bit_problems(cfg: BitConfig) -> list[str]:
  bad = {k: v for k, v in cfg.to_dict().items() if not (_bits_ok(v["w"]) and _bits_ok(v["a"]))}
  if bad:
    shown = dict(list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return [f"bits out of range [{MIN_BITS}, {MAX_BITS}] (or not integers): {shown}{more}"]
  return []


def _show(v, n: int = 60) -> str:
  s = repr(v)
  return s if len(s) <= n else s[:n - 3] + "..."


def _layer_list(layers: Sequence[str], limit: int = 40) -> str:
  layers = list(layers)
  if len(layers) <= limit:
    return str(layers)
  return str(layers[:limit])[:-1] + f", ... ({len(layers)} in all)]"


def validate(config, valid_layers: Iterable[str]) -> BitConfig:
  """Checks a configuration against a model's layers; returns it as a ``BitConfig``.

  Raises BitsError (a ValueError) listing unknown layer paths and out-of-range bits, with
  the valid paths.
  """
  cfg = as_bit_config(config)
  valid = [normalize_path(l) for l in valid_layers]
  vs = set(valid)
  problems = []
  unknown = [l for l in cfg.layers if l not in vs]
  if unknown:
    close = difflib.get_close_matches(unknown[0], valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r} for {unknown[0]!r}?)" if close else ""
    problems.append(f"unknown layer paths {unknown[:10]}"
                    + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "") + hint)
  problems += _bit_problems(cfg)
  if problems:
    raise BitsError("invalid bit configuration: " + "; ".join(problems)
                    + f". Valid layer paths: {_layer_list(valid)}")
  return cfg


# ----------------------------------------------------------------------------- bits files

class _Literal:
  """A JSON number Python cannot hold as a finite float (``NaN``, ``1e400``), kept as its
  text so that the error shows what the file says."""

  def __init__(self, text: str):
    self.text = text

  def __repr__(self) -> str:
    return self.text


def _parse_float(text: str):
  v = float(text)
  return v if math.isfinite(v) else _Literal(text)


def _no_duplicates(pairs):
  seen = {}
  for k, v in pairs:
    if k in seen:
      raise _Duplicate(k)
    seen[k] = v
  return seen


class _Duplicate(ValueError):
  pass


_FORMS = ("a mapping {\"layer\": {\"w\": 4, \"a\": 8}, ...} or a list of rules "
          "[{\"pattern\": \"stage1_.*\", \"w\": 4, \"a\": 8}, ...]")


def _kind(v) -> str:
  if v is None:
    return "null"
  if isinstance(v, bool):
    return "boolean"
  if isinstance(v, (int, float, _Literal)):
    return "number"
  return {str: "string", list: "list", dict: "mapping"}.get(type(v), type(v).__name__)


def _json_type(v) -> str:
  if isinstance(v, list):
    return "a list of " + " and ".join(sorted({_kind(x) + "s" for x in v}))
  if isinstance(v, (bool, int, float, str, _Literal)):
    return f"the {_kind(v)} {_show(v) if not isinstance(v, bool) else str(v).lower()}"
  return _kind(v)


def _width_problem(v) -> str | None:
  if v is None:
    return None
  if isinstance(v, bool):
    return f"{str(v).lower()} is a boolean, not a width"
  if isinstance(v, str):
    return f"{v!r} is text, not a number"
  if isinstance(v, _Literal):
    return f"{v.text} is not a finite number"
  if isinstance(v, float) and not v.is_integer():
    return f"{v!r} is not a whole number"
  if isinstance(v, (int, float)):
    return None if MIN_BITS <= v <= MAX_BITS else f"{v!r} is outside {MIN_BITS}..{MAX_BITS}"
  return f"{_show(v)} is not a width"


def _entry_problem(v) -> str | None:
  if isinstance(v, Mapping):
    unknown = sorted(set(v) - {"w", "a"})
    if unknown:
      return f"unknown keys {unknown} (use 'w' for weight bits, 'a' for activation bits)"
    for k in ("w", "a"):
      why = _width_problem(v.get(k))
      if why:
        return f"'{k}': {why}"
    return None
  if isinstance(v, list):
    return f"{_show(v)} is a list; give {{'w': bits, 'a': bits}} or a width"
  why = _width_problem(v)
  return f"'w': {why}" if why else None


def parse_bits(data, valid_layers: Sequence[str] | None = None, *,
               source: str = "bit configuration", allow_empty: bool = False) -> BitConfig:
  """A ``BitConfig`` from parsed JSON (either form), checked; see :func:`load_bits_file`.

  ``source`` names where ``data`` came from in error messages.
  """
  valid = None if valid_layers is None else [normalize_path(l) for l in valid_layers]
  tail = f". Valid layers: {_layer_list(valid)}" if valid is not None else ""

  def fail(why: str) -> BitsError:
    return BitsError(f"{source}: {why}{tail}")

  if isinstance(data, Mapping) and "config" in data and "method" in data:
    data = data["config"]  # a search record: {"method": ..., "config": {...}, ...}
  if isinstance(data, Mapping):
    if not data and not allow_empty:
      raise fail("the mapping is empty, so it would quantize nothing; name at least one "
                 "layer, e.g. {\"%s\": {\"w\": 4, \"a\": 8}}" % (valid[0] if valid else "layer"))
    for layer, v in data.items():
      why = _entry_problem(v)
      if why:
        raise fail(f"layer {layer!r}: {why}; widths are whole numbers in {MIN_BITS}..{MAX_BITS} "
                   "or null (float)")
    try:
      cfg = BitConfig(data)
      if valid is not None:
        validate(cfg, valid)
    except BitsError as e:
      raise BitsError(f"{source}: {e}") from None
  elif isinstance(data, list) and data and all(isinstance(r, Mapping) for r in data):
    if valid is None:
      raise BitsError(f"{source} holds rules; pass the model's layer list to resolve them")
    for i, r in enumerate(data):
      for k in ("w", "a"):
        why = _width_problem(r.get(k))
        if why:
          raise fail(f"rule {i} ({_show(r.get('pattern'))}) '{k}': {why}; widths are whole "
                     f"numbers in {MIN_BITS}..{MAX_BITS} or null (float)")
    try:
      cfg = resolve_rules(data, valid)
    except BitsError as e:
      raise BitsError(f"{source}: {e}") from None
  elif isinstance(data, list) and not data:
    if allow_empty:
      return BitConfig({})
    raise fail("the rule list is empty, so it would quantize nothing; give " + _FORMS)
  else:
    raise fail(f"holds {_json_type(data)}; expected {_FORMS}")
  if not allow_empty and not any(v["w"] is not None or v["a"] is not None
                                 for v in cfg.to_dict().values()):
    raise fail("every layer is null (float), so it would quantize nothing; give widths")
  return cfg


def load_bits_file(path: str | os.PathLike, valid_layers: Sequence[str] | None, *,
                   allow_empty: bool = False) -> BitConfig:
  """Reads a bits file (either JSON form of the module docstring) and checks it.

  Args:
    path: the JSON file (``search/bits.json`` records ``{"method", "config", ...}`` too).
    valid_layers: the model's layer paths (kernel paths accepted); None skips the layer
      check (rule lists then cannot be resolved).
    allow_empty: accept a configuration that quantizes nothing (``{}``, ``[]``, all null).

  Returns:
    The :class:`BitConfig`.

  Raises:
    BitsError: the file is missing, unreadable, not JSON, of the wrong shape, empty, or
      names unknown layers / invalid widths / invalid regexes; the message names the file,
      the culprit and the valid layers.
  """
  name = os.fspath(path)
  source = f"bits file {name}"
  try:
    with open(name, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise BitsError(f"{source} does not exist; run amq-jax search first or pass --bits FILE "
                    "(a JSON bit configuration)") from None
  except IsADirectoryError:
    raise BitsError(f"{source} is a directory; pass a JSON file to --bits") from None
  except OSError as e:
    raise BitsError(f"{source} cannot be read ({e.strerror})") from None
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise BitsError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start}); write it as "
                    "JSON") from None
  try:
    data = json.loads(text, parse_float=_parse_float, parse_constant=_Literal,
                      object_pairs_hook=_no_duplicates)
  except _Duplicate as e:
    raise BitsError(f"{source} names layer {e.args[0]!r} twice; keep one entry") from None
  except json.JSONDecodeError as e:
    raise BitsError(f"{source} is not valid JSON ({e.msg} at line {e.lineno} column "
                    f"{e.colno}); fix it, or write it again with amq-jax search") from None
  except (ValueError, RecursionError) as e:
    raise BitsError(f"{source} is not valid JSON ({_show(str(e), 80)}); fix it, or write it "
                    "again with amq-jax search") from None
  return parse_bits(data, valid_layers, source=source, allow_empty=allow_empty)
