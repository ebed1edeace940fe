"""Regression tests for the audit of issue 10: each failed before its fix.

* Lanczos returned the distinct eigenvalues of a Dense layer under MSE (whose Hessian
  ``X^T X / N (x) I`` repeats each one ``d_out`` times) and said ``converged=True``.
* 1-bit symmetric quantization mapped an all-zero channel to +1.0.
* HAWQ-V1 Omega could be negative with ``top1_method='power'`` (largest MAGNITUDE).
* Power iteration stopped on a small change of the Rayleigh quotient while the error was
  many times ``tol``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from amq_jax import alloc, hessian, quant

Q = {"mesh": Mesh(np.asarray(jax.devices()[:1]), ("data",)), "progress": False}


def _dense_mse(din=24, dout=4, n=64):
  """A Dense kernel under 0.5 * mean_n ||x_n W||^2: Hessian = (X^T X / N) (x) I_dout."""
  x = jax.random.normal(jax.random.key(0), (n, din)) / jnp.sqrt(1.0 + jnp.arange(din))

  def loss_fn(params, batch):
    return 0.5 * jnp.mean(jnp.sum((batch["x"] @ params["d"]["kernel"]) ** 2, -1))

  A = np.asarray(x.T @ x / n, np.float64)
  exact = np.sort(np.linalg.eigvalsh(np.kron(A, np.eye(dout))))[::-1]
  return loss_fn, {"d": {"kernel": jnp.zeros((din, dout))}}, {"x": x}, exact


@pytest.mark.parametrize("k", [3, 6])
def test_lanczos_finds_repeated_eigenvalues(k):
  loss_fn, params, batch, exact = _dense_mse()
  assert np.isclose(exact[0], exact[3])  # multiplicity d_out = 4
  r = hessian.top_eigenvalues(loss_fn, params, batch, key=jax.random.key(0), k=k, tol=1e-4,
                              layer="d/kernel", **Q)
  assert r.converged
  np.testing.assert_allclose(r.values, exact[:k], rtol=1e-4)
  assert r.iterations < 96  # found well before exhausting the 96-dimensional space


def test_lanczos_unconverged_is_reported():
  loss_fn, params, batch, _ = _dense_mse()
  r = hessian.top_eigenvalues(loss_fn, params, batch, key=jax.random.key(0), k=6, tol=1e-4,
                              max_iters=8, **Q)
  assert not r.converged and r.iterations == 8


def test_one_bit_all_zero_channel_stays_zero():
  w = jnp.stack([jnp.zeros(4), jnp.array([1.0, -2.0, 3.0, -4.0])], -1)
  for out in (quant.dequantize(quant.quantize(w, 1, axis=-1)), quant.fake_quant(w, 1, axis=-1)):
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_allclose(out[:, 1], [2.5, -2.5, 2.5, -2.5])
  assert float(quant.quant_error(w, 1, axis=-1)) == pytest.approx(5.0)  # zero channel: 0
  z = jnp.zeros((3, 2))
  np.testing.assert_array_equal(quant.fake_quant(z, 1), 0.0)


def _quadratic(eigs, seed=0):
  n = len(eigs)
  Qm, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  A = jnp.asarray((Qm * np.asarray(eigs)) @ Qm.T, jnp.float32)

  def loss_fn(params, batch):
    w = params["q"]["kernel"].reshape(-1)
    return 0.5 * w @ (batch["A"][0] @ w)

  return loss_fn, {"q": {"kernel": jnp.zeros((n, 1))}}, {"A": A[None]}


def test_hawq_v1_never_negative_with_power_iteration():
  # A block whose largest-MAGNITUDE eigenvalue is negative: -2 vs a top of +1.
  loss_fn, params, batch = _quadratic(np.concatenate([[-2.0], np.linspace(1.0, 0.1, 29)]))
  r = hessian.top_eigenvalues(loss_fn, params, batch, key=jax.random.key(0), k=1,
                              method="power", tol=1e-4, max_iters=3000, **Q)
  assert r.converged and r.values[0] == pytest.approx(1.0, rel=1e-3)
  lm = hessian.top_eigenvalues(loss_fn, params, batch, key=jax.random.key(0), k=1,
                               method="power", which="LM", tol=1e-4, max_iters=3000, **Q)
  assert lm.values[0] == pytest.approx(-2.0, rel=1e-3)  # PyHessian's meaning, on request
  kern = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((3, 4)) * 0.3}}
  _, _, om = alloc.omega_table(kern, ["a", "b"], (2, 4), method="hawq_v1",
                               top_eigs={"a": float(lm.values[0]), "b": 1.0})
  assert np.all(om >= 0) and np.all(om[0] == 0)


def test_power_iteration_stops_on_the_residual():
  """lambda_1 = 1 and lambda_2 = 0.97: the Rayleigh quotient creeps, so a small change per
  step says nothing; the residual test guarantees the error bound it reports."""
  loss_fn, params, batch = _quadratic(np.concatenate([[1.0, 0.97], np.linspace(0.5, 0.01, 38)]))
  for tol in (1e-3, 1e-4):
    r = hessian.top_eigenvalues(loss_fn, params, batch, key=jax.random.key(0), k=1,
                                method="power", tol=tol, max_iters=5000, **Q)
    assert r.converged and r.residuals[0] <= tol
    assert abs(r.values[0] - 1.0) <= tol, (tol, r.values[0])
