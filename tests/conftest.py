"""Test setup: 8 simulated CPU devices (sharding tests take subsets; the default mesh is one),
a compilation cache for the session, x64 off, fixed seeds."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling, and many tests compile the same programs (the
# tiny configs' training, evaluation and HVP steps, run again by each pipeline fixture, CLI
# test, subprocess and notebook). A compilation cache for this session (env vars: inherited
# by subprocesses and notebook kernels) compiles each once: what runs is the same executable
# XLA would build again; tracing and lowering still happen every time. Set
# JAX_COMPILATION_CACHE_DIR yourself to keep a cache between sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="amq-jax-test-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# And XLA:CPU compiles at LLVM -O0: half the compile time, for kernels up to ~1.5x slower,
# a trade the suite's tiny models and few steps win (its few evaluation-heavy tests lose). Same HLO and XLA passes, no
# fast-math either way: results agree with -O2 to float32 rounding (a ResNet20 gradient:
# 98.5% of entries bit-equal, the rest within 1.5e-8). Set xla_backend_optimization_level
# in XLA_FLAGS yourself to test at another level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Must run before any backend is initialized.
jax.config.update("jax_num_cpu_devices", 8)
# Start the backend now, so that the command line's one-device-per-core setting
# (amq_jax/_hostdev.py), called by in-process CLI tests, finds it started and leaves the 8.
assert len(jax.devices()) == 8
# The default mesh (every mesh=None: CLI runs, pipelines, training, estimators) is ONE
# device, as on a CPU host with the shipped host_devices=1; the tests of sharded behaviour
# build their meshes over the 8 explicitly. Compiling the same programs for an 8-way split
# on 2 cores cost time and shared no compiled programs with the one-device tests.
from amq_jax import _sharding  # noqa: E402

_sharding.set_default_devices(1)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from amq_jax.data import fashion_mnist  # noqa: E402


@pytest.fixture(scope="session")
def fmnist_slice():
  """A small real slice of Fashion-MNIST: (train 2048, test 512)."""
  train = fashion_mnist.load("train", limit=2048)
  test = fashion_mnist.load("test", limit=512)
  return train, test


@pytest.fixture
def rng():
  return np.random.default_rng(0)
