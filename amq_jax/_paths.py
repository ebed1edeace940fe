"""Parameter-tree paths: the names by which layers are addressed everywhere.

A path is the '/'-joined sequence of dict keys leading to a leaf of a params pytree,
e.g. ``'stage1_block1/conv1/kernel'``. Quantizable layers are the Conv and Dense kernels:
leaves named ``kernel`` with at least two dimensions.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax

__all__ = ["flatten", "unflatten", "quantizable_paths", "layer_of", "select", "merge"]


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree: Any) -> dict[str, Any]:
  """Returns ``{path: leaf}`` in the tree's canonical leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_str(k) for k in kp): v for kp, v in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten` for nested-dict trees."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    parts = path.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def quantizable_paths(params: Any) -> list[str]:
  """Paths of every Conv/Dense kernel (leaf named 'kernel', ndim >= 2), in tree order."""
  return [p for p, v in flatten(params).items()
          if p.rsplit("/", 1)[-1] == "kernel" and getattr(v, "ndim", 0) >= 2]


def layer_of(path: str) -> str:
  """Module path of a parameter path: 'a/conv1/kernel' -> 'a/conv1'."""
  return path.rsplit("/", 1)[0] if "/" in path else path


def select(tree: Any, paths: Iterable[str]) -> dict[str, Any]:
  """``{path: leaf}`` for the given paths; unknown paths raise with the valid ones listed."""
  flat = flatten(tree)
  paths = list(paths)
  missing = [p for p in paths if p not in flat]
  if missing:
    raise KeyError(f"unknown parameter path(s) {missing}; valid paths are: {sorted(flat)}")
  return {p: flat[p] for p in paths}


def merge(tree: Any, updates: Mapping[str, Any]) -> Any:
  """Returns ``tree`` with the leaves at ``updates``' paths replaced (structure kept)."""
  flat = flatten(tree)
  unknown = [p for p in updates if p not in flat]
  if unknown:
    raise KeyError(f"unknown parameter path(s) {unknown}")
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = list(flat)
  new = [updates.get(k, leaf) for k, leaf in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


def map_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """tree_map with the '/'-joined path as first argument."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, v: fn("/".join(_key_str(k) for k in kp), v), tree)
