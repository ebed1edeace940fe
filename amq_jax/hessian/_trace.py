"""Per-layer curvature traces: Hutchinson, Hutch++ and output-space GGN/Fisher probes.

HAWQ-V2 (Dong et al. 2020, Sec. 3.2) needs ``Tr(H_ii)`` for every diagonal block ``H_ii``
(layer ``i``'s kernel). For a symmetric ``A`` and a Rademacher probe ``z`` (entries +-1),
``E[z^T A z] = Tr(A)`` and ``Var[z^T A z] = 2 (||A||_F^2 - sum_i A_ii^2)`` (Hutchinson
1990; Avron & Toledo 2011). Estimators of the Hessian (``curvature='hessian'``):

* ``'per_layer'``: probe only layer ``i``, so the sample is ``z_i^T H_ii z_i`` exactly.
  Each HVP is RESTRICTED to the layer: the loss is differentiated w.r.t. that kernel alone
  (the others held fixed), so the tangent starts at the layer and the backward pass stops
  there; one compiled function per layer. One restricted HVP per layer per probe, computed
  ``probes_per_step`` at a time (default 8): the products of one step share the primal
  forward and backward pass, so eight cost 0.12-0.59 of eight separate calls on ResNet20.
* ``'hutchpp'``: Hutch++ (Meyer, Musco, Musco & Woodruff 2021) per layer on the restricted
  HVP. With ``Q`` an orthonormal basis of ``H_ii S`` for a Gaussian sketch ``S`` of
  ``r = sketch_size`` columns (``2 r`` HVPs: ``H S`` then ``H Q``),

      Tr(H) = Tr(Q^T H Q) + Tr((I - QQ^T) H (I - QQ^T)),

  because ``Tr(P H (I - P)) = Tr((I - P) P H) = 0`` for the projector ``P = QQ^T``. The
  first term is computed exactly; the second is estimated by Hutchinson probes
  ``y = (I - P) z`` (sample ``y^T H y``), which are independent of ``Q``, so every sample
  ``Tr(Q^T H Q) + y^T H y`` is an unbiased estimate of ``Tr(H)`` whatever ``S`` was. The
  residual has the top of the spectrum removed, so its variance
  ``2 ||(I-P) H (I-P)||_F^2`` is much smaller when a few eigenvalues dominate; a block of
  rank ``<= r`` is computed exactly (zero variance).
* ``'joint'``: one probe ``z = (z_1, ..., z_L)`` over every layer per full HVP; layer
  ``i``'s sample is ``z_i^T H_ii z_i + sum_{j != i} z_i^T H_ij z_j``: the cross terms have
  mean zero but add variance. One HVP serves all layers.
* ``'adaptive'``: joint probes over only the layers that have not yet converged.

The generalized Gauss-Newton and Fisher traces (``curvature='ggn' | 'fisher'``) are probed
in OUTPUT space with one backward pass for all layers at once; see
:mod:`amq_jax.hessian._ggn`.

Every layer stops on its own by the Student-t rule of :mod:`amq_jax.hessian._stats` and
gets a ``status``. Probe ``j`` of layer ``i`` is drawn from ``fold_in(fold_in(key, i), j)``:
independent across layers and the same for 'per_layer', 'joint' and 'adaptive' and for
every device count, so results are reproducible for a given key.
"""
from __future__ import annotations

import functools
import json
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax import _paths
from amq_jax.errors import NonFiniteError
from amq_jax.hessian import _progress, _sharding, _stats
from amq_jax.hessian._hvp import LossFn, Problem, cached_jit, loss_and_hvp

__all__ = ["TraceEstimate", "layer_traces", "estimates_to_json", "estimates_from_json",
           "ESTIMATORS", "DEFAULT_ESTIMATOR", "CURVATURES", "STATUSES"]

