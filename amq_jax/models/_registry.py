"""Model registry: name -> factory returning a Flax Linen module."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {}


def register(name: str, *, input_shape: tuple[int, int, int]):
  """Decorator: registers ``factory(**kwargs) -> nn.Module`` under ``name``.

  ``input_shape`` is the default (H, W, C) of one example, used to initialize.
  """
  def deco(factory):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = factory
    _INPUT_SHAPES[name] = tuple(input_shape)
    return factory
  return deco


def get_model(name: str, **kwargs) -> nn.Module:
  """Builds the registered model ``name`` (e.g. ``'resnet20'``) with ``kwargs``."""
  if name not in _REGISTRY:
    raise KeyError(f"unknown model {name!r}; registered models: {sorted(_REGISTRY)}")
  return _REGISTRY[name](**kwargs)


def default_input_shape(name: str) -> tuple[int, int, int]:
  if name not in _INPUT_SHAPES:
    raise KeyError(f"unknown model {name!r}; registered models: {sorted(_REGISTRY)}")
  return _INPUT_SHAPES[name]


def list_models() -> list[str]:
  return sorted(_REGISTRY)
