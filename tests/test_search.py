"""The search's Python entry point, ``pipeline.auto_bits``, on a model of any framework. The
budget grammar, the baselines and their brute-force tests live with the code in
``amq_jax.alloc`` (tests/test_alloc_budget.py)."""
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import adapters, alloc
from amq_jax.errors import BudgetError
from amq_jax.pipeline import auto_bits


def _model():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
  return adapters.from_apply(lambda p, x: jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"],
                             params, jnp.zeros((1, 8)))


def test_auto_bits_from_python():
  model = _model()
  bits, info = auto_bits(model, {"a/kernel": 10.0, "b/kernel": 0.01}, budget="avg:6")
  # The sensitive layer gets more bits.
  assert bits["a"]["w"] > bits["b"]["w"] and info["avg_bits"] <= 6 + 1e-9
  assert info["size_mb"] == alloc.model_size_mb(model.params, bits.to_dict(),
                                                layers=model.layers)
  with pytest.raises(BudgetError, match="feasible"):
    auto_bits(model, {"a": 1.0, "b": 1.0}, budget="avg:99")