ESTIMATORS = ("joint", "per_layer", "adaptive", "hutchpp")
CURVATURES = ("hessian", "ggn", "fisher")
STATUSES = _stats.STATUSES
# Measured (benchmarks/RESULTS.md, 2026-12-02; shipped ResNet20, 256 Fashion-MNIST images,
# 22 layers, every layer to 5% relative standard error at one standard error): 'hutchpp'
# with a sketch of 8 got all 22 layers there with 704 one-layer HVPs in 117-121 s on one
# CPU device (curvlinops' Hutch++ on the same weights: 272-307 s), where 'per_layer' needs
# ~1,850 (projected, ~290-320 s), 'joint' ~10,200 and 'adaptive' ~8,200. (It was held back
# while XLA:CPU aborted its many small multi-device programs in an all-reduce rendezvous: a
# jaxlib deadlock, now avoided for every program the package runs; amq_jax/_sharding.py,
# tests/test_cpu_collectives.py.)
DEFAULT_ESTIMATOR = "hutchpp"
DEFAULT_SKETCH = 8
# fold_in index of the Hutch++ sketch of a layer (probe indices count up from 0).
_SKETCH_STREAM = 0x7FFFFFFF


class TraceEstimate(NamedTuple):
  """Estimate of one diagonal block's trace (Hessian, GGN or Fisher).

  Attributes:
    trace: mean of the per-probe values, an unbiased estimate of ``Tr(H_ii)``.
    stderr: standard error of that mean, ``std(samples, ddof=1) / sqrt(probes)``.
    probes: number of probes (samples).
    num_params: number of entries ``n_i`` of the block's variable (layer kernel or, for
      activation traces, one example's input activation).
    avg_trace: ``trace / num_params``, the HAWQ-V2 sensitivity weight.
    samples: ``np.ndarray [probes]`` of per-probe values.
    converged: whether the stopping rule (interval narrow enough) was met; False when the
      layer stopped at ``max_probes`` or ``max_time``.
    status: ``'converged' | 'max_probes' | 'negative' | 'near_zero'`` (see
      :mod:`amq_jax.hessian._stats`); what Omega does with each: :func:`sensitivity_traces`.
  """
  trace: float
  stderr: float
  probes: int
  num_params: int
  avg_trace: float
  samples: np.ndarray
  converged: bool = True
  status: str = "converged"

  @classmethod
  def from_samples(cls, samples, num_params: int, converged: bool = True,
                   status: str | None = None, *, atol: float = 0.0,
                   confidence: float = 0.95) -> "TraceEstimate":
    """From per-probe values; ``status`` defaults to the one the interval implies."""
    s = np.asarray(samples, np.float64).reshape(-1)
    mean, se, _ = _stats.interval(s, confidence)
    if status is None:
      status = _stats.classify(mean, se, s.size, met=converged, atol=atol,
                               confidence=confidence)
    return cls(mean, se, int(s.size), int(num_params), mean / num_params, s,
               bool(converged), str(status))

  def __repr__(self) -> str:
    return (f"TraceEstimate(trace={self.trace:.4g} +- {self.stderr:.2g}, "
            f"probes={self.probes}, n={self.num_params}, status={self.status!r})")


def estimates_to_json(estimates: dict[str, TraceEstimate]) -> dict[str, dict]:
  """``{path: TraceEstimate}`` -> a dict of plain Python values (``json.dump``-able)."""
  return {p: {"trace": e.trace, "stderr": e.stderr, "probes": e.probes,
              "num_params": e.num_params, "avg_trace": e.avg_trace,
              "converged": bool(e.converged), "status": str(e.status),
              "samples": [float(x) for x in np.asarray(e.samples).reshape(-1)]}
          for p, e in estimates.items()}


def estimates_from_json(data: dict | str) -> dict[str, TraceEstimate]:
  """Inverse of :func:`estimates_to_json`; ``data`` is the dict or its JSON text.

  Files written before statuses existed load too: their status is derived from the stored
  trace, stderr, probes and ``converged`` (95% interval).
  """
  if isinstance(data, str):
    data = json.loads(data)
  out = {}
  for p, d in data.items():
    trace, se, k = float(d["trace"]), float(d["stderr"]), int(d["probes"])
    conv = bool(d.get("converged", True))
    status = d.get("status") or _stats.classify(trace, se, k, met=conv)
    out[p] = TraceEstimate(trace, se, k, int(d["num_params"]), float(d["avg_trace"]),
                           np.asarray(d.get("samples", []), np.float64), conv, str(status))
  return out


def probe(key, layer: int, index, shape, dtype):
  """Rademacher probe ``j = index`` of layer ``layer`` (the package-wide key schedule)."""
  k = jax.random.fold_in(jax.random.fold_in(key, layer), index)
  return jax.random.rademacher(k, shape, dtype)


