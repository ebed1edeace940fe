"""Orbax checkpoints of a training state, written atomically, with resume."""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints of a pytree state under ``directory``.

  Saves are synchronous and atomic (Orbax writes a temporary directory and renames it), so
  a process killed mid-save leaves the previous checkpoint intact.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any) -> None:
    self._mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    self._mngr.wait_until_finished()

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores into the structure, dtypes and shardings of ``target``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self):
    self._mngr.close()
