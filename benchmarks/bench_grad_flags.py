"""Why is ``jax.grad`` of ResNet20 slower than PyTorch's on this CPU? XLA variants side by side.

Each variant (a set of ``XLA_FLAGS``, or a layout/precision change) runs in its own fresh
process (XLA reads its flags once per process), on the shipped ResNet20, one batch of
Fashion-MNIST images (default 128), shipped weights: compile once, then the median of
``--reps`` warm gradient calls (``block_until_ready``). The variants run interleaved
``--rounds`` times (A B C A B C ...) so that a drift of the machine's load hits all of them
alike; the figure quoted is the median over rounds. With torch importable (the benchmark
environment, ``benchmarks/requirements-bench.txt``), the PyTorch twin's gradient
(``torch_reference.py``, ``torch.set_num_threads(2)``) runs in the same rounds.

    python benchmarks/bench_grad_flags.py --out benchmarks/grad_flags.json
    python benchmarks/bench_grad_flags.py --quick        # 2 rounds, 3 reps: checks it runs

Prints a Markdown table: seconds per gradient and the ratio to PyTorch (and to the default
XLA build) for every variant; JSON with the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (XLA_FLAGS, extra environment, note)
VARIANTS = {
    "xla default": ("", {}, "jaxlib as shipped"),
    "no eigen threads": ("--xla_cpu_multi_thread_eigen=false", {},
                         "Eigen convolutions on one thread"),
    "onednn": ("--xla_cpu_use_onednn=true", {}, "oneDNN rewrites (dot/conv) where supported"),
    "onednn custom call": ("--xla_cpu_experimental_onednn_custom_call=true "
                           "--xla_cpu_use_onednn=true", {}, "oneDNN as custom calls"),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", {}, "XNNPACK for dots/convs where supported"),
    "fast math": ("--xla_cpu_enable_fast_math=true", {}, "relaxed float semantics"),
    "legacy runtime": ("--xla_cpu_use_thunk_runtime=false", {}, "pre-thunk CPU runtime"),
    "xla on 1 core": ("", {"AMQ_BENCH_CORES": "0"}, "the default build pinned to one core: "
                      "how much of the second core XLA uses"),
    "2 host devices + batch sharding": (
        "--xla_force_host_platform_device_count=2", {"AMQ_BENCH_SHARD": "1"},
        "half the batch per core (data parallel over a 2-device CPU mesh)"),
    "bf16 matmul precision": ("", {"JAX_DEFAULT_MATMUL_PRECISION": "bfloat16"},
                              "lower-precision convs (changes numerics)"),
}


def _worker(args) -> None:
  """Runs in a child process: time one gradient variant, print JSON on the last line."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, os.path.dirname(HERE))
  from amq_jax import models, train
  from amq_jax.data import fashion_mnist

  ds = fashion_mnist.load("train", limit=args.batch)
  x = jnp.asarray(ds.images[:args.batch], jnp.float32)
  y = jnp.asarray(ds.labels[:args.batch])
  if args.worker == "torch":
    import numpy as np
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, HERE)
    from torch_reference import torch_model_like
    torch.set_num_threads(int(os.environ.get("AMQ_BENCH_TORCH_THREADS", "2")))
    path = train.shipped_checkpoint("resnet20_fmnist")
    variables = train.restore_variables(path)
    flax_model = models.get_model("resnet20", num_classes=10)
    tm = torch_model_like(flax_model, variables).eval()
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(np.asarray(y)).long()
    params = [p for p in tm.parameters() if p.requires_grad]

    def step():
      loss = F.cross_entropy(tm(xt), yt)
      return torch.autograd.grad(loss, params)
    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
  else:
    path = train.shipped_checkpoint("resnet20_fmnist")
    variables = jax.tree.map(jnp.asarray, train.restore_variables(path))
    model = models.get_model("resnet20", num_classes=10)
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p, state, x, y):
      logits = model.apply({"params": p, **state}, x, train=False)
      onehot = jax.nn.one_hot(y, logits.shape[-1])
      return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
    g = jax.jit(jax.grad(loss_fn))
    if os.environ.get("AMQ_BENCH_SHARD"):
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      mesh = Mesh(jax.devices(), ("batch",))
      x = jax.device_put(x, NamedSharding(mesh, P("batch")))
      y = jax.device_put(y, NamedSharding(mesh, P("batch")))
      variables = jax.device_put(variables, NamedSharding(mesh, P()))
      state = {k: v for k, v in variables.items() if k != "params"}
    t0 = time.perf_counter()
    jax.block_until_ready(g(variables["params"], state, x, y))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(g(variables["params"], state, x, y))
      times.append(time.perf_counter() - t0)
  print(json.dumps({"median_s": statistics.median(times), "min_s": min(times),
                    "first_call_s": compile_s}))


