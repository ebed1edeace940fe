"""One optimization section (``config.train`` / ``config.finetune``), read, checked and turned
into an optax optimizer.

A section is any mapping (a ``ConfigDict``, a dict) with the fields of :data:`OPTIM_FIELDS`;
missing fields take :data:`OPTIM_DEFAULTS`, and every value is checked where it enters: a
bad one raises :class:`amq_jax.errors.ConfigError` naming the full field
(``field_prefix + '.' + name``), the value, the valid range and the fix.

The learning rate follows a linear warm-up from 0 over ``warmup_steps`` to
``learning_rate``, then a cosine decay to ``learning_rate * final_lr_fraction`` at the last
step:

    lr(t) = lr * t / W                                                  t < W
    lr(t) = lr * (f + (1 - f) * (1 + cos(pi * (t - W) / (T - W))) / 2)  W <= t <= T

The update is ``clip_by_global_norm(clip_grad_norm)`` (when set) -> decoupled weight decay on
kernels only (leaves with ndim > 1; BatchNorm scales and biases are left alone) -> SGD with
Nesterov momentum, or Adam.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import optax

from amq_jax.errors import ConfigError

__all__ = ["OPTIM_FIELDS", "OPTIM_DEFAULTS", "read_section", "num_train_steps",
           "make_optimizer", "lr_schedule"]

#: Defaults of an optimization section's fields (also the list of them, in order).
OPTIM_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",            # 'sgd' (Nesterov momentum) or 'adam'
    "learning_rate": 0.1,          # peak learning rate (after warm-up)
    "momentum": 0.9,               # SGD momentum (ignored by adam)
    "weight_decay": 0.0,           # decoupled, on kernels only
    "warmup_steps": 0,             # linear warm-up from 0
    "final_lr_fraction": 0.0,      # cosine decay ends at learning_rate * this
    "clip_grad_norm": None,        # global-norm gradient clipping; 0/None = off
    "batch_size": 128,             # global batch (all devices, all processes)
    "num_epochs": None,            # length in epochs ...
    "num_steps": None,             # ... or in steps (wins when set)
    "augment": False,              # the data source's training augmentation
    "checkpoint_every_steps": 200,  # Orbax checkpoint period (and at every epoch end)
    "log_every_steps": 50,         # metrics.jsonl period (one host sync each)
    "eval_batch_size": 1000,       # batch of the evaluation after training
}
OPTIM_FIELDS = tuple(OPTIM_DEFAULTS)


def _get(section, name):
  if isinstance(section, Mapping) or hasattr(section, "get"):
    v = section.get(name, None)
  else:
    v = getattr(section, name, None)
  return OPTIM_DEFAULTS[name] if v is None and name not in ("num_epochs", "num_steps",
                                                            "clip_grad_norm") else v


def read_section(section, *, field_prefix: str = "train") -> dict:
  """The checked optimization fields of ``section`` as a plain dict (defaults filled in).

  Raises:
    ConfigError: a field out of range; the message says e.g.
      ``train.batch_size=-5 must be a positive integer; set --config.train.batch_size=128``.
  """
  s = {k: _get(section, k) for k in OPTIM_FIELDS}
  pre = f"{field_prefix}." if field_prefix else ""

  def bad(name, rule, fix):
    raise ConfigError(f"{pre}{name}={s[name]!r} {rule}; set --config.{pre}{name}={fix}")

  def number(name):
    v = s[name]
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

  def count(name, minimum):
    v = s[name]
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

  if s["optimizer"] not in ("sgd", "adam"):
    bad("optimizer", "is not an optimizer; use 'sgd' (Nesterov momentum) or 'adam'", "sgd")
  if not number("learning_rate") or s["learning_rate"] <= 0:
    bad("learning_rate", "must be a finite number > 0", 0.1)
  if not number("momentum") or not 0 <= s["momentum"] < 1:
    bad("momentum", "must be in [0, 1)", 0.9)
  if not number("weight_decay") or s["weight_decay"] < 0:
    bad("weight_decay", "must be a finite number >= 0", 0.0)
  if not count("warmup_steps", 0):
    bad("warmup_steps", "must be an integer >= 0", 0)
  if not number("final_lr_fraction") or not 0 <= s["final_lr_fraction"] <= 1:
    bad("final_lr_fraction", "must be in [0, 1]", 0.0)
  if s["clip_grad_norm"] is not None and (not number("clip_grad_norm")
                                          or s["clip_grad_norm"] < 0):
    bad("clip_grad_norm", "must be a number >= 0 (0 or None: no clipping)", 1.0)
  for name in ("batch_size", "checkpoint_every_steps", "log_every_steps", "eval_batch_size"):
    if not count(name, 1):
      bad(name, "must be a positive integer", OPTIM_DEFAULTS[name])
  if s["num_steps"] is not None and not count("num_steps", 1):
    bad("num_steps", "must be a positive integer (or None to train for num_epochs)", 100)
  if s["num_steps"] is None:
    if s["num_epochs"] is None:
      raise ConfigError(f"neither {pre}num_epochs nor {pre}num_steps is set; set one, e.g. "
                        f"--config.{pre}num_epochs=1")
    if not number("num_epochs") or s["num_epochs"] <= 0:
      bad("num_epochs", "must be a number > 0 (or set num_steps)", 1)
  if not isinstance(s["augment"], bool):
    bad("augment", "must be True or False", True)
  s["clip_grad_norm"] = float(s["clip_grad_norm"] or 0.0)
  return s


def num_train_steps(section: Mapping, steps_per_epoch: int) -> int:
  """Length of training in steps: ``num_steps`` when set, else ``round(num_epochs * S)``
  (at least 1). ``section`` is a :func:`read_section` dict."""
  if section["num_steps"] is not None:
    return int(section["num_steps"])
  return max(1, int(round(section["num_epochs"] * steps_per_epoch)))


def lr_schedule(section: Mapping, total_steps: int) -> optax.Schedule:
  """Linear warm-up then cosine decay to ``learning_rate * final_lr_fraction``."""
  lr, warmup = section["learning_rate"], int(section["warmup_steps"])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(int(total_steps), warmup + 1),
      end_value=lr * section["final_lr_fraction"])


def _kernels(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(section, total_steps: int, *,
                   field_prefix: str = "train") -> optax.GradientTransformation:
  """The optimizer of an optimization section, for ``total_steps`` steps.

  Args:
    section: ``config.train``, ``config.finetune`` or any mapping of :data:`OPTIM_FIELDS`.
    total_steps: length of the cosine schedule.
    field_prefix: how the section is spelled in error messages.

  Example:
    >>> tx = make_optimizer({'optimizer': 'adam', 'learning_rate': 1e-3,
    ...                      'clip_grad_norm': 1.0, 'num_steps': 100}, 100)
  """
  if hasattr(section, "get") and hasattr(section.get("train", None), "get"):
    section = _legacy_section(section)  # COMPAT: a whole config with top-level fields
  s = read_section(section, field_prefix=field_prefix)
  schedule = lr_schedule(s, total_steps)
  if s["optimizer"] == "sgd":
    opt = optax.sgd(schedule, momentum=s["momentum"], nesterov=True)
  else:
    opt = optax.adam(schedule)
  parts = []
  if s["clip_grad_norm"]:
    parts.append(optax.clip_by_global_norm(s["clip_grad_norm"]))
  if s["weight_decay"]:
    parts.append(optax.add_decayed_weights(s["weight_decay"], mask=_kernels))
  return optax.chain(*parts, opt) if parts else opt


def _legacy_section(config) -> dict:
  """COMPAT (remove when pipeline/ and detection/_pipeline.py pass sections): the section a
  whole config stood for before the ``train`` section existed, i.e. ``config.train`` with
  any optimization field the caller set at the top level taking precedence."""
  sec = dict(config.get("train", None) or {})
  for k in OPTIM_FIELDS:
    if k in config and not hasattr(config[k], "keys"):
      sec[k] = config[k]
  return sec
