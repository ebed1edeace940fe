"""Stage 'analyze': per-layer Hessian traces and top eigenvalues of the FP32 model."""
from __future__ import annotations

import os
import time

import jax

from amq_jax import hessian
from amq_jax.pipeline._common import Context, read_json, write_json


def analyze(ctx: Context, *, force: bool = False) -> dict:
  """Writes ``analyze/traces.json`` and ``analyze/eigenvalues.json`` (+ a spectrum figure).

  * traces: Hutchinson per-layer ``Tr(H_l)`` with standard errors (``cfg.hessian``);
  * eigenvalues: the top eigenvalue of every layer's block (for the HAWQ-V1 baseline) and
    the top ``cfg.hessian.eig_k`` of the layers in ``cfg.hessian.eig_layers`` (the seed's
    Fig. 1: is the top eigenvalue an outlier?).

  Each file is written atomically once complete; an existing one is reused (the stage is
  skipped) unless ``force``.
  """
  hc = ctx.cfg.hessian
  wd = ctx.wd
  out = {}
  batches = None
  loss_fn = hessian.linen_loss_fn(ctx.model, ctx.variables)
  params = ctx.params

  def get_batches():
    nonlocal batches
    if batches is None:
      batches = ctx.analysis_batches(hc.num_examples, hc.batch_size)
    return batches

  if force or not os.path.isfile(wd.traces):
    t0 = time.time()
    est = hessian.layer_traces(
        loss_fn, params, get_batches(), key=jax.random.key(hc.seed), wrt=ctx.kernel_paths,
        estimator=hc.estimator, rtol=hc.rtol, min_probes=hc.min_probes,
        max_probes=hc.max_probes, progress=ctx.progress)
    seconds = time.time() - t0
    write_json(wd.traces, {
        "estimator": hc.estimator, "rtol": hc.rtol, "num_examples": len(get_batches()) * hc.batch_size,
        "seconds": seconds, "fp32_source": ctx.fp32_source,
        "layers": hessian.estimates_to_json(est)})
  out["traces"] = read_json(wd.traces)

  if force or not os.path.isfile(wd.eigenvalues):
    t0 = time.time()
    key = jax.random.key(hc.seed + 1)
    eig_batches = get_batches()[: max(1, hc.eig_batches)]
    top1 = {}
    layers = ctx.kernel_paths
    it = layers
    if ctx.progress:
      from tqdm.auto import tqdm
      it = tqdm(layers, desc="top eigenvalue per layer", unit="layer", dynamic_ncols=True)
    for i, path in enumerate(it):
      r = hessian.top_eigenvalues(loss_fn, params, eig_batches, key=jax.random.fold_in(key, i),
                                  k=1, layer=path, method=hc.top1_method, tol=hc.eig_tol,
                                  max_iters=hc.top1_iters)
      top1[path] = {"value": float(r.values[0]), "iterations": int(r.iterations),
                    "converged": bool(r.converged), "residual": float(r.residuals[0])}
    spectra = {}
    for j, name in enumerate(hc.eig_layers):
      path = name if name.endswith("/kernel") else name + "/kernel"
      if path not in layers:
        raise KeyError(f"hessian.eig_layers names {name!r}, not a quantizable layer; "
                       f"valid layers: {[p[:-7] for p in layers]}")
      n = ctx.param_counts[layers.index(path)]
      r = hessian.top_eigenvalues(loss_fn, params, eig_batches,
                                  key=jax.random.fold_in(key, 1000 + j), k=min(hc.eig_k, n),
                                  layer=path, method="lanczos", tol=hc.eig_tol,
                                  max_iters=hc.spectrum_iters)
      spectra[path] = {"values": [float(v) for v in r.values], "iterations": int(r.iterations),
                       "residuals": [float(x) for x in r.residuals],
                       "converged": bool(r.converged),
                       "top_over_second": float(r.values[0] / r.values[1]) if len(r.values) > 1 else None}
    write_json(wd.eigenvalues, {"top1": top1, "spectra": spectra,
                                "num_examples": len(eig_batches) * hc.batch_size,
                                "seconds": time.time() - t0})
  out["eigenvalues"] = read_json(wd.eigenvalues)
  fig = wd.path("analyze", "eigenvalues.png")
  if force or not os.path.isfile(fig):
    from amq_jax.report import plot_spectra
    plot_spectra(out["eigenvalues"]["spectra"], fig)
  return out
