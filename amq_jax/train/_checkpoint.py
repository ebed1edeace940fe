"""Orbax checkpoints of a training state: atomic saves, resume, fallback past damaged steps.

A save is synchronous and atomic (Orbax writes a temporary directory and renames it), so a
process killed mid-save leaves the previous checkpoint intact. Restoring takes the newest
step; if its files are damaged (disk full, a copy cut short) it warns and takes the one
before. A checkpoint of a DIFFERENT state (another model, another optimizer) is never
silently half-restored: it is a :class:`amq_jax.errors.StateError` that names the
directory and says to delete it.
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from amq_jax.errors import StateError

__all__ = ["Checkpointer", "CheckpointFallbackWarning"]


class CheckpointFallbackWarning(UserWarning):
  """The newest checkpoint step could not be read; an older one was restored."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{path: shape}`` of every array leaf; paths spelled the same for dataclasses, dicts
  and the plain dicts of Orbax metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_name(k) for k in path): tuple(getattr(x, "shape", np.shape(x)))
          for path, x in leaves}


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints of a pytree state under ``directory``."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False,
            cleanup_tmp_directories=True))

  def __repr__(self):
    return f"Checkpointer({self.directory!r}, steps={self.all_steps()})"

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any) -> None:
    self._mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    self._mngr.wait_until_finished()

  def _check_compatible(self, step: int, target: Any) -> None:
    """Raises StateError if step ``step`` holds another state than ``target``'s; returns
    quietly when it matches, and lets read errors of damaged metadata through."""
    meta = self._mngr.item_metadata(step)
    stored = _shapes(getattr(meta, "tree", meta))
    wanted = _shapes(target)
    if stored == wanted:
      return
    first = lambda p: (p[:1] != ("params",), p)  # noqa: E731 - name a layer if one differs
    missing = sorted(set(wanted) - set(stored), key=first)
    extra = sorted(set(stored) - set(wanted), key=first)
    differ = sorted((p for p in set(wanted) & set(stored) if wanted[p] != stored[p]), key=first)
    if differ:
      p = differ[0]
      what = f"'{'/'.join(p)}' has shape {stored[p]} there but {wanted[p]} here"
    elif missing:
      what = f"it lacks '{'/'.join(missing[0])}'"
    else:
      what = f"it has an unexpected '{'/'.join(extra[0])}'"
    raise StateError(
        f"{self.directory} holds a checkpoint of another model or optimizer (step {step}: "
        f"{what}); delete {self.directory} to train this one from the start")

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores into the structure, dtypes and shardings of ``target``.

    Without ``step``: the newest readable step; damaged newer steps are skipped with a
    :class:`CheckpointFallbackWarning`.

    Raises:
      FileNotFoundError: no checkpoint at all.
      StateError: the checkpoint belongs to another state (shapes or structure differ), or
        every step is damaged; the message names the directory and says to delete it.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    problems = []
    for s in steps:
      try:
        self._check_compatible(s, target)
        out = self._mngr.restore(s, args=ocp.args.StandardRestore(abstract))
      except StateError:
        raise
      except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
        problems.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        continue
      if problems:
        bad = [t for t in steps if t > s]
        for t in bad:  # unreadable, and in the way of the steps about to be saved again
          self._remove(t)
        warnings.warn(
            f"checkpoint {os.path.join(self.directory, str(steps[0]))} is damaged "
            f"({problems[0]}); removed step(s) {bad} and resumed from step {s} instead",
            CheckpointFallbackWarning, stacklevel=2)
      return out
    raise StateError(
        f"no readable checkpoint in {self.directory} ({'; '.join(problems)}); delete "
        f"{self.directory} to start this training over")

  def _remove(self, step: int) -> None:
    try:
      self._mngr.delete(step)
    except Exception:  # noqa: BLE001 - damaged metadata can stop Orbax's own delete
      if jax.process_index() == 0:
        shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)
    self._mngr.reload()

  def close(self):
    self._mngr.close()