def _run(name: str, args) -> dict | None:
  env = dict(os.environ)
  if name == "torch":
    flags, extra = "", {}
  elif name == "torch 1 thread":
    flags, extra = "", {"AMQ_BENCH_TORCH_THREADS": "1"}
  else:
    flags, extra, _ = VARIANTS[name]
  env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags) if x)
  env.update(extra)
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, __file__, "--worker",
         "torch" if name.startswith("torch") else "jax",
         "--batch", str(args.batch), "--reps", str(args.reps)]
  if "AMQ_BENCH_CORES" in extra:
    cmd = ["taskset", "-c", extra["AMQ_BENCH_CORES"]] + cmd
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  if p.returncode != 0:
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
    return {"error": tail[0][:300]}
  return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=None)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--variants", default=",".join(VARIANTS),
                  help="comma-separated names from: " + ", ".join(VARIANTS))
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    return _worker(args)
  if args.quick:
    args.rounds, args.reps = 2, 3
  names = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
  if not args.no_torch:
    try:
      import torch  # noqa: F401
      names = ["torch", "torch 1 thread"] + names
    except ImportError:
      print("torch is not importable here: PyTorch column skipped "
            "(see benchmarks/requirements-bench.txt)", file=sys.stderr)
  load_before = os.getloadavg()
  t_start = time.time()
  runs: dict[str, list] = {n: [] for n in names}
  for r in range(args.rounds):
    for n in names:
      res = _run(n, args)
      runs[n].append(res)
      print(f"round {r} {n}: {res}", file=sys.stderr, flush=True)
  load_after = os.getloadavg()
  summary = {}
  for n in names:
    ok = [x["median_s"] for x in runs[n] if x and "median_s" in x]
    summary[n] = {"median_s": statistics.median(ok) if ok else None,
                  "rounds": ok, "error": next((x["error"] for x in runs[n]
                                                if x and "error" in x), None)}
  ref_t = summary.get("torch", {}).get("median_s")
  ref_x = summary.get("xla default", {}).get("median_s")
  print(f"\nResNet20 gradient, batch {args.batch}, median of {args.reps} warm calls, "
        f"median over {args.rounds} interleaved rounds; load {load_before[0]:.2f} -> "
        f"{load_after[0]:.2f}\n")
  print("| variant | s / gradient | / PyTorch | / xla default | note |\n|---|---|---|---|---|")
  for n, s in summary.items():
    t = s["median_s"]
    note = ("PyTorch 2 threads" if n == "torch" else "PyTorch 1 thread"
            if n == "torch 1 thread" else VARIANTS[n][2])
    if t is None:
      print(f"| {n} | failed: {s['error']} | | | {note} |")
      continue
    rt = f"{t / ref_t:.2f}" if ref_t else "-"
    rx = f"{t / ref_x:.2f}" if ref_x else "-"
    print(f"| {n} | {t:.4f} | {rt} | {rx} | {note} |")
  out = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor()}",
         "date": time.strftime("%Y-%m-%d %H:%M"), "batch": args.batch, "reps": args.reps,
         "rounds": args.rounds, "load_before": load_before, "load_after": load_after,
         "seconds": time.time() - t_start, "variants": {n: VARIANTS.get(n, ("", {}, ""))[0]
                                                         for n in names},
         "results": summary}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