# --- joint / adaptive: probes over several layers, one full HVP -------------------------

def _make_step(pb: Problem, probes_per_step: int):
  """Jitted probe step over one batch (cached per loss_fn / layers / shapes / mesh).

  ``step(params, w, batch, weight, key, counts, mask)`` draws ``probes_per_step`` probes,
  probe ``p`` of layer ``i`` being ``mask[i] * probe(key, i, counts[i] + p)``, and returns
  ``(weight * values [P, L], hv_finite [L], loss)`` with ``values[p, i] = z_i^T (H z)_i``.
  """
  sig = (tuple(pb.wrt), tuple(pb.shapes[p] for p in pb.wrt),
         tuple(str(pb.dtypes[p]) for p in pb.wrt), probes_per_step)
  return cached_jit("trace_step", pb, sig,
                    lambda: _build_step(pb.loss_fn, *sig[:2], [pb.dtypes[p] for p in pb.wrt],
                                        probes_per_step))


# Up to this many probes per step are unrolled in the traced program; beyond, lax.map.
# XLA on CPU runs convolutions inside a loop (lax.map/scan) far slower than the same ops
# unrolled: 4 output-space VJPs of ResNet20 on 32 images took 14 s under lax.map, 1.1 s
# under vmap and 0.45 s unrolled (one VJP with its forward pass: 0.17 s).
_UNROLL = 16


def _map_probes(one, probes_per_step):
  """``one(p)`` for p in 0..P-1, stacked along a new leading axis."""
  if probes_per_step <= _UNROLL:
    outs = [one(p) for p in range(probes_per_step)]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
  return jax.lax.map(one, jnp.arange(probes_per_step))


def _build_step(loss_fn, wrt, shapes, dtypes, probes_per_step):
  # Closes over the loss and static shapes only (never over params or batches), so the
  # cached function holds no device memory.
  def f(w, params, batch):
    return loss_fn(_paths.merge(params, w), batch)

  def step(params, w, batch, weight, key, counts, mask):
    def one(p):
      z = {path: mask[i] * probe(key, i, counts[i] + p, shapes[i], dtypes[i])
           for i, path in enumerate(wrt)}
      loss, hz = loss_and_hvp(lambda w_: f(w_, params, batch), w, z)
      vals = jnp.stack([jnp.vdot(z[q], hz[q]).astype(jnp.float32) for q in wrt])
      fin = jnp.stack([jnp.all(jnp.isfinite(hz[q])) for q in wrt])
      return vals, fin, loss
    vals, fin, loss = _map_probes(one, probes_per_step)
    return weight * vals, jnp.all(fin, axis=0), loss[0]

  return step


# --- per_layer / hutchpp: restricted HVPs, one layer at a time -------------------------

# Vectors per restricted-HVP call for 'per_layer' and 'hutchpp' when ``probes_per_step`` is
# not given. The products of one call share the primal forward and backward pass (XLA
# merges the identical work of the unrolled products): on the shipped ResNet20 at batch 128
# eight products in one call cost 0.12 (head) to 0.59 (stem) of eight separate calls
# (benchmarks/RESULTS.md, session 2026-12-02; benchmarks/bench_block_hvp.py).
DEFAULT_BLOCK = 8


def _block_hv(pb: Problem, i: int, k: int):
  """Jitted ``(params, w_i, batch, weight, V [k, *shape]) -> (weight * H_ii V, finite)``.

  ``H_ii v`` of each row ``v`` of ``V``, the loss differentiated w.r.t. layer ``i``'s kernel
  alone (restricted: the tangent starts at the layer, the backward pass stops there). One
  program per layer serves Hutch++'s sketch and every probe round.
  """
  path = pb.wrt[i]
  shape, dtype = pb.shapes[path], pb.dtypes[path]
  sig = (path, shape, str(dtype), k)

  def build():
    loss_fn = pb.loss_fn

    def hv(params, wl, batch, weight, V):
      f = lambda w_: loss_fn(_paths.merge(params, {path: w_}), batch)
      out = _map_probes(lambda p: loss_and_hvp(f, wl, V[p])[1], k)
      return weight * out, jnp.all(jnp.isfinite(out))
    return hv

  return cached_jit("block_hv", pb, sig, build)


