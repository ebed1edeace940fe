"""Multi-process (multi-host) Hessian traces: 2 processes x 2 CPU devices on localhost.

Each worker process runs ``jax.distributed.initialize`` with gloo CPU collectives, builds
the default mesh over all 4 global devices, feeds ITS HALF of the global batch
(``shard_batch`` -> ``jax.make_array_from_process_local_data``) and runs the same
``layer_traces`` call as a single process would. The per-probe samples must equal the
single-process result computed here, to float32 rounding.

Run as a worker: ``python tests/test_hessian_distributed.py WORKER_ID PORT OUT_JSON``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

GLOBAL_BATCH = 16
KW = dict(estimator="joint", min_probes=6, max_probes=6)


def _problem():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.tanh(nn.Dense(6, name="d1")(x))
      return nn.Dense(3, name="head")(x)

  kx, kp = jax.random.split(jax.random.key(0))
  x = np.asarray(jax.random.normal(kx, (GLOBAL_BATCH, 5), jnp.float32))
  y = np.arange(GLOBAL_BATCH, dtype=np.int32) % 3
  model = Net()
  variables = model.init(kp, x[:1])
  return model, variables, {"image": x, "label": y}


def _worker(pid: int, port: int, out: str):
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  from amq_jax import hessian
  model, variables, batch = _problem()
  half = GLOBAL_BATCH // 2
  local = {k: v[pid * half:(pid + 1) * half] for k, v in batch.items()}  # this host's slice
  loss_fn = hessian.linen_loss_fn(model, variables)
  est = hessian.layer_traces(loss_fn, variables["params"], local, key=jax.random.key(3), **KW)
  with open(out, "w") as f:
    json.dump({"devices": len(jax.devices()), "local": len(jax.local_devices()),
               "estimates": hessian.estimates_to_json(est)}, f)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  import jax
  from jax.sharding import Mesh

  from amq_jax import hessian
  model, variables, batch = _problem()
  loss_fn = hessian.linen_loss_fn(model, variables)
  ref = hessian.layer_traces(loss_fn, variables["params"], batch, key=jax.random.key(3),
                             mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)), **KW)

  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  outs = [str(tmp_path / f"w{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port),
                             outs[i]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=150)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-3000:]}"
  for out in outs:
    got = json.load(open(out))
    assert got["devices"] == 4 and got["local"] == 2
    back = hessian.estimates_from_json(got["estimates"])
    assert list(back) == list(ref)
    for p in ref:
      np.testing.assert_allclose(back[p].samples, ref[p].samples, rtol=2e-5, atol=1e-6)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
