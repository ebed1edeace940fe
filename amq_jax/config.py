"""Loading Python config files (``get_config()`` -> ConfigDict), overrides and validation.

A config is checked once, where it enters: :func:`load_config` loads the file, applies the
``field=value`` overrides of the command line and validates every known field against
:data:`SCHEMA` (types, ranges, choices, regexes that compile). Anything wrong raises one
:class:`~amq_jax.errors.ConfigError` naming the field, the value, the valid range and the
fix, e.g.::

  config field batch_size = -5 is invalid: must be an integer >= 1
  (fix: --config.batch_size=128, or edit configs/resnet20_fmnist.py)

The schema is keyed by field path. Optimization fields (``batch_size``, ``learning_rate``,
...) are checked wherever they appear: at the top level, under ``train.`` and under
``finetune.``. Fields the schema does not know (a model's own keyword arguments, a new
task's settings) are left alone; fields the schema knows but a config lacks are skipped.
Python callers that build a ConfigDict themselves call :func:`validate_config`.

>>> cfg = load_config('configs/resnet20_fmnist.py:tiny', ['finetune.batch_size=32'])
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import ml_collections

from amq_jax.errors import ConfigError

__all__ = ["load_config", "apply_overrides", "validate_config", "ConfigError", "SCHEMA",
           "BATCH_SIZE_FIELDS"]


# ----------------------------------------------------------------------------- the schema

class Rule(NamedTuple):
  """How one field is checked: ``check(value)`` (truthy: valid; False or a string saying
  what is wrong: invalid), the valid range in words, and an example of a valid value (used
  in the suggested fix)."""
  check: Callable[[Any], bool]
  valid: str
  example: str


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int = None, hi: int = None, *, none=False, example="1") -> Rule:
  words = ("an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
           + (f" in {lo}..{hi}" if lo is not None and hi is not None else "")
           + (" or None" if none else ""))
  return Rule(lambda v: (v is None and none) or (
      _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)), words, example)


def _num(lo: float = None, hi: float = None, *, lo_open=False, hi_open=False,
         none=False, example="0.1") -> Rule:
  if lo is not None and hi is not None:
    words = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  elif lo is not None:
    words = f"a finite number {'>' if lo_open else '>='} {lo:g}"
  else:
    words = "a finite number"
  words += " or None" if none else ""

  def check(v):
    if v is None:
      return none
    if not _is_num(v):
      return False
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  return Rule(check, words, example)


def _choice(*choices, none=False) -> Rule:
  words = "one of " + ", ".join(repr(c) for c in choices) + (" or None" if none else "")
  return Rule(lambda v: (v is None and none) or (isinstance(v, str) and v in choices),
              words, repr(choices[0]))


def _bool() -> Rule:
  return Rule(lambda v: isinstance(v, bool), "True or False", "True")


def _text(*, none=False, empty=False, example="'name'") -> Rule:
  return Rule(lambda v: (v is None and none) or (isinstance(v, str) and (empty or bool(v.strip()))),
              "text" + ("" if empty else " (not empty)") + (" or None" if none else ""), example)


def _ints(lo: int, *, min_len=1, example="(28, 28, 1)") -> Rule:
  return Rule(lambda v: isinstance(v, (tuple, list)) and len(v) >= min_len
              and all(_is_int(x) and x >= lo for x in v),
              f"a tuple of integers >= {lo}" + (f" (at least {min_len})" if min_len else ""),
              example)


def _texts(*, example="('stage1_block1/conv1',)") -> Rule:
  return Rule(lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) and x for x in v),
              "a tuple of non-empty strings", example)


MIN_BITS, MAX_BITS = 1, 16  # as amq_jax.quant (not imported: it pulls in JAX)
QWIX_BITS = range(2, 9)  # as amq_jax.quant._math: qwix's int2..int8


def _bit_choices() -> Rule:
  return Rule(lambda v: isinstance(v, (tuple, list)) and len(v) >= 1
              and all(_is_int(b) and MIN_BITS <= b <= MAX_BITS for b in v)
              and len(set(v)) == len(v),
              f"a non-empty tuple of distinct integers in {MIN_BITS}..{MAX_BITS}", "(2, 3, 4, 8)")


def _pin() -> Rule:
  return Rule(lambda v: v is None or (_is_int(v) and (v == 0 or MIN_BITS <= v <= MAX_BITS)),
              f"0 or None (no pin), or a width in {MIN_BITS}..{MAX_BITS} among the bit choices",
              "8")


def _regex_problem(p) -> str | None:
  if not isinstance(p, str) or not p:
    return f"{p!r} is not a non-empty string"
  try:
    re.compile(p)
  except re.error as e:
    return f"regex {p!r} does not compile ({e})"
  return None


def _tie_problem(v) -> str | None:
  """What is wrong with a ``search.tie`` value (None if nothing)."""
  if not isinstance(v, (tuple, list)):
    return f"it is a {type(v).__name__}, not a tuple of groups"
  for g in v:
    if not isinstance(g, (tuple, list)) or not g:
      return (f"group {g!r} is not a non-empty tuple of layer patterns (write one group as "
              "(('pattern1', 'pattern2'),))")
    for p in g:
      why = _regex_problem(p)
      if why:
        return why
  return None


def _tie() -> Rule:
  return Rule(lambda v: _tie_problem(v) is None,
              "a tuple of groups, each a tuple of layer regexes that compile (the layers of "
              "one group share their bits)", "(('stage1_block1/conv2', 'stage1_block2/conv2'),)")


def _budget() -> Rule:
  def check(v):
    if not isinstance(v, str) or not v.strip():
      return False
    try:
      from amq_jax.alloc import parse_budget
    except ImportError:  # the budget grammar is not importable: only reject the empty text
      return True
    try:
      parse_budget(v)
    except ValueError as e:
      return str(e).split(". Valid forms")[0]
    return True
  return Rule(check, "a budget such as '0.08MB', 'avg:3', 'uniform:3', 'bits:2.5M' or "
              "'bops:1.2G'", "'uniform:3'")


# Fields of the training loops, checked at the top level and under 'train.' and 'finetune.'.
_OPTIM = {
    "optimizer": _choice("sgd", "adam"),
    "learning_rate": _num(0, lo_open=True, example="0.01"),
    "momentum": _num(0, 1, hi_open=True, example="0.9"),
    "weight_decay": _num(0, example="1e-4"),
    "warmup_steps": _int(0, example="0"),
    "final_lr_fraction": _num(0, 1, example="0.0"),
    "clip_grad_norm": _num(0, none=True, example="1.0"),
    "batch_size": _int(1, example="128"),
    "eval_batch_size": _int(1, example="1000"),
    "num_epochs": _num(0, lo_open=True, none=True, example="1"),  # None: num_steps is set
    "num_steps": _int(1, none=True, example="100"),
    "augment": _bool(),
    "checkpoint_every_steps": _int(1, example="200"),
    "log_every_steps": _int(1, example="50"),
    "calib_examples": _int(1, example="512"),
    "calib_method": _choice("minmax", "percentile"),
    "seed": _int(0, example="0"),
    "seeds": _ints(0, example="(0, 1, 2)"),
}

SCHEMA: dict[str, Rule] = {
    "model": _text(example="'resnet20'"),
    "model_kwargs.num_classes": _int(1, example="10"),
    "input_shape": _ints(1),
    "dataset": _text(example="'fashion_mnist'"),
    "data_dir": _text(none=True, example="'/usr/share/datasets/fashion-mnist'"),
    "train_limit": _int(1, none=True, example="512"),
    "test_limit": _int(1, none=True, example="256"),
    "pretrained": _text(none=True, empty=True, example="''"),
    "progress": _bool(),
    "host_devices": Rule(lambda v: v == "auto" or (_is_int(v) and v >= 1) or (
        isinstance(v, str) and v.strip().isdigit() and int(v) >= 1),
        "'auto' or an integer >= 1 (CPU devices to split batches over)", "auto"),
    "baselines": _choice("default", "all"),
    "num_random": _int(0, example="3"),
    "image_size": _int(1, example="224"),
    "worker_count": _int(0, example="0"),
    "preprocess": _choice("imagenet", "cifar", none=True),
    "train_split": _text(example="'train'"),
    "eval_split": _text(example="'validation'"),
    # detection data and heads
    "canvas": _int(8, example="96"),
    "channels": _int(1, example="1"),
    "max_gt": _int(1, example="8"),
    "max_objects": _int(1, example="4"),
    "train_images": _int(1, example="4096"),
    "test_images": _int(1, example="512"),
    "flip": _bool(),
    "anchor_scale": _num(0, lo_open=True, example="3.0"),
    "loss.alpha": _num(0, 1, example="0.25"),
    "loss.gamma": _num(0, example="2.0"),
    "loss.beta": _num(0, lo_open=True, example="0.1"),
    "loss.box_loss": _choice("smooth_l1", "giou"),
    "loss.box_weight": _num(0, example="1.0"),
    "eval.score_threshold": _num(0, 1, example="0.05"),
    "eval.pre_nms_topk": _int(1, example="300"),
    "eval.iou_threshold": _num(0, 1, lo_open=True, example="0.5"),
    "eval.max_detections": _int(1, example="20"),
    # stage 'analyze'
    "hessian.num_examples": _int(1, example="256"),
    "hessian.batch_size": _int(1, example="128"),
    "hessian.estimator": _choice("per_layer", "joint", "adaptive", "hutchpp"),
    "hessian.curvature": _choice("hessian", "ggn", "fisher"),
    "hessian.compare": _choice("hessian", "ggn", "fisher", none=True),
    "hessian.ggn_method": _choice("auto", "exact", "sampled"),
    "hessian.compare_max_probes": _int(1, none=True, example="12"),
    "hessian.confidence": _num(0, 1, lo_open=True, hi_open=True, example="0.6827"),
    "hessian.rtol": _num(0, 1, lo_open=True, hi_open=True, example="0.1"),
    "hessian.min_probes": _int(1, example="4"),
    "hessian.max_probes": _int(1, example="12"),
    "hessian.seed": _int(0, example="0"),
    "hessian.eig_batches": _int(1, example="1"),
    "hessian.eig_tol": _num(0, lo_open=True, example="1e-3"),
    "hessian.top1_method": _choice("lanczos", "power"),
    "hessian.top1_iters": _int(1, example="10"),
    "hessian.eig_k": _int(1, example="20"),
    "hessian.spectrum_iters": _int(1, example="60"),
    "hessian.eig_layers": _texts(),
    "hessian.act_examples": _int(1, example="32"),
    "hessian.act_probes": _int(1, example="8"),
    "hessian.calib_examples": _int(1, example="256"),
    # stage 'search'
    "search.bit_choices": _bit_choices(),
    "search.act_bit_choices": _bit_choices(),
    "search.budget": _budget(),
    "search.act_budget": _budget(),
    "search.pin_first_last": _pin(),
    "search.act_pin_first_last": _pin(),
    "search.symmetric": _bool(),
    "search.act_bits": _int(MIN_BITS, MAX_BITS, none=True, example="8"),
    "search.tie": _tie(),
    # the deployed integer format, read by search, fine-tuning and export alike
    "quant.grid": _choice("amq", "qwix"),
}
for _prefix in ("", "train.", "finetune."):
  for _k, _r in _OPTIM.items():
    SCHEMA.setdefault(_prefix + _k, _r)

# Fields whose lowering reduces memory, for the out-of-memory advice of the command line.
BATCH_SIZE_FIELDS = ("batch_size", "eval_batch_size", "train.batch_size",
                     "train.eval_batch_size", "finetune.batch_size", "finetune.eval_batch_size",
                     "hessian.batch_size")


# ----------------------------------------------------------------------------- validation

def _leaves(node, prefix=""):
  for k in node.keys():
    v = node[k]
    path = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      yield from _leaves(v, path + ".")
    else:
      yield path, v


def _get(cfg, path: str, default=None):
  node = cfg
  for p in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or p not in node:
      return default
    node = node[p]
  return node


def _show(v) -> str:
  s = repr(v)
  return s if len(s) <= 80 else s[:77] + "..."


def _field_problem(path: str, value, rule: Rule, source: str | None, why=None) -> str:
  where = f", or edit {source}" if source else ""
  why = f"{why}; " if isinstance(why, str) and why else ""
  return (f"config field {path} = {_show(value)} is invalid: {why}must be {rule.valid} "
          f"(fix: --config.{path}={rule.example}{where})")


def _cross_problems(cfg, source) -> list[str]:
  where = f", or edit {source}" if source else ""
  out = []
  lo, hi = _get(cfg, "hessian.min_probes"), _get(cfg, "hessian.max_probes")
  if _is_int(lo) and _is_int(hi) and hi < lo:
    out.append(f"config field hessian.max_probes = {hi} is smaller than hessian.min_probes = "
               f"{lo}: must be >= min_probes (fix: --config.hessian.max_probes={lo}{where})")
  cur, other = _get(cfg, "hessian.curvature", "hessian"), _get(cfg, "hessian.compare")
  if other is not None and other == cur:
    rest = [c for c in ("hessian", "ggn", "fisher") if c != cur]
    out.append(f"config field hessian.compare = {other!r} is the curvature already measured "
               f"(hessian.curvature = {cur!r}): must be another one, {rest[0]!r} or "
               f"{rest[1]!r}, or None for no comparison (fix: --config.hessian.compare="
               f"{rest[0]}{where})")
  for sec in ("", "train.", "finetune."):
    keys = (sec + "num_epochs", sec + "num_steps")
    node = _get(cfg, sec[:-1]) if sec else cfg
    if (isinstance(node, (ml_collections.ConfigDict, Mapping)) and all(
        k.split(".")[-1] in node for k in keys) and all(_get(cfg, k) is None for k in keys)):
      out.append(f"config fields {keys[0]} and {keys[1]} are both None: set one "
                 f"(fix: --config.{keys[0]}=1{where})")
  for pin, choices in (("search.pin_first_last", "search.bit_choices"),
                       ("search.act_pin_first_last", "search.act_bit_choices")):
    p, c = _get(cfg, pin), _get(cfg, choices)
    if _is_int(p) and p and isinstance(c, (tuple, list)) and c and p not in c:
      out.append(f"config field {pin} = {p} is not one of {choices} {tuple(c)}: pin a width "
                 f"among them, or 0 to leave the first and last layer free "
                 f"(fix: --config.{pin}={max(c)}{where})")
  out += _qwix_grid_problems(cfg, where)
  return out


def _qwix_grid_problems(cfg, where: str) -> list[str]:
  """quant.grid='qwix' has integer types int2..int8 only, and asymmetric weights at 4 and 8
  bits only: name each width field that asks for another (before any work is done)."""
  if _get(cfg, "quant.grid") != "qwix":
    return []
  out = []
  asym = _get(cfg, "search.symmetric") is False
  for f in ("search.bit_choices", "search.act_bit_choices", "search.pin_first_last",
            "search.act_pin_first_last", "search.act_bits"):
    v = _get(cfg, f)
    widths = v if isinstance(v, (tuple, list)) else ([v] if _is_int(v) and v else [])
    ok = (4, 8) if asym and f in ("search.bit_choices", "search.pin_first_last") else QWIX_BITS
    bad = [b for b in widths if _is_int(b) and b not in ok]
    if bad:
      good = tuple(b for b in widths if b in ok) or (tuple(ok)[-1],)
      fix = good if isinstance(v, (tuple, list)) else good[-1]
      why = ("asymmetric weights (search.symmetric=False) exist at 4 and 8 bits only"
             if ok == (4, 8) else "qwix quantizes to int2..int8 only")
      out.append(f"config field {f} = {_show(v)} has widths {bad} that quant.grid='qwix' "
                 f"cannot hold: {why} (fix: --config.{f}={repr(fix).replace(' ', '')}, or "
                 f"--config.quant.grid=amq{where})")
  return out


def validate_config(cfg, *, source: str | None = None) -> ml_collections.ConfigDict:
  """Checks every field of ``cfg`` that :data:`SCHEMA` knows; returns ``cfg``.

  Args:
    cfg: a ConfigDict (or mapping) as ``get_config()`` returns it.
    source: the config file, named in the suggested fix.

  Raises:
    ConfigError: one error (one line) naming every invalid field, its value, the valid
      range and an override that fixes it.
  """
  where = f", or edit {source}" if source else ""
  problems = []
  for path, value in _leaves(cfg):
    rule = SCHEMA.get(path)
    ok = True if rule is None else rule.check(value)
    if ok and not isinstance(ok, str):
      continue
    if path == "search.tie":
      problems.append(f"config field search.tie = {_show(value)} is invalid: "
                      f"{_tie_problem(value)} (fix: --config.search.tie={rule.example}{where})")
    else:
      problems.append(_field_problem(path, value, rule, source, ok))
  problems += _cross_problems(cfg, source)
  if problems:
    raise ConfigError("; ".join(problems))
  return cfg


# ----------------------------------------------------------------------------- loading

def _load_module(path: str):
  try:
    with open(path, "rb") as f:
      source = f.read()
  except OSError as e:
    raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
  try:
    code = compile(source, path, "exec")
  except SyntaxError as e:
    raise ConfigError(f"config file {path} has a syntax error at line {e.lineno}: {e.msg}; "
                      "fix the file (it must be Python defining get_config())") from None
  except ValueError as e:  # e.g. null bytes
    raise ConfigError(f"config file {path} is not a Python source file ({e})") from None
  spec = importlib.util.spec_from_file_location(f"amq_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    exec(code, module.__dict__)
  except Exception as e:  # noqa: BLE001 - any failure of a user's file is a config error
    raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: "
                      f"{_first_line(e)}; fix the file") from None
  return module


def _first_line(e: BaseException) -> str:
  s = str(e).strip().splitlines()
  return s[0] if s else type(e).__name__


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``path.py`` or ``path.py:variant``, applies ``field=value`` overrides, validates.

  Args:
    spec: the config file, optionally followed by ``:VARIANT`` (passed to ``get_config``).
    overrides: ``'a.b=value'`` strings (values are Python literals or bare strings).

  Raises:
    ConfigError: the file is missing, not a ``.py`` file, does not compile, fails in
      ``get_config``, or a field is unknown or invalid (see :func:`validate_config`).

  >>> cfg = load_config('configs/resnet20_fmnist.py:tiny', ['num_epochs=1'])
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ConfigError(f"--config {spec!r} is empty; give a config file, e.g. "
                      "--config configs/resnet20_fmnist.py")
  path, _, variant = spec.partition(":")
  if not path.endswith(".py"):
    raise ConfigError(f"--config {path!r} is not a Python config file (.py); configs live "
                      "in configs/, e.g. --config configs/resnet20_fmnist.py")
  if os.path.isdir(path):
    raise ConfigError(f"config file {path!r} is a directory; give a .py file, e.g. "
                      "--config configs/resnet20_fmnist.py")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; configs live in configs/, "
                      "e.g. --config configs/resnet20_fmnist.py")
  module = _load_module(path)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config file {path} defines no get_config() function")
  call = f"get_config({variant!r})" if variant else "get_config()"
  try:
    cfg = get_config(variant) if variant else get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - the user's get_config failed
    raise ConfigError(f"{call} of config file {path} raised {type(e).__name__}: "
                      f"{_first_line(e)}") from None
  if isinstance(cfg, Mapping) and not isinstance(cfg, ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(cfg)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{call} of config file {path} returned a {type(cfg).__name__}; it "
                      "must return an ml_collections.ConfigDict")
  apply_overrides(cfg, overrides)
  return validate_config(cfg, source=path)


# ----------------------------------------------------------------------------- overrides

_TRUE = {"true": True, "yes": True, "on": True, "1": True,
         "false": False, "no": False, "off": False, "0": False}


def _parse(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _coerce(value, raw: str, ftype):
  """The override ``raw`` (parsed to ``value``) as the field's type where that is clear."""
  if ftype is float:
    if _is_int(value):
      return float(value)
    if isinstance(value, str):
      try:
        return float(raw)  # 'nan', 'inf': validation reports them with the valid range
      except ValueError:
        return value
  if ftype is int and isinstance(value, float) and math.isfinite(value) and value == int(value):
    return int(value)
  if ftype is bool and isinstance(value, (str, int)) and str(value).lower() in _TRUE:
    return _TRUE[str(value).lower()]
  if ftype is str and value is not None and not isinstance(value, str):
    return raw
  if ftype is tuple:
    if isinstance(value, (list, tuple)):
      return _tuples(value)
    if value is not None:
      return (value,)
  return value


