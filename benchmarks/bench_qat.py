"""QAT step time / FP32 step time, side by side in one process (goal <= 1.3).

  python benchmarks/bench_qat.py [--config configs/resnet20_fmnist.py] [--rounds 5] [--out F]

The QAT step fake-quantizes every Conv/Dense kernel per output channel (mixed 2/3/4/8 bits)
and every layer's input activation at 8 bits, with straight-through gradients. The two
steps are timed in alternating rounds so that machine load affects both alike; the ratio
is the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax import adapters, quant, train
from amq_jax.config import load_config
from amq_jax.data import fashion_mnist
from amq_jax.pipeline import xent_train_loss


def _time(step, state, batches, n):
  t = time.perf_counter()
  for i in range(n):
    state, m = step(state, batches[i % len(batches)])
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / n, state


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--config", default="configs/resnet20_fmnist.py")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--out")
  args = ap.parse_args()
  cfg = load_config(args.config)
  module = train.build_model(cfg)
  shape = train.input_shape(cfg)
  variables = train.init_variables(module, shape, seed=0)
  model = adapters.from_linen(module, variables, jnp.zeros((1,) + shape))
  widths = [2, 3, 4, 8]
  bits = quant.BitConfig({l: {"w": widths[i % 4], "a": 8}
                          for i, l in enumerate(model.layers.names)})
  ds = fashion_mnist.load("train", limit=cfg.train.batch_size * 4)
  ranges = quant.calibrate_model(model, [{"image": ds.images[:256]}], bits)
  mesh = train.data_mesh()
  batches = [train.shard_batch(b, mesh) for b in fashion_mnist.batches(ds, cfg.train.batch_size)]
  tx = train.make_optimizer(cfg, 1000)
  fp32 = lambda p, s, x, *, train=False: model.apply(p, s, x, train=train)  # noqa: E731
  qat = quant.quantize_model(model, bits, act_ranges=ranges)
  steps = {"fp32": train.make_step(xent_train_loss(fp32), tx),
           "qat": train.make_step(xent_train_loss(qat), tx)}
  states = {k: train.replicate(train.init_state(model.params, model.state, tx), mesh)
            for k in steps}
  for k in steps:  # compile
    _, states[k] = _time(steps[k], states[k], batches, 2)
  per = {k: [] for k in steps}
  for _ in range(args.rounds):
    for k in steps:
      t, states[k] = _time(steps[k], states[k], batches, args.steps)
      per[k].append(t)
  ratio = float(np.median(np.array(per["qat"]) / np.array(per["fp32"])))
  res = {"model": cfg.model, "batch_size": cfg.train.batch_size, "devices": jax.device_count(),
         "fp32_step_ms": 1e3 * float(np.median(per["fp32"])),
         "qat_step_ms": 1e3 * float(np.median(per["qat"])), "qat_over_fp32": ratio}
  print(f"| {cfg.model} | batch {cfg.train.batch_size} | FP32 step {res['fp32_step_ms']:.0f} ms | "
        f"QAT step {res['qat_step_ms']:.0f} ms | QAT/FP32 {ratio:.2f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
