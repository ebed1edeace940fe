"""Test setup: 8 simulated CPU devices (sharding tests take subsets), x64 off, fixed seeds."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Must run before any backend is initialized.
jax.config.update("jax_num_cpu_devices", 8)
# Start the backend now, so that the command line's one-device-per-core setting
# (amq_jax/_hostdev.py), called by in-process CLI tests, finds it started and leaves the 8.
assert len(jax.devices()) == 8

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