def _all_paths(cfg, prefix=""):
  for k in cfg.keys():
    v = cfg[k]
    yield prefix + k
    if isinstance(v, ml_collections.ConfigDict):
      yield from _all_paths(v, prefix + k + ".")


def _unknown(cfg, key: str, node, parents) -> ConfigError:
  leaf = key.split(".")[-1]
  paths = list(_all_paths(cfg))
  same_leaf = [p for p in paths if p.split(".")[-1] == leaf]
  close = same_leaf or difflib.get_close_matches(key, paths, n=3, cutoff=0.75)
  hint = f"; did you mean {' or '.join('--config.' + p for p in close)}?" if close else ""
  where = ".".join(parents) or "the config"
  return ConfigError(f"unknown config field {key!r}{hint} (fields of {where}: "
                     f"{sorted(node.keys())})")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ``a.b=value`` strings; values are Python literals or bare strings.

  The value is converted to the field's type where that is unambiguous (``2`` for a float
  field, ``1e3`` for an int field, ``true``/``false`` for a bool, ``4`` for a tuple of
  widths); anything else that does not fit raises :class:`ConfigError`.
  """
  for item in overrides:
    key, eq, raw = str(item).partition("=")
    if not eq or not key:
      raise ConfigError(f"override --config.{item} must look like --config.FIELD=VALUE")
    *parents, leaf = key.split(".")
    node = cfg
    for i, p in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"config field {'.'.join(parents[:i])} is a value, not a section; "
                          f"--config.{key} cannot be set")
      if p not in node:
        raise _unknown(cfg, key, node, parents[:i])
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"config field {'.'.join(parents)} is a value, not a section; "
                        f"--config.{key} cannot be set")
    if leaf not in node:
      raise _unknown(cfg, key, node, parents)
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
      raise ConfigError(f"config field {key} is a section; override one of its fields, e.g. "
                        f"--config.{key}.{sorted(old.keys())[0]}=VALUE")
    try:
      ftype = node.get_type(leaf)
    except (AttributeError, KeyError, TypeError):
      ftype = type(old)
    value = _coerce(_parse(raw), raw, ftype)
    try:
      node[leaf] = value
    except (TypeError, ValueError):
      rule = SCHEMA.get(key)
      want = rule.valid if rule else f"a {getattr(ftype, '__name__', ftype)}"
      example = rule.example if rule else repr(old)
      raise ConfigError(f"config field {key} = {_show(value)} has the wrong type: must be {want} "
                        f"(fix: --config.{key}={example})") from None
