"""The search stage's Python entry point. The budget grammar, the baselines and their brute-force
tests moved with the code to ``amq_jax.alloc`` (tests/test_alloc_budget.py)."""
import numpy as np

from amq_jax import alloc
from amq_jax.pipeline import auto_bits


def test_auto_bits_from_python():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": rng.normal(size=(8, 8)).astype(np.float32)},
            "b": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}}
  bits, info = auto_bits(params, {"a/kernel": 10.0, "b/kernel": 0.01}, budget="avg:6")
  # The sensitive layer gets more bits.
  assert bits["a"]["w"] > bits["b"]["w"] and info["avg_bits"] <= 6 + 1e-9
  assert info["size_mb"] == alloc.model_size_mb(params, bits.to_dict())
