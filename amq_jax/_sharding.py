"""The one home of data-parallel placement: a 1-D mesh, replicated state, sharded batches.

Training, evaluation and the Hessian estimators all run under ``jax.jit`` with

* the batch split along its leading (example) axis over every device of a 1-D mesh,
  ``NamedSharding(mesh, P('data'))``;
* parameters, optimizer state, probes and results replicated, ``NamedSharding(mesh, P())``.

XLA (GSPMD) inserts the all-reduces that turn per-device partial sums of a batch-mean loss
into the global mean, so the same code serves 1 device, N devices and N hosts. With several
processes (after ``jax.distributed.initialize()``) each process passes ITS OWN contiguous
slice of the global batch (see :func:`shard_batch` and :func:`process_slice`).

>>> mesh = data_mesh()                                   # every device of every process
>>> state = replicate(state, mesh)
>>> batch = shard_batch(process_slice(global_batch), mesh)

The default mesh (``data_mesh()``, ``default_mesh()``, and every ``mesh=None`` of training,
evaluation and the estimators) takes every device. :func:`set_default_devices` narrows it to
the first ``n`` devices of one process, while explicit meshes still reach all of them; the
test suite uses it to run the product's default of ONE CPU device (``host_devices=1``) with
8 simulated devices kept for the tests that shard on purpose:

>>> set_default_devices(1)        # data_mesh() -> 1 device; data_mesh(jax.devices()[:4]) -> 4
>>> set_default_devices(None)     # back to every device

Several CPU devices (``host_devices``, or simulated ones in tests) need one more rule, kept
by :func:`serial_on_cpu`: jaxlib's XLA:CPU deadlocks when multi-device programs with a
cross-device collective are dispatched faster than they run, so that several wait in its
queue (a device thread blocks in an all-reduce rendezvous that another device's share,
queued behind a different program, never reaches; XLA aborts the process after 40 s:
"Expected 2 threads to join the rendezvous, but only 1 of them arrived"). Seen with jaxlib
0.10.2 on 2 and 8 CPU devices, for independent programs and for chains (each step taking
the last one's output) alike, and never when each call is waited for
(``tests/test_cpu_collectives.py``). Every multi-device program the package runs more than
once (training and QAT steps, HVPs and probes, evaluation, prediction) goes through it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA_AXIS", "data_mesh", "default_mesh", "set_default_devices", "replicated",
           "batch_sharding", "replicate", "shard_batch", "process_slice", "to_host",
           "as_batch_list", "batch_size", "serial_on_cpu"]

DATA_AXIS = "data"
_default_count: int | None = None  # set by set_default_devices; None: every device


def set_default_devices(count: int | None) -> None:
  """Makes the default mesh the first ``count`` devices of ``jax.devices()`` (None: all).

  Process-wide; meshes passed explicitly are not affected. Single-process only: with several
  processes a default mesh must span every process's devices (checked when one is built).

  Raises:
    ValueError: ``count`` is not None or an integer >= 1.
  """
  global _default_count
  if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                            or count < 1):
    raise ValueError(f"set_default_devices(count={count!r}): give an integer >= 1, or None "
                     "for every device")
  _default_count = count


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices of all
  processes, in ``jax.devices()`` order, or the first few: :func:`set_default_devices`).

  Raises:
    ValueError: the default device count exceeds the devices there are, or is set with
      several processes.
  """
  if devices is not None:
    return Mesh(np.asarray(list(devices)), (DATA_AXIS,))
  devs = jax.devices()
  n = _default_count
  if n is not None and n != len(devs):
    if n > len(devs) or jax.process_count() > 1:
      raise ValueError(
          f"set_default_devices({n}) cannot be met: {len(devs)} devices over "
          f"{jax.process_count()} process(es); a narrowed default mesh needs one process "
          "with at least that many devices (fix: set_default_devices(None), or pass mesh=)")
    devs = devs[:n]
  return Mesh(np.asarray(devs), (DATA_AXIS,))


def default_mesh() -> Mesh:
  """:func:`data_mesh` over the default devices (the name the Hessian estimators use)."""
  return data_mesh()


