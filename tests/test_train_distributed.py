"""Multi-process (multi-host) training: 2 processes x 2 CPU devices on localhost.

Each worker runs ``jax.distributed.initialize`` with gloo CPU collectives and calls the same
``train.fit`` a single process would: the in-memory source yields the global batch on every
process, ``fit`` keeps this process's slice (``process_slice``) and assembles the global
array with ``jax.make_array_from_process_local_data``; Orbax checkpoints are written by both.
The trained parameters must equal those of one process over 4 devices, to float32 rounding,
and a second call resumes from the shared checkpoints.

Run as a worker: ``python tests/test_train_distributed.py WORKER_ID PORT WORKDIR OUT_NPZ``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

SECTION = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=1e-4,
               warmup_steps=1, batch_size=32, num_steps=4, checkpoint_every_steps=2,
               log_every_steps=2)


def _problem():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from amq_jax import train
  from amq_jax.data import InMemorySource, fashion_mnist

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Dense(8)(x.reshape(x.shape[0], -1))
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Dense(10)(nn.relu(x))

  model = Net()
  v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  src = InMemorySource(fashion_mnist.load("train", limit=256), augment=True)
  xent = train.classification_loss(train.linen_apply_fn(model))

  def loss_fn(params, state, batch, *, train=True):
    loss, (metrics, new_state) = xent(params, state, batch, train=train)
    # The global batch the step saw: each process must add ITS slice, not the whole batch.
    return loss, (dict(metrics, examples=jnp.float32(batch["image"].shape[0])), new_state)
  return loss_fn, v, src


def _fit(workdir, mesh=None):
  from amq_jax import train
  loss_fn, v, src = _problem()
  return train.fit(loss_fn, v["params"], {"batch_stats": v["batch_stats"]}, src, SECTION,
                   workdir=workdir, seed=5, progress=False, mesh=mesh)


def _flat(tree) -> dict:
  import jax
  from amq_jax._sharding import to_host
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(to_host(tree))[0]}


def _worker(pid: int, port: int, workdir: str, out: str):
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  ts, res = _fit(workdir)
  assert res["train_metrics"]["examples"] == SECTION["batch_size"], res["train_metrics"]
  again, res2 = _fit(workdir)  # everything checkpointed: restores, trains nothing
  assert res2["losses"] == [] and int(again.step) == SECTION["num_steps"]
  flat = _flat(ts.variables)
  for k, x in _flat(again.variables).items():
    np.testing.assert_array_equal(x, flat[k])
  np.savez(out, devices=len(jax.devices()), local=len(jax.local_devices()), **flat)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  import jax

  from amq_jax import train
  ref, res = _fit(str(tmp_path / "single"), mesh=train.data_mesh(jax.devices()[:4]))
  assert res["train_metrics"]["examples"] == SECTION["batch_size"]
  ref = _flat(ref.variables)

  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  work = str(tmp_path / "multi")
  outs = [str(tmp_path / f"w{i}.npz") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port),
                             work, outs[i]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-3000:]}"
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]
  for out in outs:
    got = np.load(out)
    assert int(got["devices"]) == 4 and int(got["local"]) == 2
    assert set(ref) <= set(got.files)
    for k, x in ref.items():
      np.testing.assert_allclose(got[k], x, rtol=2e-5, atol=2e-6, err_msg=k)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
