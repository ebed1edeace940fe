"""Top Hessian eigenvalues (Lanczos or power iteration) and spectral density (SLQ).

Both methods only need ``x -> H x``. Vectors are the ravelled ``wrt`` leaves
(``jax.flatten_util.ravel_pytree``), replicated on the mesh.

* Lanczos (Lanczos 1950; Golub & Van Loan, Sec. 10.1) builds an orthonormal basis
  ``V_m`` of the Krylov space ``span{v, Hv, ..., H^{m-1} v}`` in which ``V_m^T H V_m = T_m``
  is tridiagonal; the eigenvalues of ``T_m`` (Ritz values) converge to the extreme
  eigenvalues of ``H``, the top 20 in a few dozen HVPs. Basis vectors are
  re-orthogonalized against all previous ones (twice: "twice is enough") so that float32
  rounding does not produce spurious copies; the bound on Ritz pair ``i``'s residual is
  ``|beta_m s_{m,i}|``. When the space becomes invariant (``beta ~ 0``, e.g. a repeated
  eigenvalue) the iteration restarts from a fresh random vector orthogonal to the basis,
  so multiplicities are found too. Memory: ``(max_iters + 1) x n`` floats.
* Power iteration with deflation (HAWQ-V1; PyHessian): ``v <- (H - sum_p l_p u_p u_p^T) v``
  finds eigenvalues one at a time, in order of MAGNITUDE. Simpler, slower.
* Stochastic Lanczos quadrature (Ghorbani et al. 2019; Lin et al. 2016): the spectral
  density ``phi(t) = (1/n) sum_i delta(t - l_i)`` is estimated by Gauss quadrature nodes
  ``theta_j`` (Ritz values) with weights ``tau_j = s_{1,j}^2`` from Lanczos runs started at
  random unit vectors, smoothed with a Gaussian.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax.hessian import _sharding
from amq_jax.hessian._hvp import HVP, LossFn, Problem

__all__ = ["EigenResult", "SpectralDensity", "top_eigenvalues", "spectral_density"]


class EigenResult(NamedTuple):
  """Top eigenpairs of a Hessian (block).

  Attributes:
    values: ``np.ndarray [k]``, descending. Lanczos: the ``k`` algebraically largest
      eigenvalues; power: the ``k`` largest in magnitude, then sorted descending.
    vectors: list of ``k`` unit eigenvectors in the order of ``values``: dicts
      ``{path: array}`` for the whole model, arrays of the kernel's shape for ``layer=``.
    iterations: Hessian-vector products used.
    converged: whether every one of the ``k`` pairs met ``tol``.
    residuals: ``np.ndarray [k]`` of relative residual estimates
      (Lanczos: ``|beta s| / |value|``; power: relative change in the last step).
  """
  values: np.ndarray
  vectors: list
  iterations: int
  converged: bool
  residuals: np.ndarray


class SpectralDensity(NamedTuple):
  """Smoothed eigenvalue density from stochastic Lanczos quadrature.

  Attributes:
    grid: ``np.ndarray [num_points]`` eigenvalue axis.
    density: ``np.ndarray [num_points]``, integrates to about 1 over ``grid``.
    nodes: ``np.ndarray [runs, m]`` Ritz values per run.
    weights: ``np.ndarray [runs, m]`` quadrature weights per run (each row sums to 1).
  """
  grid: np.ndarray
  density: np.ndarray
  nodes: np.ndarray
  weights: np.ndarray


@jax.jit
def _lanczos_update(V, hv, j, beta_prev):
  v = V[j]
  vprev = jnp.where(j > 0, V[jnp.maximum(j - 1, 0)], jnp.zeros_like(v))
  alpha = jnp.vdot(v, hv)
  w = hv - alpha * v - beta_prev * vprev
  mask = (jnp.arange(V.shape[0]) <= j).astype(V.dtype)
  for _ in range(2):  # full re-orthogonalization, twice
    w = w - ((V @ w) * mask) @ V
  beta = jnp.linalg.norm(w)
  V = V.at[j + 1].set(w / jnp.where(beta > 0, beta, 1.0))
  return V, alpha, beta


@jax.jit
def _restart(V, j, key):
  """A random unit vector orthogonal to rows 0..j of V, written to row j + 1."""
  r = jax.random.normal(key, V.shape[1:], V.dtype)
  mask = (jnp.arange(V.shape[0]) <= j).astype(V.dtype)
  for _ in range(2):
    r = r - ((V @ r) * mask) @ V
  return V.at[j + 1].set(r / jnp.linalg.norm(r))


def _tridiag(alphas, betas):
  m = len(alphas)
  T = np.diag(np.asarray(alphas, np.float64))
  if m > 1:
    off = np.asarray(betas[: m - 1], np.float64)
    T += np.diag(off, 1) + np.diag(off, -1)
  return T


def _lanczos(matvec, n, dtype, key, *, num_iters, rep, stop=None, restart=True):
  """Runs up to ``num_iters`` Lanczos steps; returns (V, alphas, betas, m).

  ``stop(alphas, betas) -> bool`` is asked after each step (one host sync per HVP).
  """
  m_max = min(num_iters, n)
  V = jnp.zeros((m_max + 1, n), dtype)
  v0 = jax.random.normal(jax.random.fold_in(key, 0), (n,), dtype)
  V = jax.device_put(V.at[0].set(v0 / jnp.linalg.norm(v0)), rep)
  alphas, betas = [], []
  beta_prev = jax.device_put(jnp.zeros((), dtype), rep)
  scale = 0.0
  for j in range(m_max):
    hv = matvec(V[j])
    V, alpha, beta = _lanczos_update(V, hv, j, beta_prev)
    a, b = (float(x) for x in _sharding.to_host((alpha, beta)))
    alphas.append(a)
    betas.append(b)
    scale = max(scale, abs(a) + b)
    if j + 1 == m_max or (stop is not None and stop(alphas, betas)):
      break
    if b <= 1e-6 * scale:
      if not restart:
        break
      # Invariant subspace: continue in its orthogonal complement (T gets a zero coupling).
      V = _restart(V, j, jax.device_put(jax.random.fold_in(key, j + 1), rep))
      betas[-1] = 0.0
      beta_prev = jax.device_put(jnp.zeros((), dtype), rep)
    else:
      beta_prev = beta
  return V, alphas, betas, len(alphas)


def _problem_and_hvp(loss_fn, params, batches, wrt, layer, mesh):
  if layer is not None:
    wrt = [layer]
  pb = Problem(loss_fn, params, batches, wrt=wrt, mesh=mesh)
  return pb, HVP(pb)


def _vectors_out(hvp: HVP, flat_vectors, layer):
  out = []
  for x in flat_vectors:
    tree = hvp.unravel(x)
    out.append(tree[layer] if layer is not None else tree)
  return out


def top_eigenvalues(loss_fn: LossFn, params: Any, batches: Any, *, key: jax.Array,
                    k: int = 1, layer: str | None = None, method: str = "lanczos",
                    tol: float = 1e-4, max_iters: int | None = None,
                    wrt: Sequence[str] | None = None, mesh=None) -> EigenResult:
  """Top-``k`` eigenvalues of the Hessian over ``wrt`` (or of one layer's diagonal block).

  Args:
    loss_fn, params, batches, wrt, mesh: as in :func:`make_hvp`.
    key: PRNG key for the starting vector(s).
    k: number of eigenvalues.
    layer: a parameter path; if given, the block ``H_ll`` of that leaf alone.
    method: ``'lanczos'`` (k algebraically largest; recommended, esp. for k ~ 20) or
      ``'power'`` (k largest in magnitude, one at a time with deflation).
    tol: relative accuracy: Lanczos stops when every top-k Ritz residual bound is
      ``<= tol * |value|``; power iteration when the Rayleigh quotient changes by
      ``<= tol * |value|``.
    max_iters: Lanczos: basis size cap (default ``max(4k + 40, 100)``); power: iterations
      per eigenvalue (default 200).

  Returns:
    :class:`EigenResult`.
  """
  if method not in ("lanczos", "power"):
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
  pb, hvp = _problem_and_hvp(loss_fn, params, batches, wrt, layer, mesh)
  n = hvp.size
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, {n}] (the dimension), got {k}")
  dtype = jnp.float32
  rep = pb.replicated
  if method == "lanczos":
    max_iters = max(4 * k + 40, 100) if max_iters is None else max_iters
    if max_iters < k:
      raise ValueError(f"max_iters ({max_iters}) must be >= k ({k})")
    state = {}

    def stop(alphas, betas):
      if len(alphas) < k:
        return False
      theta, S = np.linalg.eigh(_tridiag(alphas, betas))
      top = np.argsort(theta)[::-1][:k]
      res = np.abs(betas[-1] * S[-1, top])
      rel = res / np.maximum(np.abs(theta[top]), 1e-30)
      state["rel"] = rel
      return bool(np.all(rel <= tol))

    V, alphas, betas, m = _lanczos(hvp.flat, n, dtype, key, num_iters=max_iters, rep=rep,
                                   stop=stop)
    theta, S = np.linalg.eigh(_tridiag(alphas, betas))
    top = np.argsort(theta)[::-1][:k]
    if m == n:
      rel = np.zeros(k)  # the whole space: T is H in the Lanczos basis
    else:
      rel = np.abs(betas[-1] * S[-1, top]) / np.maximum(np.abs(theta[top]), 1e-30)
    Y = jax.device_put(np.asarray(S[:, top], np.float32), rep)  # [m, k]
    X = jax.jit(lambda V, Y: Y.T @ V[: Y.shape[0]], out_shardings=rep)(V, Y)
    vecs = [X[i] for i in range(len(top))]
    if len(top) < k:
      raise RuntimeError(f"Lanczos found only {len(top)} Ritz values; raise max_iters")
    return EigenResult(theta[top].astype(np.float64), _vectors_out(hvp, vecs, layer), m,
                       bool(np.all(rel <= tol)), rel)

  # Power iteration with deflation.
  max_iters = 200 if max_iters is None else max_iters
  U = jax.device_put(jnp.zeros((k, n), dtype), rep)
  lams = np.zeros(k)

  @jax.jit
  def deflate(U, lam, i, x, hx):
    mask = (jnp.arange(U.shape[0]) < i).astype(U.dtype)
    return hx - ((U @ x) * lam * mask) @ U

  @jax.jit
  def renorm(U, i, x):
    mask = (jnp.arange(U.shape[0]) < i).astype(U.dtype)
    for _ in range(2):
      x = x - ((U @ x) * mask) @ U
    return x / jnp.linalg.norm(x)

  total, conv, rels = 0, [], []
  for i in range(k):
    x0 = jax.random.normal(jax.random.fold_in(key, i), (n,), dtype)
    x = renorm(U, i, jax.device_put(x0, rep))
    lam_prev, rel, ok = None, np.inf, False
    for _ in range(max_iters):
      hx = deflate(U, jax.device_put(lams.astype(np.float32), rep), i, x, hvp.flat(x))
      total += 1
      lam = float(_sharding.to_host(jnp.vdot(x, hx)))
      x = renorm(U, i, hx)
      if lam_prev is not None:
        rel = abs(lam - lam_prev) / max(abs(lam), 1e-30)
        if rel <= tol:
          ok = True
          break
      lam_prev = lam
    lams[i] = lam
    U = U.at[i].set(x)
    conv.append(ok)
    rels.append(rel)
  order = np.argsort(lams)[::-1]
  vecs = [U[int(i)] for i in order]
  return EigenResult(lams[order], _vectors_out(hvp, vecs, layer), total, bool(all(conv)),
                     np.asarray(rels)[order])


def spectral_density(loss_fn: LossFn, params: Any, batches: Any, *, key: jax.Array,
                     layer: str | None = None, num_iters: int = 64, num_runs: int = 4,
                     num_points: int = 1024, sigma: float | None = None,
                     wrt: Sequence[str] | None = None, mesh=None) -> SpectralDensity:
  """Hessian eigenvalue density by stochastic Lanczos quadrature.

  .. math::  \\phi(t) \\approx \\frac{1}{R} \\sum_r \\sum_j \\tau^{(r)}_j
             \\mathcal{N}(t; \\theta^{(r)}_j, \\sigma^2)

  Args:
    loss_fn, params, batches, wrt, mesh, layer: as in :func:`top_eigenvalues`.
    key: PRNG key (run ``r`` uses ``fold_in(key, r)``).
    num_iters: Lanczos steps per run (quadrature nodes).
    num_runs: independent random starting vectors.
    num_points: grid size.
    sigma: Gaussian width; default 1% of the spectrum's range.

  Returns:
    :class:`SpectralDensity`.
  """
  pb, hvp = _problem_and_hvp(loss_fn, params, batches, wrt, layer, mesh)
  nodes, weights = [], []
  m_all = min(num_iters, hvp.size)
  for r in range(num_runs):
    _, alphas, betas, m = _lanczos(hvp.flat, hvp.size, jnp.float32,
                                   jax.random.fold_in(key, r), num_iters=num_iters,
                                   rep=pb.replicated, restart=False)
    theta, S = np.linalg.eigh(_tridiag(alphas, betas))
    th = np.zeros(m_all)
    tau = np.zeros(m_all)
    th[:m], tau[:m] = theta, S[0] ** 2
    nodes.append(th)
    weights.append(tau)
  nodes, weights = np.asarray(nodes), np.asarray(weights)
  lo, hi = float(nodes[weights > 0].min()), float(nodes[weights > 0].max())
  span = max(hi - lo, 1e-12)
  sigma = 0.01 * span if sigma is None else sigma
  grid = np.linspace(lo - 3 * sigma - 0.05 * span, hi + 3 * sigma + 0.05 * span, num_points)
  dens = np.zeros(num_points)
  for th, tau in zip(nodes, weights):
    g = np.exp(-0.5 * ((grid[:, None] - th[None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    dens += g @ tau
  return SpectralDensity(grid, dens / num_runs, nodes, weights)