def _block_probes(pb: Problem, i: int, k: int, rank: int):
  """Jitted ``(key, layer, count, Q [rank, n_i]) -> Y [k, *shape]``: Rademacher probes
  ``count .. count + k - 1`` of ``layer``, each projected off the rows of ``Q``
  (``y = z - Q^T Q z``; for rank 0 ``Q`` is None and unused). Cheap: no model in it,
  cached per shape."""
  path = pb.wrt[i]
  shape, dtype = pb.shapes[path], pb.dtypes[path]

  def build():
    def probes(key, layer, count, Q):
      Z = jnp.stack([probe(key, layer, count + p, shape, dtype).reshape(-1)
                     for p in range(k)])
      if rank:
        Z = Z - (Z @ Q.T) @ Q
      return Z.reshape((k,) + tuple(shape))
    return probes

  return cached_jit("block_probes", pb, (shape, str(dtype), k, rank), build)


@jax.jit
def _orth_rows(HS):
  """Orthonormal rows spanning the rows of ``HS [r, ...]`` (QR of its transpose)."""
  q, _ = jnp.linalg.qr(HS.reshape(HS.shape[0], -1).T)
  return q.T


@jax.jit
def _quad_rows(Y, HY):
  """``[y_p^T (H y)_p for each row p]`` in float32."""
  n = Y.shape[0]
  return jnp.sum(Y.reshape(n, -1) * HY.reshape(n, -1), axis=1).astype(jnp.float32)


def _sketch_shapes(key, i, r, shape, dtype):
  k = jax.random.fold_in(jax.random.fold_in(key, i), _SKETCH_STREAM)
  return jax.random.normal(k, (r,) + tuple(shape), dtype)


# --- the shared driver -------------------------------------------------------------------

def _nonfinite(pb: Problem, fins, losses, layers):
  """Raises NonFiniteError naming batches and layers (``fins [batches, L]``)."""
  fins = np.asarray(fins)
  losses = np.asarray(losses)
  bad_loss = [b for b in range(len(losses)) if not np.isfinite(losses[b])]
  bad = [(b, pb.wrt[i]) for b in range(fins.shape[0]) for i in layers if not fins[b, i]]
  if bad_loss or bad:
    msg = []
    if bad_loss:
      msg.append(f"non-finite loss on batch(es) {bad_loss}")
    if bad:
      lay = sorted({p for _, p in bad}, key=pb.wrt.index)
      msg.append(f"non-finite Hessian-vector product in layer(s) {lay} on batch(es) "
                 f"{sorted({b for b, _ in bad})}")
    raise NonFiniteError("; ".join(msg) + " (check the checkpoint, learning rate or "
                         "inputs; BatchNorm statistics must be finite)")


class _Sampler:
  """One estimator: ``round(active, count) -> {layer: new values}``; ``cost`` counts work.

  ``unit`` names the cost unit (restricted or full HVPs, backward passes) for the bar.
  """
  unit = "hvps"

  def __init__(self):
    self.cost = 0

  def round(self, active: np.ndarray, count: np.ndarray) -> dict[int, np.ndarray]:
    raise NotImplementedError


class _FullHVPSampler(_Sampler):
  """'joint' / 'adaptive': one full HVP per probe over the masked layers."""

  def __init__(self, pb: Problem, key, estimator: str, probes_per_step: int):
    super().__init__()
    self.pb, self.key, self.adaptive = pb, key, estimator == "adaptive"
    self.P = probes_per_step
    self.step = _make_step(pb, probes_per_step)

  def round(self, active, count):
    pb = self.pb
    L = len(pb.wrt)
    mask = active if self.adaptive else np.ones(L, bool)
    mask_d = pb.replicate(mask.astype(np.float32))
    counts_d = pb.replicate(count.astype(np.int32))
    total, fins, losses = None, [], []
    for batch, weight in zip(pb.batches, pb.weights):
      vals, fin, loss = self.step(pb.params, pb.w, batch, weight, self.key, counts_d, mask_d)
      total = vals if total is None else total + vals
      fins.append(fin)
      losses.append(loss)
    vals, fins, losses = _sharding.to_host((total, fins, losses))
    self.cost += self.P
    _nonfinite(pb, fins, losses, list(np.flatnonzero(mask)))
    return {i: vals[:, i] for i in np.flatnonzero(active)}


