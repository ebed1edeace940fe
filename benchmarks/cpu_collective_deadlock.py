"""Does this jaxlib's XLA:CPU still deadlock on queued multi-device programs? (plain JAX)

The reason for ``amq_jax._sharding.serial_on_cpu``. One tiny jitted program with an
all-reduce (a batch-sharded input reduced into a replicated output) is called ``--calls``
times on ``--devices`` simulated CPU devices, in one of three ways:

* ``independent``: every call on the same inputs, none waited for;
* ``chain``: every call takes the last call's output (a training loop), none waited for;
* ``wait``: independent calls, each waited for (``block_until_ready``): what amq-jax does.

Each mode runs in its own process with XLA's rendezvous time-out cut to ``--timeout`` s; a
deadlock makes XLA abort that process ("Termination timeout for all reduce ... Expected 2
threads to join the rendezvous, but only 1 of them arrived"). Prints one line per mode::

    python benchmarks/cpu_collective_deadlock.py --devices 2 --calls 4000

Measured 2026-12-01 (jaxlib 0.10.2, 2 cores): ``independent`` and ``chain`` abort on 2 and
on 8 devices, ``wait`` finishes. If a later jaxlib finishes all three, the wait can go.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _child(mode: str, devices: int, calls: int) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  jax.config.update("jax_num_cpu_devices", devices)
  mesh = Mesh(np.array(jax.devices()), ("d",))
  rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))
  f = jax.jit(lambda w, x: w * 0.999 + 1e-3 * jnp.tanh(x @ w).sum(0)[:, None],
              out_shardings=rep)
  w = jax.device_put(np.eye(8, dtype=np.float32), rep)
  x = jax.device_put(np.ones((8 * devices, 8), np.float32), split)
  outs = []
  for _ in range(calls):
    if mode == "chain":
      w = f(w, x)
    else:
      outs.append(f(w, x))
      if mode == "wait":
        outs[-1].block_until_ready()
  jax.block_until_ready((w, outs))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=2)
  ap.add_argument("--calls", type=int, default=4000)
  ap.add_argument("--timeout", type=int, default=10, help="XLA's rendezvous time-out, s")
  ap.add_argument("--child", choices=("independent", "chain", "wait"), help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    _child(a.child, a.devices, a.calls)
    return
  import jax
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_cpu_collective_call_terminate_timeout_seconds={a.timeout}").strip())
  print(f"jax {jax.__version__}, {a.devices} CPU devices, {a.calls} calls, "
        f"{os.cpu_count()} cores")
  for mode in ("independent", "chain", "wait"):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", mode, "--devices",
                        str(a.devices), "--calls", str(a.calls)], env=env,
                       capture_output=True, text=True)
    dead = r.returncode != 0 and "rendezvous" in r.stderr
    what = "DEADLOCK (XLA aborted)" if dead else ("finished" if r.returncode == 0
                                                 else f"failed, exit {r.returncode}")
    print(f"{mode:12s} {what} after {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
