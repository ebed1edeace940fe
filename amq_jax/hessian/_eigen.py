"""Top Hessian eigenvalues (Lanczos or power iteration) and spectral density (SLQ).

Both methods only need ``x -> H x``. Vectors are the ravelled ``wrt`` leaves
(``jax.flatten_util.ravel_pytree``), replicated on the mesh.

* Lanczos (Lanczos 1950; Golub & Van Loan, Sec. 10.1) builds an orthonormal basis
  ``V_m`` of the Krylov space ``span{v, Hv, ..., H^{m-1} v}``; the eigenvalues of
  ``T_m = V_m^T H V_m`` (Ritz values) converge to the extreme eigenvalues of ``H``, the top
  20 in a few dozen HVPs. Each new vector is orthogonalized against ALL previous ones
  (twice: "twice is enough"), and ``T_m`` is assembled from those projections, so it stays
  exactly the Rayleigh quotient of the basis also after a restart. A Ritz pair
  ``(theta, V y)`` is accepted when a bound on its residual ``||H V y - theta V y||`` is
  ``<= tol * |theta|``: ``|y_m| beta_m`` from the last step, plus, for every restart point
  ``d``, ``|y_d|`` times the part of ``H v_d`` the basis does not capture.

  **Repeated eigenvalues.** A Krylov space from ONE start vector holds exactly one
  direction of each eigenspace (in exact arithmetic), so it cannot see that an eigenvalue
  is repeated: for a Dense layer under MSE loss (Hessian ``X^T X / N (x) I``) every
  eigenvalue has multiplicity ``d_out``, and plain Lanczos returns the distinct values
  only, converged. So for ``k >= 2``, once the top ``k`` have converged, the iteration
  restarts from a random vector orthogonal to the whole basis ``V``: the missing copies lie
  in that complement, and the new block is a Lanczos run on ``C = (I - VV^T) H (I - VV^T)``
  whose largest Ritz value converges to ``lambda_max(C)`` (``= lambda_1`` if a copy of
  ``lambda_1`` was missed). If it exceeds the ``k``-th value found, the enlarged basis now
  holds the missed eigenvalue and the check repeats after the next convergence;
  ``converged`` is set only once the block's converged top stays at or below the ``k``-th
  value. (A missed eigenvalue could only escape if the random restart had no component
  along it: probability zero.) When the space becomes invariant (``beta ~ 0``) the
  iteration also restarts in the complement.
  Memory: ``(max_iters + 1) x n`` floats.
* Power iteration with deflation (HAWQ-V1; PyHessian): ``x <- P H x / ||P H x||`` with
  ``P`` the projector off the eigenvectors found so far, one eigenvalue at a time. It stops
  when the residual ``||P H x - lambda x|| <= tol * |lambda|`` (``lambda = x^T H x``): then
  some eigenvalue lies within ``tol * |lambda|`` of ``lambda`` (Weyl/Bauer-Fike for
  symmetric matrices); the change of ``lambda`` between steps is NOT such a test (it can
  be tiny while the error is large when two eigenvalues are close). Power iteration finds
  the largest MAGNITUDE; ``which='LA'`` (default) turns that into the largest ALGEBRAIC:
  if the value found is negative it is the smallest eigenvalue ``mu``, and power iteration
  on ``H - mu I`` (eigenvalues ``>= 0``) then converges to ``lambda_max - mu``.
* Stochastic Lanczos quadrature (Ghorbani et al. 2019; Lin et al. 2016): the spectral
  density ``phi(t) = (1/n) sum_i delta(t - l_i)`` is estimated by Gauss quadrature nodes
  ``theta_j`` (Ritz values) with weights ``tau_j = s_{1,j}^2`` from Lanczos runs started at
  random unit vectors, smoothed with a Gaussian.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax.hessian import _progress, _sharding
from amq_jax.hessian._hvp import HVP, LossFn, Problem

__all__ = ["EigenResult", "SpectralDensity", "top_eigenvalues", "spectral_density"]


class EigenResult(NamedTuple):
  """Top eigenpairs of a Hessian (block).

  Attributes:
    values: ``np.ndarray [k]``, descending: the ``k`` algebraically largest eigenvalues
      (power iteration with ``which='LM'``: the ``k`` largest in magnitude, sorted).
    vectors: list of ``k`` unit eigenvectors in the order of ``values``: dicts
      ``{path: array}`` for the whole model, arrays of the kernel's shape for ``layer=``.
    iterations: Hessian-vector products used.
    converged: whether every one of the ``k`` pairs met ``tol`` (and, for Lanczos with
      ``k >= 2``, the multiplicity check of the module docstring passed).
    residuals: ``np.ndarray [k]`` of relative residuals ``||H u - lambda u|| / |lambda|``
      (Lanczos: the upper bound of the module docstring; power: computed).
  """
  values: np.ndarray
  vectors: list
  iterations: int
  converged: bool
  residuals: np.ndarray

  def __repr__(self) -> str:
    v = np.asarray(self.values)
    shown = ", ".join(f"{x:.4g}" for x in v[:6]) + (", ..." if v.size > 6 else "")
    return (f"EigenResult(values=[{shown}], k={v.size}, iterations={self.iterations}, "
            f"converged={bool(self.converged)})")


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

  def __repr__(self) -> str:
    return (f"SpectralDensity(runs={self.nodes.shape[0]}, nodes={self.nodes.shape[1]}, "
            f"range=[{self.grid[0]:.3g}, {self.grid[-1]:.3g}])")


@jax.jit
def _expand(V, hv, j):
  """Orthogonalizes ``hv`` against rows ``0..j`` of ``V`` (twice) into row ``j + 1``.

  Returns ``(V, coeffs, beta)``: ``coeffs[i] = v_i . hv`` for ``i <= j`` (column ``j`` of
  ``T = V^T H V``), ``beta`` the norm of what is left.
  """
  mask = (jnp.arange(V.shape[0]) <= j).astype(V.dtype)
  c1 = (V @ hv) * mask
  w = hv - c1 @ V
  c2 = (V @ w) * mask
  w = w - c2 @ V
  beta = jnp.linalg.norm(w)
  V = V.at[j + 1].set(w / jnp.where(beta > 0, beta, 1.0))
  return V, c1 + c2, beta


@jax.jit
def _restart(V, j, key):
  """A random unit vector orthogonal to rows 0..j of V, written to row j + 1."""
  r = jax.random.normal(key, V.shape[1:], V.dtype)
  mask = (jnp.arange(V.shape[0]) <= j).astype(V.dtype)
  for _ in range(2):
    r = r - ((V @ r) * mask) @ V
  return V.at[j + 1].set(r / jnp.linalg.norm(r))


class _Krylov:
  """Lanczos with full re-orthogonalization; ``T`` assembled from the projections.

  Host state: ``T [m, m]`` (float64), the last ``beta``, and for every restart point
  ``d`` its dropped residual norm ``beta_d``.
  """

  def __init__(self, matvec, n, dtype, key, m_max, rep):
    self.matvec, self.n, self.key, self.rep = matvec, n, key, rep
    self.m_max = min(m_max, n)
    V = jnp.zeros((self.m_max + 1, n), dtype)
    v0 = jax.random.normal(jax.random.fold_in(key, 0), (n,), dtype)
    self.V = jax.device_put(V.at[0].set(v0 / jnp.linalg.norm(v0)), rep)
    self.T = np.zeros((self.m_max, self.m_max))
    self.m = 0
    self.beta = 0.0
    self.restarts: dict[int, float] = {}  # column d -> beta_d dropped at the restart
    self.scale = 0.0

  def step(self) -> float:
    j = self.m
    hv = self.matvec(self.V[j])
    self.V, coeffs, beta = _expand(self.V, hv, j)
    c, b = _sharding.to_host((coeffs, beta))
    c = np.asarray(c, np.float64)[: j + 1]
    self.T[: j + 1, j] = c
    self.T[j, : j + 1] = c
    self.m = j + 1
    self.beta = float(b)
    self.scale = max(self.scale, float(np.abs(c).max()) + self.beta)
    return self.beta

  def invariant(self) -> bool:
    return self.beta <= 1e-6 * max(self.scale, 1e-30)

  def restart(self):
    """Next vector: random, orthogonal to the basis (the dropped residual is recorded)."""
    d = self.m - 1
    self.restarts[d] = self.beta
    self.V = _restart(self.V, d, jax.device_put(jax.random.fold_in(self.key, d + 1), self.rep))

  def ritz(self, start: int = 0):
    """``(theta desc, Y, residual bounds)`` of basis vectors ``start..m-1``.

    ``start = 0``: Ritz pairs of ``H``. ``start > 0`` (a restart point): Ritz pairs of
    ``H`` compressed to the complement of the first ``start`` vectors, ``C = P H P``
    (the block's vectors are orthogonal to them, so its ``T`` block is ``V_b^T C V_b``).
    """
    m = self.m
    theta, Y = np.linalg.eigh(self.T[start:m, start:m])
    order = np.argsort(theta)[::-1]
    theta, Y = theta[order], Y[:, order]
    bound = np.abs(Y[m - 1 - start]) * self.beta
    for d, bd in self.restarts.items():
      if d < start or d >= m - 1:
        continue
      # ||(I - V V^T) H v_d||^2 = beta_d^2 - sum_{i > d} (v_i . H v_d)^2.
      rho = math.sqrt(max(bd * bd - float(np.sum(self.T[d + 1:m, d] ** 2)), 0.0))
      bound = bound + np.abs(Y[d - start]) * rho
    return theta, Y, bound


def _lanczos_top(matvec, n, dtype, key, *, k, tol, m_max, rep, bar=None):
  """Top-``k`` Ritz pairs with the multiplicity check; returns (theta, Y, bound, V, m, ok)."""
  kr = _Krylov(matvec, n, dtype, key, m_max, rep)
  verified = k == 1
  verify_start = None
  ok = False
  while kr.m < kr.m_max:
    kr.step()
    if bar is not None:
      bar.update(1)
    m = kr.m
    theta, Y, bound = kr.ritz()
    if m == n:
      ok = True  # the whole space: T is H in the basis
      break
    top = np.arange(min(k, m))
    conv = m >= k and bool(np.all(bound[top] <= tol * np.maximum(np.abs(theta[top]), 1e-30)))
    if bar is not None:
      bar.set_postfix(top=f"{theta[0]:.4g}", worst_residual=f"{np.max(bound[top] / np.maximum(np.abs(theta[top]), 1e-30)):.1e}")
    restart = kr.invariant()
    if conv and not verified:
      if verify_start is None:
        verify_start, restart = m, True
      else:
        # Lanczos on the complement of the basis before the restart: its top Ritz pair.
        tb, _, bb = kr.ritz(verify_start)
        if bb[0] <= tol * max(abs(tb[0]), 1e-30):
          kth = theta[k - 1]
          if tb[0] <= kth + tol * abs(kth):
            verified = True  # nothing left outside exceeds the k-th value
          else:
            verify_start, restart = m, True  # a missed eigenvalue entered the top k: again
    if conv and verified:
      ok = True
      break
    if restart and kr.m < kr.m_max:
      kr.restart()
  theta, Y, bound = kr.ritz()
  if kr.m == n:
    bound = np.zeros_like(bound)
  return theta, Y, bound, kr.V, kr.m, ok


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


@jax.jit
def _project(U, i, x):
  """``x`` minus its components along rows ``0..i-1`` of ``U`` (twice)."""
  mask = (jnp.arange(U.shape[0]) < i).astype(U.dtype)
  for _ in range(2):
    x = x - ((U @ x) * mask) @ U
  return x


@jax.jit
def _power_step(U, i, x, hx, shift):
  """One step on ``P (H - shift I) P``: returns (next x, lambda = x.PHx, ||PHx - lambda x||)."""
  phx = _project(U, i, hx)
  lam = jnp.vdot(x, phx)
  res = jnp.linalg.norm(phx - lam * x)
  y = phx - shift * x
  return y / jnp.linalg.norm(y), lam, res


def top_eigenvalues(loss_fn: LossFn, params: Any, batches: Any, *, key: jax.Array,
                    k: int = 1, layer: str | None = None, method: str = "lanczos",
                    tol: float = 1e-4, max_iters: int | None = None, which: str = "LA",
                    wrt: Sequence[str] | None = None, mesh=None,
                    progress: bool = True) -> EigenResult:
  """Top-``k`` eigenvalues of the Hessian over ``wrt`` (or of one layer's diagonal block).

  Args:
    loss_fn, params, batches, wrt, mesh: as in :func:`make_hvp`.
    key: PRNG key for the starting vector(s).
    k: number of eigenvalues.
    layer: a parameter path; if given, the block ``H_ll`` of that leaf alone (the HVP is
      restricted to the layer).
    method: ``'lanczos'`` (recommended, esp. for k ~ 20; finds repeated eigenvalues, see
      the module docstring) or ``'power'`` (one at a time with deflation).
    tol: relative accuracy: a pair is accepted when its residual (Lanczos: a bound on it)
      is ``<= tol * |value|``.
    max_iters: Lanczos: basis size cap (default ``max(4k + 40, 100)``); power: iterations
      per eigenvalue (default 200; doubled at most when ``which='LA'`` needs a shift).
    which: power iteration only: ``'LA'`` (default) largest algebraic, ``'LM'`` largest
      magnitude (PyHessian's). Lanczos always returns the largest algebraic.
    progress: a ``tqdm.auto`` bar of HVPs (on by default).

  Returns:
    :class:`EigenResult`.
  """
  if method not in ("lanczos", "power"):
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
  if which not in ("LA", "LM"):
    raise ValueError(f"which must be 'LA' or 'LM', got {which!r}")
  pb, hvp = _problem_and_hvp(loss_fn, params, batches, wrt, layer, mesh)
  n = hvp.size
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, {n}] (the dimension), got {k}")
  dtype = jnp.float32
  rep = pb.replicated
  what = layer or "all layers"
  if method == "lanczos":
    max_iters = max(4 * k + 40, 100) if max_iters is None else max_iters
    if max_iters < k:
      raise ValueError(f"max_iters ({max_iters}) must be >= k ({k})")
    bar = _progress.bar(progress, total=min(max_iters, n), desc=f"top-{k} eigenvalues "
                        f"({what})", unit="hvp")
    try:
      theta, Y, bound, V, m, ok = _lanczos_top(hvp.flat, n, dtype, key, k=k, tol=tol,
                                               m_max=max_iters, rep=rep, bar=bar)
    finally:
      if bar is not None:
        bar.close()
    if m < k:
      raise RuntimeError(f"Lanczos found only {m} Ritz values; raise max_iters")
    top = np.arange(k)
    rel = bound[top] / np.maximum(np.abs(theta[top]), 1e-30)
    Yk = np.zeros((V.shape[0], k), np.float32)
    Yk[:m] = Y[:, top]
    X = jax.jit(lambda V, Y: Y.T @ V, out_shardings=rep)(V, jax.device_put(Yk, rep))
    vecs = [X[i] for i in range(k)]
    return EigenResult(theta[top].astype(np.float64), _vectors_out(hvp, vecs, layer), m,
                       bool(ok and np.all(rel <= tol)), rel)

  # Power iteration with deflation by projection.
  max_iters = 200 if max_iters is None else max_iters
  U = jax.device_put(jnp.zeros((k, n), dtype), rep)
  lams = np.zeros(k)
  bar = _progress.bar(progress, total=k * max_iters, desc=f"top-{k} eigenvalues, power "
                      f"({what})", unit="hvp")
  total, conv, rels = 0, [], []
  try:
    for i in range(k):
      ii = jax.device_put(np.int32(i), rep)
      shift, lam, rel, ok = 0.0, 0.0, math.inf, False
      for attempt in range(2):  # attempt 1: shifted by a negative dominant eigenvalue
        x0 = jax.random.normal(jax.random.fold_in(key, 2 * i + attempt), (n,), dtype)
        x = _project(U, ii, jax.device_put(x0, rep))
        x = x / jnp.linalg.norm(x)
        ok = False
        for _ in range(max_iters):
          x_next, lam_d, res_d = _power_step(U, ii, x, hvp.flat(x), jnp.float32(shift))
          total += 1
          if bar is not None:
            bar.update(1)
          lam, res = (float(v) for v in _sharding.to_host((lam_d, res_d)))
          rel = res / max(abs(lam), 1e-30)
          if res <= tol * abs(lam) or res == 0.0:
            ok = True
            break
          x = x_next
        if which == "LM" or lam >= 0 or attempt == 1:
          break
        shift = lam  # the dominant eigenvalue is negative: find the top of H - lam I
      lams[i] = lam
      U = U.at[i].set(x)
      conv.append(ok)
      rels.append(rel)
  finally:
    if bar is not None:
      bar.close()
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
    kr = _Krylov(hvp.flat, hvp.size, jnp.float32, jax.random.fold_in(key, r), num_iters,
                 pb.replicated)
    while kr.m < kr.m_max:  # no restart: the quadrature is that of ONE start vector
      kr.step()
      if kr.invariant():
        break
    m = kr.m
    theta, S = np.linalg.eigh(kr.T[:m, :m])
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