class _BlockSampler(_Sampler):
  """'per_layer' (rank 0) and 'hutchpp' (rank r): restricted HVPs, layer by layer, ``P``
  vectors per call of the layer's one program (:func:`_block_hv`)."""
  unit = "layer-hvps"

  def __init__(self, pb: Problem, key, probes_per_step: int, rank: int):
    super().__init__()
    self.pb, self.key, self.P = pb, key, probes_per_step
    self.ranks = [min(rank, pb.num_params[p]) for p in pb.wrt]
    self.Q: dict[int, Any] = {}
    self.t0: dict[int, float] = {}

  def _apply(self, i, V):
    """``(H_ii V, finite per batch)`` for ``V [m, *shape]`` in calls of ``P`` rows (the last
    padded with zero rows, whose products are zero)."""
    pb, P = self.pb, self.P
    path = pb.wrt[i]
    hv = _block_hv(pb, i, P)
    m = V.shape[0]
    if m % P:
      V = jnp.concatenate([V, jnp.zeros((P - m % P,) + V.shape[1:], V.dtype)])
    chunks, fins = [], []
    for c in range(0, V.shape[0], P):
      acc, fin_c = None, []
      for batch, weight in zip(pb.batches, pb.weights):
        out, fin = hv(pb.params, pb.w[path], batch, weight, V[c:c + P])
        acc = out if acc is None else acc + out
        fin_c.append(fin)
      chunks.append(acc)
      fins.append(jnp.stack(fin_c))
    HV = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
    return HV[:m], jnp.all(jnp.stack(fins), axis=0)  # [batches]

  def _check(self, i, fins):
    """NonFiniteError naming the batches (and those with a non-finite loss) of layer ``i``
    when ``fins [batches]`` has a False."""
    fins = np.asarray(fins, bool)
    if fins.all():
      return
    pb = self.pb
    f = np.ones((len(pb.batches), len(pb.wrt)), bool)
    f[:, i] = fins
    loss = jax.jit(lambda p, w, b: pb.loss_fn(_paths.merge(p, w), b))
    losses = [float(_sharding.to_host(loss(pb.params, pb.w, b))) for b in pb.batches]
    _nonfinite(pb, f, losses, [i])

  def _sketch(self, layers):
    """Hutch++'s exact part ``Tr(Q^T H Q)`` for each layer (2 r restricted HVPs each)."""
    pb = self.pb
    pending = {}
    for i in layers:
      path, r = pb.wrt[i], self.ranks[i]
      if r == 0:
        continue
      S = pb.replicate(_sketch_shapes(self.key, i, r, pb.shapes[path], pb.dtypes[path]))
      HS, f1 = self._apply(i, S)
      Q = _orth_rows(HS)
      HQ, f2 = self._apply(i, Q.reshape((r,) + pb.shapes[path]))
      self.Q[i] = Q
      pending[i] = (jnp.sum(_quad_rows(Q, HQ)), f1, f2)
      self.cost += 2 * r
    for i, (t0, f1, f2) in _sharding.to_host(pending).items():
      # A non-finite H S spreads to every batch through Q: name the batches of H S first.
      self._check(i, f1)
      self._check(i, f2)
      self.t0[i] = float(t0)

  def round(self, active, count):
    pb = self.pb
    if not self.t0 and any(self.ranks):
      self._sketch(range(len(pb.wrt)))
    pending, new = [], {}
    for i in np.flatnonzero(active):
      path = pb.wrt[i]
      if self.ranks[i] >= pb.num_params[path]:  # Q spans the block: exact
        new[i] = np.full(self.P, self.t0[i])
        continue
      Y = _block_probes(pb, i, self.P, self.ranks[i])(
          self.key, pb.replicate(np.int32(i)), pb.replicate(np.int32(count[i])),
          self.Q.get(i))  # None for 'per_layer' (rank 0)
      HY, fins = self._apply(i, Y)
      pending.append((i, (_quad_rows(Y, HY), fins)))
      self.cost += self.P
    fetched = _sharding.to_host([p[1] for p in pending])  # one sync per round
    for (i, _), (vals, fins) in zip(pending, fetched):
      self._check(i, fins)
      new[i] = np.asarray(vals, np.float64) + self.t0.get(i, 0.0)
    return new


