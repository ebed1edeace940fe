"""One XLA device per CPU core on a CPU-only host: data parallelism over the cores.

XLA:CPU runs a program on ONE device with a thread pool, and here gains only ~1.3x from a
second core (it runs independent operations side by side; it does not split a
convolution). Every stage of amq-jax already shards its batches over all devices
(:mod:`amq_jax._sharding`), so simulating one CPU device per core turns the second core into
data parallelism: on this project's 2-core machine a ResNet20 training/QAT step takes 0.63x
the time, a gradient 0.67x (``benchmarks/RESULTS.md``, "One host device per core").

The device count must be fixed before JAX creates its CPU backend, so the command line calls
:func:`configure` right after reading the config; in Python, call :func:`use_host_devices`
first thing (it is a no-op, with a warning, once JAX has started). Results do not depend on
the device count beyond float32 rounding (``tests/test_sharded_estimators.py``).

Config field ``host_devices``: 1 (the shipped configs' default: JAX's single CPU device),
``'auto'`` or a count >= 2. ``'auto'`` takes the cores this process may run on (at most
:data:`AUTO_MAX`), lowered until every unpadded batch size of the config divides evenly (a
batch is split into equal shares). A user's own ``--xla_force_host_platform_device_count``
in ``XLA_FLAGS`` wins. On a GPU/TPU host the extra CPU devices are created but unused (the
mesh takes the accelerators).

Several host devices once aborted long runs (Hutch++ on all 22 ResNet20 layers on 2
devices; the test suite on 8): "Termination timeout for all reduce ... Expected 2 threads
to join", jaxlib 0.10.2. The cause is XLA:CPU deadlocking when several multi-device programs
with an all-reduce wait in its queue; every program the package runs repeatedly now waits
for the last call on CPU, which avoids it (:func:`amq_jax._sharding.serial_on_cpu`,
``tests/test_cpu_collectives.py``); the default run on 2 host devices finishes with it
(``benchmarks/RESULTS.md``, session 4). Still opt-in: what the wait costs against one device
has not been timed side by side yet.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from amq_jax.errors import ConfigError

__all__ = ["AUTO_MAX", "usable_cores", "sharded_sizes", "choose", "configure",
           "use_host_devices"]

AUTO_MAX = 8  # measured at 2; beyond 8 per-device batches get small for the default configs
_XLA_FLAG = "xla_force_host_platform_device_count"


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not Linux
    return os.cpu_count() or 1


def sharded_sizes(cfg) -> list[int]:
  """The batch sizes of ``cfg`` that the pipeline splits over the devices unpadded: every
  ``*batch_size`` field but the evaluation ones (evaluation pads a batch to a multiple of
  the device count) and ``hessian.act_examples`` (activation traces shard them)."""
  from amq_jax.config import _leaves  # the config's one walker over dotted field paths
  out = []
  for path, v in _leaves(cfg):
    wanted = ((path.endswith("batch_size") and not path.endswith("eval_batch_size"))
              or path == "hessian.act_examples")
    if wanted and isinstance(v, int) and not isinstance(v, bool) and v > 0:
      out.append(v)
  return out


def _requested(cfg) -> str | int:
  v = cfg.get("host_devices", 1) if hasattr(cfg, "get") else 1
  if isinstance(v, str) and v.strip().isdigit():
    v = int(v)
  if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
    return v
  raise ConfigError(f"config field host_devices = {v!r} is invalid: 'auto' or an integer >= 1 "
                    "(fix: --config.host_devices=auto, or 1 for JAX's single CPU device)")


def choose(cfg, cores: int | None = None) -> int:
  """The device count :func:`configure` would set for ``cfg`` (module docstring)."""
  req = _requested(cfg)
  if req != "auto":
    return int(req)
  n = min(usable_cores() if cores is None else cores, AUTO_MAX)
  sizes = sharded_sizes(cfg)
  while n > 1 and any(s % n for s in sizes):
    n -= 1
  return max(n, 1)


def _backend_started() -> bool:
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def use_host_devices(n: int, *, quiet: bool = False) -> bool:
  """Asks JAX for ``n`` CPU devices; True if set. False when ``XLA_FLAGS`` already fixes the
  count, or JAX's backend already started (with a warning unless ``quiet``, when the count
  differs from ``n``)."""
  import jax
  if _XLA_FLAG in os.environ.get("XLA_FLAGS", ""):
    return False
  if _backend_started():
    have = len(jax.devices("cpu"))
    if have != n and not quiet:
      warnings.warn(f"JAX already started with {have} CPU device(s); {n} host devices take "
                    "effect only before the first JAX computation (call "
                    "amq_jax.use_host_devices first thing, or restart the kernel)",
                    stacklevel=2)
    return False
  jax.config.update("jax_num_cpu_devices", int(n))
  return True


def configure(cfg: Any) -> int | None:
  """Applies ``cfg.host_devices`` (module docstring); returns the count set, or None when
  nothing was changed (1, the user's ``XLA_FLAGS``, or JAX already started: silent for
  ``'auto'``, a warning for an explicit count >= 2)."""
  auto = _requested(cfg) == "auto"
  n = choose(cfg)
  if n <= 1:  # 1: leave JAX's own CPU device (count) alone
    return None
  return n if use_host_devices(n, quiet=auto) else None
