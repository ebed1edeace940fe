"""Loading Python config files (``get_config()`` -> ConfigDict) with command-line overrides."""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections

__all__ = ["load_config", "apply_overrides", "ConfigError"]


class ConfigError(ValueError):
  """A config file or override is wrong; the message names it and the valid choices."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``path.py`` or ``path.py:variant`` and applies ``field=value`` overrides.

  >>> cfg = load_config('configs/resnet20_fmnist.py:tiny', ['num_epochs=1'])
  """
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; configs live in configs/, "
                      "e.g. --config configs/resnet20_fmnist.py")
  modspec = importlib.util.spec_from_file_location(f"amq_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(modspec)
  modspec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config()")
  cfg = module.get_config(variant) if variant else module.get_config()
  apply_overrides(cfg, overrides)
  return cfg


def _parse(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ``a.b=value`` strings; values are Python literals or bare strings."""
  for item in overrides:
    key, eq, raw = item.partition("=")
    if not eq:
      raise ConfigError(f"override {item!r} must look like field=value")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      if p not in node:
        raise ConfigError(f"unknown config field {key!r}; fields of "
                          f"{'.'.join(parents) or 'the config'}: {sorted(node.keys())}")
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"unknown config field {key!r}; valid fields: {sorted(node.keys())}")
    value = _parse(raw)
    if isinstance(value, list):
      value = tuple(value)
    try:
      old = node[leaf]
      if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      if isinstance(old, str) and not isinstance(value, str):
        value = raw
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"bad value {raw!r} for config field {key!r}: {e}") from None
