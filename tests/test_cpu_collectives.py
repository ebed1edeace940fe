"""Several CPU devices: multi-device programs run many times in a row must not deadlock.

jaxlib's XLA:CPU deadlocks when multi-device programs with an all-reduce are dispatched
faster than they run (``amq_jax/_sharding.py``, module docstring); the package waits for
each such call on CPU (``serial_on_cpu``). Each check runs in a subprocess with 2 CPU
devices and XLA's rendezvous time-out cut from 40 s to 10 s, so that a deadlock ends the
worker (XLA aborts the process) instead of the suite. Without the wait these workers abort
(measured: the 4,000-step chain of tiny training steps below, within seconds of its start).

Run as a worker: ``python tests/test_cpu_collectives.py CHECK``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

DEVICES = 2
TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=10"


def _mlp_problem():
  import flax.linen as nn
  import jax
  import numpy as np

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.Dense(3, name="head")(nn.tanh(nn.Dense(6, name="d1")(x)))

  x = np.asarray(jax.random.normal(jax.random.key(1), (16, 5)))
  y = np.arange(16, dtype=np.int32) % 3
  model = Net()
  return model, model.init(jax.random.key(0), x[:1]), {"image": x, "label": y}


def _train_chain() -> None:
  """4,000 tiny training steps, each taking the last one's state, none waited for."""
  import jax
  import optax
  from amq_jax import train
  model, variables, batch = _mlp_problem()
  mesh = train.data_mesh()
  tx = optax.sgd(1e-3)
  step = train.make_train_step(train.linen_apply_fn(model), tx)
  ts = train.replicate(train.create_state(variables, tx), mesh)
  b = train.shard_batch(dict(batch, mask=batch["label"] * 0 + 1.0), mesh)
  for _ in range(4000):
    ts, _ = step(ts, b)
  assert int(jax.device_get(ts.step)) == 4000


def _hvp_rounds() -> None:
  """The estimators' pattern: many independent HVPs in a row, results read at the end."""
  import jax
  import numpy as np
  from amq_jax import hessian
  from amq_jax.hessian import _hvp
  model, variables, batch = _mlp_problem()
  pb = _hvp.Problem(hessian.linen_loss_fn(model, variables), variables["params"], batch,
                    wrt=None, mesh=None)
  step = _hvp.cached_jit("test_loss_sum", pb, (), lambda: lambda w, b: jax.tree.map(
      lambda a: (a * b["image"].sum()).sum(), w))
  outs = [step(pb.w, pb.batches[0]) for _ in range(4000)]
  assert all(np.isfinite(float(v)) for o in outs[-3:] for v in jax.tree.leaves(o))


CHECKS = {"train_chain": _train_chain, "hvp_rounds": _hvp_rounds}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_multi_device_cpu_programs_in_a_row_do_not_deadlock(check):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + TIMEOUT_FLAG).strip())
  r = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True,
                     text=True, timeout=300)
  tail = "\n".join(line for line in (r.stdout + r.stderr).splitlines()
                   if not line.lstrip().startswith("@"))[-2000:]
  assert r.returncode == 0 and "ok" in r.stdout, tail


if __name__ == "__main__":
  import jax
  jax.config.update("jax_num_cpu_devices", DEVICES)
  assert len(jax.devices()) == DEVICES
  CHECKS[sys.argv[1]]()
  print("ok", sys.argv[1])
