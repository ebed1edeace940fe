"""Per-layer Hessian traces by Hutchinson's estimator, with a per-layer stopping rule.

For a symmetric ``H`` and a Rademacher probe ``z`` (entries +-1 with equal probability),
``E[z^T H z] = Tr(H)`` and ``Var[z^T H z] = 2 (||H||_F^2 - sum_i H_ii^2)``
(Hutchinson 1990; Avron & Toledo 2011). HAWQ-V2 (Dong et al. 2020, Sec. 3.2) needs
``Tr(H_ii)`` for every diagonal block ``H_ii`` (layer ``i``'s kernel). Three estimators:

* ``'joint'``: one probe ``z = (z_1, ..., z_L)`` over every layer per HVP; layer ``i``'s
  sample is ``z_i^T (H z)_i = z_i^T H_ii z_i + sum_{j != i} z_i^T H_ij z_j``. The cross
  terms have mean zero (independent probes) but add variance. One HVP serves all layers.
* ``'per_layer'``: probe only layer ``i`` (zeros elsewhere), so ``(H z)_i = H_ii z_i``
  exactly: no cross-term variance, but one HVP per layer per probe.
* ``'adaptive'``: joint probes over only the layers that have not yet converged; once a
  layer stops, its cross terms stop adding variance to the others.

Probe ``j`` of layer ``i`` is drawn from ``fold_in(fold_in(key, i), j)``: independent
across layers (equal-shaped layers never share a probe) and the same for every estimator
and every device count, so results are reproducible for a given key.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax.hessian import _sharding
from amq_jax import _paths
from amq_jax.hessian._hvp import LossFn, Problem, cached_jit, loss_and_hvp

__all__ = ["TraceEstimate", "layer_traces", "estimates_to_json", "estimates_from_json",
           "ESTIMATORS", "DEFAULT_ESTIMATOR"]

ESTIMATORS = ("joint", "per_layer", "adaptive")
# Chosen from benchmarks/bench_hessian.py --quick (ResNet20, Fashion-MNIST batch 128,
# 2 shared CPU cores, 22 layers): to bring EVERY layer to 5% relative stderr, the
# projected cost (from per-probe sample variances) was about 1,800 HVPs for 'per_layer'
# vs about 10,200 for 'joint' and 8,200 for 'adaptive'. Off-diagonal blocks dominate the
# joint probe's variance (a layer needed 1,500-10,000 joint probes but only 3-200
# diagonal ones), so one HVP per layer per probe is ~5x cheaper overall. 'joint' remains
# the right choice for a quick rough ranking (every layer from each HVP).
DEFAULT_ESTIMATOR = "per_layer"


class TraceEstimate(NamedTuple):
  """Hutchinson estimate of one diagonal block's trace.

  Attributes:
    trace: mean of the per-probe values, an unbiased estimate of ``Tr(H_ii)``.
    stderr: standard error of that mean, ``std(samples, ddof=1) / sqrt(probes)``.
    probes: number of probes (samples).
    num_params: number of entries ``n_i`` of the block's variable (layer kernel or, for
      activation traces, one example's input activation).
    avg_trace: ``trace / num_params``, the HAWQ-V2 sensitivity weight.
    samples: ``np.ndarray [probes]`` of per-probe values.
    converged: whether the stopping rule was met (False: stopped at ``max_probes``).
  """
  trace: float
  stderr: float
  probes: int
  num_params: int
  avg_trace: float
  samples: np.ndarray
  converged: bool = True

  @classmethod
  def from_samples(cls, samples, num_params: int, converged: bool = True) -> "TraceEstimate":
    s = np.asarray(samples, np.float64).reshape(-1)
    k = s.size
    mean = float(s.mean()) if k else float("nan")
    se = float(s.std(ddof=1) / math.sqrt(k)) if k > 1 else float("inf")
    return cls(mean, se, int(k), int(num_params), mean / num_params, s, bool(converged))


def estimates_to_json(estimates: dict[str, TraceEstimate]) -> dict[str, dict]:
  """``{path: TraceEstimate}`` -> a dict of plain Python values (``json.dump``-able)."""
  return {p: {"trace": e.trace, "stderr": e.stderr, "probes": e.probes,
              "num_params": e.num_params, "avg_trace": e.avg_trace,
              "converged": bool(e.converged),
              "samples": [float(x) for x in np.asarray(e.samples).reshape(-1)]}
          for p, e in estimates.items()}


def estimates_from_json(data: dict | str) -> dict[str, TraceEstimate]:
  """Inverse of :func:`estimates_to_json`; ``data`` is the dict or its JSON text."""
  if isinstance(data, str):
    data = json.loads(data)
  return {p: TraceEstimate(float(d["trace"]), float(d["stderr"]), int(d["probes"]),
                           int(d["num_params"]), float(d["avg_trace"]),
                           np.asarray(d.get("samples", []), np.float64),
                           bool(d.get("converged", True)))
          for p, d in data.items()}


def probe(key, layer: int, index, shape, dtype):
  """Rademacher probe ``j = index`` of layer ``layer`` (the package-wide key schedule)."""
  k = jax.random.fold_in(jax.random.fold_in(key, layer), index)
  return jax.random.rademacher(k, shape, dtype)


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


def _build_step(loss_fn, wrt, shapes, dtypes, probes_per_step):
  # Closes over the loss and static shapes only (never over params or batches), so the
  # cached function holds no device memory.
  def f(w, params, batch):
    return loss_fn(_paths.merge(params, w), batch)

  def one(params, w, batch, key, counts, mask, p):
    z = {path: mask[i] * probe(key, i, counts[i] + p, shapes[i], dtypes[i])
         for i, path in enumerate(wrt)}
    loss, hz = loss_and_hvp(lambda w_: f(w_, params, batch), w, z)
    vals = jnp.stack([jnp.vdot(z[q], hz[q]).astype(jnp.float32) for q in wrt])
    fin = jnp.stack([jnp.all(jnp.isfinite(hz[q])) for q in wrt])
    return vals, fin, loss

  def step(params, w, batch, weight, key, counts, mask):
    if probes_per_step == 1:
      vals, fin, loss = one(params, w, batch, key, counts, mask, 0)
      vals, fin = vals[None], fin[None]
    else:
      # lax.map (a scan), not vmap: on CPU a batch of HVPs is no faster than a loop.
      vals, fin, loss = jax.lax.map(
          lambda p: one(params, w, batch, key, counts, mask, p),
          jnp.arange(probes_per_step))
      loss = loss[0]
    return weight * vals, jnp.all(fin, axis=0), loss

  return step


def _done(samples: list, rtol: float, atol: float, min_probes: int) -> bool:
  k = len(samples)
  if k < max(min_probes, 2):
    return False
  s = np.asarray(samples, np.float64)
  se = s.std(ddof=1) / math.sqrt(k)
  return bool(se <= rtol * abs(s.mean()) or se <= atol)


def layer_traces(loss_fn: LossFn, params: Any, batches: Any, *, key: jax.Array,
                 wrt: Sequence[str] | None = None, estimator: str = DEFAULT_ESTIMATOR,
                 rtol: float = 0.05, atol: float = 0.0, min_probes: int = 10,
                 max_probes: int = 500, probes_per_step: int = 1, mesh=None,
                 progress: bool = False, max_time: float | None = None
                 ) -> dict[str, TraceEstimate]:
  """Hutchinson estimates of ``Tr(H_ii)`` for each layer, each stopped on its own error.

  A layer stops when ``probes >= min_probes`` and its standard error
  ``s = std(samples, ddof=1) / sqrt(probes)`` satisfies ``s <= rtol * |trace|`` or
  ``s <= atol`` (the absolute floor matters for traces near zero or negative; a block
  that is exactly zero stops at ``min_probes`` with ``s = 0``), or when it reaches
  ``max_probes`` (then ``converged=False``).

  Args:
    loss_fn, params, batches, wrt, mesh: as in :func:`make_hvp` (the loss is the
      size-weighted mean over ``batches``).
    key: PRNG key; the result is a deterministic function of it (for any device count,
      up to float32 rounding of the batch sums).
    estimator: ``'joint'``, ``'per_layer'`` or ``'adaptive'`` (see the module docs).
    rtol, atol, min_probes, max_probes: the stopping rule above.
    probes_per_step: probes computed in one jitted step (one host sync per step).
    progress: show a tqdm bar of converged layers.
    max_time: wall-clock budget in seconds; after the step that exceeds it, every layer
      still running stops with ``converged=False``.

  Returns:
    ``{path: TraceEstimate}`` in ``wrt`` order.

  Raises:
    FloatingPointError: when the loss or a Hessian-vector product is not finite; the
      message names the batch index(es) and layer(s).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if not (1 <= min_probes <= max_probes):
    raise ValueError(f"need 1 <= min_probes <= max_probes, got {min_probes}, {max_probes}")
  if probes_per_step < 1:
    raise ValueError("probes_per_step must be >= 1")
  pb = Problem(loss_fn, params, batches, wrt=wrt, mesh=mesh)
  L = len(pb.wrt)
  step = _make_step(pb, probes_per_step)
  key = pb.replicate(key)
  samples: list[list[float]] = [[] for _ in range(L)]
  active = np.ones(L, bool)
  converged = np.zeros(L, bool)
  count = np.zeros(L, np.int32)  # probes drawn per layer (the probe index schedule)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=L, desc=f"hessian traces ({estimator})", unit="layer")
  hvps = 0
  t_start = time.perf_counter()

  def run(mask, counts):
    """Dispatches one probe step over every batch; nothing is fetched here."""
    mask_d = pb.replicate(mask.astype(np.float32))
    counts_d = pb.replicate(counts.astype(np.int32))
    total, fins, losses = None, [], []
    for batch, weight in zip(pb.batches, pb.weights):
      vals, fin, loss = step(pb.params, pb.w, batch, weight, key, counts_d, mask_d)
      total = vals if total is None else total + vals
      fins.append(fin)
      losses.append(loss)
    return total, fins, losses

  def check(fins, losses, layers):
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
      raise FloatingPointError("; ".join(msg) + " (check the checkpoint, learning rate or "
                               "inputs; BatchNorm statistics must be finite)")

  try:
    while active.any():
      if estimator == "per_layer":
        pending = []
        for i in np.flatnonzero(active):
          mask = np.zeros(L, bool)
          mask[i] = True
          pending.append((i, run(mask, count)))
        hvps += len(pending) * probes_per_step
        fetched = _sharding.to_host([p[1] for p in pending])  # one sync for the step
        new = {}
        for (i, _), (vals, fins, losses) in zip(pending, fetched):
          check(fins, losses, [i])
          new[i] = vals[:, i]
      else:
        mask = active if estimator == "adaptive" else np.ones(L, bool)
        vals, fins, losses = _sharding.to_host(run(mask, count))
        hvps += probes_per_step
        check(fins, losses, list(np.flatnonzero(mask)))
        new = {i: vals[:, i] for i in np.flatnonzero(active)}
      count += probes_per_step  # every layer's index advances: keys never repeat
      for i, v in new.items():
        if not np.all(np.isfinite(v)):
          raise FloatingPointError(f"non-finite probe value z^T H z in layer {pb.wrt[i]}")
        samples[i].extend(float(x) for x in v[: max_probes - len(samples[i])])
        if _done(samples[i], rtol, atol, min_probes):
          converged[i] = True
          active[i] = False
        elif len(samples[i]) >= max_probes:
          active[i] = False
      if max_time is not None and time.perf_counter() - t_start > max_time:
        active[:] = False
      if bar is not None:
        bar.n = int(L - active.sum())
        bar.set_postfix(probes=int(max(len(s) for s in samples)), hvps=hvps,
                        converged=f"{int(converged.sum())}/{L}")
        bar.refresh()
  finally:
    if bar is not None:
      bar.close()
  return {p: TraceEstimate.from_samples(samples[i], pb.num_params[p], converged[i])
          for i, p in enumerate(pb.wrt)}
