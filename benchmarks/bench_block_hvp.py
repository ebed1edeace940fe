"""Restricted (one-layer) HVPs of the shipped ResNet20: k products in one call vs k calls.

    python benchmarks/bench_block_hvp.py [--layers 0,4,12,21] [--k 8]

One batch of 128 Fashion-MNIST training images; for each layer (indices into
``_paths.quantizable_paths``), the minimum of 3 warm calls of: one product; ``k`` products
unrolled in one program (what ``layer_traces`` runs for 'per_layer'/'hutchpp'); ``k``
products under ``vmap``. Prints per-product cost relative to ``k`` separate calls and the
largest relative difference between the three (they must agree).
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shipped import shipped_resnet20  # noqa: E402
from bench_curvature import _data  # noqa: E402

from amq_jax import _paths, hessian  # noqa: E402
from amq_jax.hessian._hvp import loss_and_hvp  # noqa: E402


def _time(fn, *args, reps=3):
  """(first call incl. compile, min of ``reps`` warm calls) in seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  warm = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warm.append(time.perf_counter() - t0)
  return first, min(warm)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", default="0,4,12,21")
  ap.add_argument("--k", type=int, default=8)
  args = ap.parse_args(argv)
  model, variables = shipped_resnet20(ap)
  params = variables["params"]
  batch = _data(128)
  loss_fn = hessian.linen_loss_fn(model, variables)
  paths = _paths.quantizable_paths(params)
  k = args.k
  print(f"load average before {os.getloadavg()[0]:.2f}")
  full = jax.jit(lambda p, b, v: loss_and_hvp(lambda p_: loss_fn(p_, b), p, v)[1])
  print(f"full HVP: {_time(full, params, batch, params)[1]:.3f} s")
  for li in (int(x) for x in args.layers.split(",")):
    path = paths[li]
    wl = _paths.select(params, [path])[path]

    def f(p, w, b, v, path=path):
      return loss_and_hvp(lambda w_: loss_fn(_paths.merge(p, {path: w_}), b), w, v)[1]
    one = jax.jit(f)
    unrolled = jax.jit(lambda p, w, b, V, f=f: jnp.stack([f(p, w, b, V[i]) for i in range(k)]))
    vmapped = jax.jit(lambda p, w, b, V, f=f: jax.vmap(lambda v: f(p, w, b, v))(V))
    V = jax.random.normal(jax.random.key(0), (k,) + wl.shape)
    c1, t1 = _time(one, params, wl, batch, V[0])
    cu, tu = _time(unrolled, params, wl, batch, V)
    cv, tv = _time(vmapped, params, wl, batch, V)
    ref = np.stack([np.asarray(one(params, wl, batch, V[i])) for i in range(k)])
    err = max(np.abs(np.asarray(unrolled(params, wl, batch, V)) - ref).max(),
              np.abs(np.asarray(vmapped(params, wl, batch, V)) - ref).max()) / np.abs(ref).max()
    print(f"{path} ({wl.size} params): one product {t1:.3f} s (compile {c1:.1f} s) | "
          f"{k} unrolled {tu:.3f} s = {tu / (k * t1):.2f} of {k} calls (compile {cu:.1f} s) | "
          f"{k} under vmap {tv:.3f} s = {tv / (k * t1):.2f} (compile {cv:.1f} s) | "
          f"max rel diff {err:.1e}", flush=True)
  print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
