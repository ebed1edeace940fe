"""Training-step throughput (images/s) of a config's FP32 step, jitted, all local devices.

  python benchmarks/bench_train.py --config configs/resnet20_fmnist.py [--steps 30] [--out F]

Times ``--steps`` steps after two warm-up (compile) steps, blocking on the result of each.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from amq_jax import train
from amq_jax.config import load_config
from amq_jax.data import fashion_mnist


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--config", default="configs/resnet20_fmnist.py")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--out")
  args, overrides = ap.parse_known_args()
  cfg = load_config(args.config, [o.removeprefix("--config.") for o in overrides])
  model = train.build_model(cfg)
  variables = train.init_variables(model, train.input_shape(cfg), seed=0)
  tx = train.make_optimizer(cfg, 1000)
  mesh = train.data_mesh()
  state = train.replicate(train.create_state(variables, tx), mesh)
  step = train.make_train_step(train.linen_apply_fn(model), tx)
  ds = fashion_mnist.load("train", limit=cfg.train.batch_size * 4)
  batches = [train.shard_batch(b, mesh) for b in fashion_mnist.batches(ds, cfg.train.batch_size)]
  for b in batches[:2]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  times = []
  for i in range(args.steps):
    t = time.perf_counter()
    state, m = step(state, batches[i % len(batches)])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  res = {"config": args.config, "model": cfg.model, "batch_size": cfg.train.batch_size,
         "devices": jax.device_count(), "platform": jax.devices()[0].platform,
         "machine": platform.processor() or platform.machine(),
         "median_step_s": med, "images_per_s": cfg.train.batch_size / med}
  print(f"| {cfg.model} | batch {cfg.train.batch_size} | {res['devices']} {res['platform']} device(s) "
        f"| median step {med * 1e3:.1f} ms | {res['images_per_s']:.0f} images/s |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
