"""The one home of file writes and read-backs.

Writes are atomic (a temporary file in the same directory, then ``os.replace``): a run
killed at any moment leaves either the old file or the new one, never half a file.
Read-backs name the file and say how to recover when it is damaged
(:class:`amq_jax.errors.StateError`).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np

from amq_jax.errors import StateError

__all__ = ["write_bytes", "write_text", "write_json", "read_json", "read_bytes", "to_jsonable"]


def to_jsonable(o: Any) -> Any:
  """``json.dump``'s ``default``: arrays and NumPy/JAX scalars become lists and numbers."""
  if hasattr(o, "tolist"):
    return o.tolist()
  if isinstance(o, (np.integer,)):
    return int(o)
  try:
    return float(o)
  except (TypeError, ValueError):
    return str(o)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _umask()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (parent directories are created)."""
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    # mkstemp makes owner-only files; give the file the mode a plain open() would.
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """JSON with 2-space indent; NaN/Inf are written as JSON ``null``-free strings by
  ``json`` defaults (``NaN``), which :func:`read_json` reads back."""
  write_text(path, json.dumps(obj, indent=2, default=to_jsonable) + "\n")


def _recover_hint(path: str, what: str | None) -> str:
  what = what or "the stage that wrote it"
  return (f"delete {path} and re-run the command; {what} will be recomputed "
          "(nothing else is lost)")


def read_bytes(path: str | os.PathLike, *, what: str | None = None) -> bytes:
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise
  except OSError as e:
    raise StateError(f"cannot read {path}: {e.strerror}; {_recover_hint(path, what)}") from None


def read_json(path: str | os.PathLike, *, what: str | None = None,
              check: Callable[[Any], str | None] | None = None) -> Any:
  """Reads JSON written by :func:`write_json`.

  Args:
    what: the stage or command that makes the file, named in the recovery advice.
    check: optional ``check(obj) -> problem or None`` (e.g. a missing key).

  Raises:
    FileNotFoundError: the file does not exist (callers decide whether that is an error).
    StateError: the file is not valid JSON or fails ``check``; the message names the file.
  """
  path = os.fspath(path)
  raw = read_bytes(path, what=what)
  try:
    obj = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise StateError(f"{path} is damaged (not valid JSON: {e}); "
                     f"{_recover_hint(path, what)}") from None
  if check is not None:
    problem = check(obj)
    if problem:
      raise StateError(f"{path} is damaged or from another version ({problem}); "
                       f"{_recover_hint(path, what)}")
  return obj