def _run(sampler: _Sampler, paths: Sequence[str], num_params: dict, *, rtol: float,
         atol: float, min_probes: int, max_probes: int, confidence: float,
         probes_per_step: int, progress: bool, max_time: float | None, desc: str
         ) -> dict[str, TraceEstimate]:
  """Rounds of ``sampler`` until every layer meets the stopping rule or a limit."""
  L = len(paths)
  samples: list[list[float]] = [[] for _ in range(L)]
  active = np.ones(L, bool)
  met = np.zeros(L, bool)
  count = np.zeros(L, np.int32)  # probes drawn per layer (the probe index schedule)
  bar = _progress.bar(progress, total=L, desc=desc, unit="layer")
  t_start = time.perf_counter()
  try:
    while active.any():
      new = sampler.round(active, count)
      count += probes_per_step  # every layer's index advances: keys never repeat
      for i, v in new.items():
        if not np.all(np.isfinite(v)):
          raise NonFiniteError(f"non-finite probe value in layer {paths[i]}")
        samples[i].extend(float(x) for x in v[: max_probes - len(samples[i])])
        if _stats.rule_met(samples[i], rtol=rtol, atol=atol, min_probes=min_probes,
                           confidence=confidence):
          met[i] = True
          active[i] = False
        elif len(samples[i]) >= max_probes:
          active[i] = False
      if max_time is not None and time.perf_counter() - t_start > max_time:
        active[:] = False
      if bar is not None:
        bar.n = int(L - active.sum())
        bar.set_postfix({"probes": int(max(len(s) for s in samples)),
                         sampler.unit: sampler.cost, "converged": f"{int(met.sum())}/{L}"})
        bar.refresh()
  finally:
    if bar is not None:
      bar.close()
  return {p: TraceEstimate.from_samples(samples[i], num_params[p], met[i], atol=atol,
                                        confidence=confidence)
          for i, p in enumerate(paths)}


