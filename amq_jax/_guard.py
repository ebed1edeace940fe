"""Guards of the work directory: one process at a time, and names that stay inside it.

* :func:`workdir_lock` is held by every stage that writes into a work directory. A second
  process gets :class:`~amq_jax.errors.WorkdirError` naming the process that holds it (pid,
  host, command, since when) instead of racing on the same checkpoints. The lock is an OS
  advisory lock (``flock``) on ``WORKDIR/.amq-jax.lock``: the kernel drops it when the holder
  exits in any way (``kill -9`` included), so the lock of a dead process is simply taken
  over; the file only carries who holds it, for the message. Within one process the lock is
  re-entrant (``run`` holds it while calling ``analyze``, which takes it again).
* :func:`safe_name` checks a user-given name (``--name``) that becomes a file or folder name
  under the work directory: no absolute paths, no ``..``, no separators.
* :func:`check_workdir` fails early, with the fix, on a work directory that is a file or
  cannot be written.

>>> with workdir_lock('runs/default'):
...   ...  # write stage files
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import socket
import sys
import tempfile
import threading
from typing import Iterator

from amq_jax.errors import WorkdirError

__all__ = ["workdir_lock", "lock_holder", "safe_name", "check_workdir", "LOCK_FILE"]

LOCK_FILE = ".amq-jax.lock"

# realpath of a locked work directory -> [fd, depth] for the locks this process holds.
_held: dict[str, list] = {}
_held_guard = threading.Lock()

_NAME = re.compile(r"[A-Za-z0-9_+=@,-][A-Za-z0-9_.+=@,-]*")


def safe_name(name, what: str = "--name") -> str:
  """Returns ``name`` if it is a plain file name that stays inside its folder.

  Allowed: letters, digits and ``_ . + = @ , -``, not starting with ``.``; at most 100
  characters. Rejected (with :class:`WorkdirError`): empty names, absolute paths, ``..``,
  path separators, anything else.

  >>> safe_name('hawq_v2-4bit')
  'hawq_v2-4bit'
  """
  if not isinstance(name, str):
    raise WorkdirError(f"{what} must be text, got {type(name).__name__} {name!r}")
  why = None
  if not name:
    why = "it is empty"
  elif os.path.isabs(name) or name.startswith(("/", "\\", "~")):
    why = "it is an absolute path"
  elif name in (".", "..") or ".." in re.split(r"[/\\]", name):
    why = "it leads out of its folder ('..')"
  elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
    why = "it contains a path separator"
  elif len(name) > 100:
    why = f"it is {len(name)} characters long (at most 100)"
  elif not _NAME.fullmatch(name):
    why = ("it may only hold letters, digits and _ . + = @ , - and may not start with '.'")
  if why:
    raise WorkdirError(f"{what} {name!r} is not a valid name: {why}; use a plain name such "
                       f"as 'hawq_v2_4bit' (it becomes a folder inside the work directory)")
  return name


def _nearest_existing(path: str) -> str:
  p = os.path.abspath(path)
  while not os.path.lexists(p):
    parent = os.path.dirname(p)
    if parent == p:
      break
    p = parent
  return p


def _writable(directory: str) -> str | None:
  """None if a file can be created in ``directory``, else the reason (tried for real, so
  read-only mounts and ACLs count, not just the mode bits)."""
  try:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".amq-jax-write-test-")
  except OSError as e:
    return e.strerror or str(e)
  os.close(fd)
  os.unlink(tmp)
  return None


def check_workdir(root) -> str:
  """Checks that ``root`` is, or can become, a writable directory; returns it.

  Nothing is created. Raises :class:`WorkdirError` when ``root`` (or a folder on its way) is
  a file, or when the directory (or the nearest existing folder above it) is not writable.
  """
  if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
    raise WorkdirError(f"--workdir {root!r} is not a path; give a directory, e.g. runs/default")
  root = os.fspath(root)
  if os.path.exists(root) and not os.path.isdir(root):
    raise WorkdirError(f"--workdir {root} is a file, not a directory; give a directory path "
                       "(it is created if missing)")
  base = _nearest_existing(root)
  if not os.path.isdir(base):
    raise WorkdirError(f"--workdir {root} cannot be created: {base} is a file; give a path "
                       "whose parent folders are directories")
  problem = _writable(base)
  if problem:
    where = root if base == os.path.abspath(root) else f"{base} (parent of {root})"
    raise WorkdirError(f"--workdir {root} is not writable: cannot create files in {where} "
                       f"({problem}); fix the permissions or choose another --workdir")
  return root


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (OSError, ValueError, TypeError):
    return True  # exists but not ours, or unknown: assume alive
  return True


def _describe(info: dict) -> str:
  parts = [f"process {info.get('pid', '?')}"]
  if info.get("host") and info.get("host") != socket.gethostname():
    parts.append(f"on host {info['host']}")
  elif info.get("pid") is not None and not _alive(info["pid"]):
    parts.append("(no longer running; a child process it started still holds the lock)")
  if info.get("command"):
    parts.append(f"running {info['command']!r}")
  if info.get("since"):
    parts.append(f"since {info['since']}")
  return " ".join(parts)


def lock_holder(root) -> dict | None:
  """Who holds (or last held) the lock of ``root``: ``{'pid', 'host', 'command', 'since'}``,
  or None if no lock file has content."""
  try:
    with open(os.path.join(os.fspath(root), LOCK_FILE), "rb") as f:
      raw = f.read()
    return json.loads(raw.decode()) if raw.strip() else None
  except (OSError, ValueError, UnicodeDecodeError):
    return None


def _command() -> str:
  cmd = " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])
  return cmd if len(cmd) <= 200 else cmd[:197] + "..."


@contextlib.contextmanager
def workdir_lock(root) -> Iterator[str]:
  """Holds the work directory ``root`` for this process; creates it if missing.

  Yields ``root``. Re-entrant within a process. A second process gets
  :class:`WorkdirError` at once (no waiting) naming the holder; a lock left by a process
  that has died is taken over (the OS released it).
  """
  import fcntl  # POSIX; imported here so that importing this module works everywhere

  root = check_workdir(root)
  os.makedirs(root, exist_ok=True)
  key = os.path.realpath(root)
  with _held_guard:
    if key in _held:
      _held[key][1] += 1
      reentered = True
    else:
      reentered = False
  if reentered:
    try:
      yield root
    finally:
      with _held_guard:
        _held[key][1] -= 1
    return

  path = os.path.join(root, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"cannot create the lock file {path} ({e.strerror}); fix the "
                       "permissions of the work directory or choose another --workdir") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirError(f"cannot lock the work directory {root} ({e.strerror}); the file "
                         "system may not support locks: choose a local --workdir") from None
    info = lock_holder(root) or {}
    raise WorkdirError(
        f"work directory {root} is in use by {_describe(info)}; wait for it to finish or "
        f"stop it (kill {info.get('pid', 'PID')}), or choose another --workdir") from None
  # The lock file keeps one inode for its whole life (never replaced or deleted), so it is
  # written in place rather than through amq_jax._io's atomic replace.
  info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
          "since": datetime.datetime.now().isoformat(timespec="seconds")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
  with _held_guard:
    _held[key] = [fd, 1]
  try:
    yield root
  finally:
    with _held_guard:
      del _held[key]
    try:
      os.ftruncate(fd, 0)
    except OSError:
      pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