def _batch_spec(mesh: Mesh) -> P:
  # The example axis is split over all mesh axes, whatever the user named them.
  return P(tuple(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of a value held whole on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: leading axis split over every axis of ``mesh``."""
  return NamedSharding(mesh, _batch_spec(mesh))


def as_batch_list(batches: Any) -> list:
  """A batch or an iterable of batches -> list of batches.

  One batch is a Mapping (``{'image': ..., 'label': ...}``), a tuple, or an array; any
  other iterable (list, generator) is a sequence of batches.
  """
  if isinstance(batches, (Mapping, tuple)) or hasattr(batches, "shape"):
    return [batches]
  if isinstance(batches, Iterable):
    out = list(batches)
    if not out:
      raise ValueError("`batches` is empty: give one batch or a non-empty list of batches")
    return out
  raise TypeError(f"`batches` must be a batch pytree or an iterable of them, got {type(batches)}")


def batch_size(batch: Any) -> int:
  """Leading dimension shared by every leaf of ``batch`` (error if they differ)."""
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("a batch has no array leaves")
  sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(f"every leaf of a batch needs the same leading (batch) dimension; "
                     f"got leading sizes {sorted(sizes)}")
  return sizes.pop()


def process_slice(batch: Any) -> Any:
  """This process's contiguous share of a GLOBAL host batch (the batch itself on one process).

  For data that every process reads whole and in the same order (in-memory sets): process
  ``i`` of ``n`` keeps rows ``[i * B/n, (i+1) * B/n)``, which is the slice
  :func:`shard_batch` expects from it.

  Raises:
    ValueError: the batch size is not a multiple of the process count.
  """
  n = jax.process_count()
  if n == 1:
    return batch
  size = batch_size(batch)
  if size % n:
    raise ValueError(f"batch size {size} is not divisible by the {n} processes; use a "
                     f"multiple of the device count")
  i, k = jax.process_index(), size // n
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[i * k:(i + 1) * k], batch)


def shard_batch(batch: Any, mesh: Mesh | None = None, *, index: int | None = None) -> Any:
  """Places ``batch`` on ``mesh`` split along its leading axis.

  Single process: the leaves are the whole batch. Several processes: NumPy (or
  process-local) leaves are THIS process's contiguous slice of the global batch, assembled
  with ``jax.make_array_from_process_local_data``; leaves that already are global
  ``jax.Array`` s are kept (re-sharded if needed).

  Args:
    index: the batch's position in a list, named in the error message.

  Raises:
    ValueError: the global batch size is not a multiple of the device count.
  """
  mesh = default_mesh() if mesh is None else mesh
  sharding = batch_sharding(mesh)
  where = "" if index is None else f" (batch {index})"
  n_dev = mesh.devices.size
  multi = jax.process_count() > 1

  def place(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      size = x.shape[0]
      local = None
    else:
      local = np.asarray(x) if not isinstance(x, jax.Array) else x
      size = local.shape[0] * (jax.process_count() if multi else 1)
    if size % n_dev:
      raise ValueError(
          f"batch size {size}{where} is not divisible by the {n_dev} devices of the mesh; "
          f"use a batch size that is a multiple of {n_dev} (or a smaller mesh)")
    if local is None:
      return x if x.sharding == sharding else jax.device_put(x, sharding)
    if multi:
      return jax.make_array_from_process_local_data(sharding, np.asarray(local))
    return jax.device_put(local, sharding)

  batch_size(batch)
  return jax.tree_util.tree_map(place, batch)


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
  """Copies every leaf of ``tree`` to every device of ``mesh`` (identical on each process)."""
  mesh = default_mesh() if mesh is None else mesh
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def place(x):
    # device_put cannot move a process-local jax.Array onto other hosts' devices; a NumPy
    # copy (identical on every process) can be placed.
    if isinstance(x, jax.Array) and x.is_fully_addressable:
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = place(jax.random.key_data(x))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
      x = np.asarray(x)
    return jax.device_put(x, sharding)
  return jax.tree_util.tree_map(place, tree)


def to_host(x: Any) -> Any:
  """Fetches (replicated) device values to NumPy, also when they span several processes."""
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if not a.is_fully_replicated:
        raise ValueError("cannot fetch a value that is sharded across processes")
      return np.asarray(a.addressable_data(0))
    return np.asarray(a)
  return jax.tree_util.tree_map(get, x)


def _on_several_cpu_devices(tree: Any) -> bool:
  for x in jax.tree_util.tree_leaves(tree):
    if isinstance(x, jax.Array):
      devices = x.sharding.device_set
      return len(devices) > 1 and next(iter(devices)).platform == "cpu"
  return False


def serial_on_cpu(fn: Callable) -> Callable:
  """``fn`` (a jitted function) that waits for its result when that result lies on several
  CPU devices; unchanged elsewhere (one device, GPU, TPU keep dispatching asynchronously).

  For programs with collectives that a caller dispatches one after another: XLA:CPU can
  deadlock when several wait in its queue (module docstring). The wait costs the overlap
  of Python with the device, nothing else. ``lower``, ``trace`` and
  ``_cache_size`` of the jitted function stay reachable.
  """
  @functools.wraps(fn)
  def call(*args, **kwargs):
    out = fn(*args, **kwargs)
    if _on_several_cpu_devices(out):
      jax.block_until_ready(out)
    return out
  for name in ("lower", "trace", "eval_shape", "_cache_size", "clear_cache"):
    if hasattr(fn, name):
      setattr(call, name, getattr(fn, name))
  return call