def layer_traces(loss_fn: LossFn | None, params: Any, batches: Any, *, key: jax.Array,
                 wrt: Sequence[str] | None = None, estimator: str = DEFAULT_ESTIMATOR,
                 curvature: str = "hessian", logits_fn: Callable | None = None,
                 output_loss: str = "xent", rtol: float = 0.05, atol: float = 0.0,
                 min_probes: int = 10, max_probes: int = 500, confidence: float = 0.95,
                 probes_per_step: int | None = None, sketch_size: int = DEFAULT_SKETCH,
                 mesh=None,
                 progress: bool = True, max_time: float | None = None, model=None,
                 model_input: Callable | None = None) -> dict[str, TraceEstimate]:
  """Per-layer curvature traces ``Tr(C_ii)``, each layer stopped on its own error.

  A layer stops when it has ``min_probes`` samples and the ``confidence`` Student-t
  interval on their mean has half-width ``<= rtol * |mean|`` or ``<= atol``, or at
  ``max_probes`` (see :mod:`amq_jax.hessian._stats` for the rule and the statuses).

  Args:
    loss_fn, params, batches, wrt, mesh: as in :func:`make_hvp` (the loss is the
      size-weighted mean over ``batches``). For 'ggn'/'fisher' ``loss_fn`` may be None; if
      given, it is checked once to equal ``output_loss`` on ``logits_fn`` (first batch).
    key: PRNG key; the result is a deterministic function of it (for any device count,
      up to float32 rounding of the batch sums).
    estimator: for ``curvature='hessian'``: ``'hutchpp'`` (default: 2.6x fewer HVPs than
      'per_layer' to 5% on ResNet20; see ``DEFAULT_ESTIMATOR``), ``'per_layer'``,
      ``'joint'`` or ``'adaptive'``. Not used by 'ggn'/'fisher', whose only estimator is
      the output-space probe.
    curvature: ``'hessian'`` (default; the paper's method), ``'ggn'`` (generalized
      Gauss-Newton ``J^T H_out J``) or ``'fisher'`` (Monte-Carlo Fisher): see
      :mod:`amq_jax.hessian._ggn`.
    logits_fn: ``logits_fn(params, batch) -> [N, C]``, required for 'ggn'/'fisher'
      (:func:`linen_logits_fn` for Linen classifiers).
    output_loss: ``'xent'`` (softmax cross-entropy, integer ``batch['label']``) or
      ``'mse'`` (``mean((logits - batch['label'])**2)`` over examples and outputs).
    rtol, atol, min_probes, max_probes, confidence: the stopping rule.
    probes_per_step: probes computed in one jitted step (one host sync per step; the rule
      is checked after each step, so a layer stops at a multiple of it, or at
      ``max_probes``). None: ``DEFAULT_BLOCK`` (8) for 'per_layer' and 'hutchpp', whose
      products of one step share the forward and backward pass (Hutch++'s sketch goes
      through the same program in steps of this many columns), 1 for the others. The
      compiled programs depend on it, not on ``min_probes``/``max_probes``.
    sketch_size: Hutch++'s sketch columns ``r`` per layer (``2 r`` HVPs up front).
    progress: a ``tqdm.auto`` bar of finished layers (on by default).
    max_time: wall-clock budget in seconds; after the step that exceeds it, every layer
      still running stops (status ``'max_probes'`` unless negative or near zero).
    model, model_input: 'ggn'/'fisher' only: an adapted model with layer hooks (Linen, NNX;
      ``model.apply(params, model.state, model_input(batch))`` must give ``logits_fn``'s
      logits, ``model_input`` defaulting to ``batch['image']``). Each probe's sample is
      then the mean of PER-EXAMPLE squared gradient norms (no cross-example variance), the
      per-example gradients computed from the hooks (:mod:`amq_jax.hessian._pex`); layers
      the hooks cannot serve fall back, with a warning, to the summed probe.

  Returns:
    ``{path: TraceEstimate}`` in ``wrt`` order.

  Raises:
    NonFiniteError: when the loss or a curvature-vector product is not finite; the
      message names the batch index(es) and layer(s).

  Example:
    >>> est = hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(0))
    >>> est['head/kernel']   # TraceEstimate(trace=... +- ..., probes=..., n=640, status=...)
    >>> ggn = hessian.layer_traces(None, params, batch, key=key, curvature='ggn',
    ...                            logits_fn=hessian.linen_logits_fn(model, variables))
  """
  if curvature not in CURVATURES:
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
  if curvature == "hessian" and estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if not (1 <= min_probes <= max_probes):
    raise ValueError(f"need 1 <= min_probes <= max_probes, got {min_probes}, {max_probes}")
  if probes_per_step is None:
    block = curvature == "hessian" and estimator in ("per_layer", "hutchpp")
    probes_per_step = DEFAULT_BLOCK if block else 1
  if probes_per_step < 1:
    raise ValueError("probes_per_step must be >= 1")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  run = functools.partial(_run, rtol=rtol, atol=atol, min_probes=min_probes,
                          max_probes=max_probes, confidence=confidence,
                          probes_per_step=probes_per_step, progress=progress,
                          max_time=max_time)
  if curvature != "hessian":
    from amq_jax.hessian import _ggn
    kw = dict(key=key, wrt=wrt, curvature=curvature, output_loss=output_loss,
              probes_per_step=probes_per_step, mesh=mesh)
    pb, sampler = _ggn.sampler(loss_fn, logits_fn, params, batches, model=model,
                               model_input=model_input, **kw)
    desc = f"{curvature} traces"
    try:
      return run(sampler, pb.wrt, pb.num_params, desc=desc)
    except _ggn._HookMisfit as e:
      warnings.warn(f"{curvature} traces: summed output-space probes, not per-example ones "
                    f"through the layer hooks: {e}", stacklevel=2)
      pb, sampler = _ggn.sampler(None, logits_fn, params, batches, **kw)
      return run(sampler, pb.wrt, pb.num_params, desc=desc)
  else:
    if loss_fn is None:
      raise ValueError("curvature='hessian' needs loss_fn(params, batch) -> mean loss")
    if estimator == "hutchpp" and sketch_size < 1:
      raise ValueError(f"sketch_size must be >= 1, got {sketch_size}")
    pb = Problem(loss_fn, params, batches, wrt=wrt, mesh=mesh)
    rkey = pb.replicate(key)
    if estimator in ("joint", "adaptive"):
      sampler = _FullHVPSampler(pb, rkey, estimator, probes_per_step)
    else:
      sampler = _BlockSampler(pb, rkey, probes_per_step,
                              sketch_size if estimator == "hutchpp" else 0)
    desc = f"hessian traces ({estimator})"
  return run(sampler, pb.wrt, pb.num_params, desc=desc)
