#!/usr/bin/env bash
# ResNet50 curvature figures on an NVIDIA GPU, in one prepared run of at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Installs and downloads nothing: run it where JAX already sees the GPU (a CUDA build of
# jax matching the driver, e.g. jax[cuda12]) and the repository's Python environment
# exists (.venv/bin/python, or set PYTHON=...). The data are synthetic (jax.random).
# Runs benchmarks/bench_gpu.py: ResNet50 at random init, 2 batches of 64 synthetic
# 224x224x3 images, 1000 classes; rows grad, hvp (make_hvp), GGN, Fisher and Hessian
# per_layer traces (layer_traces, every layer to 5% relative standard error or the row's
# cap), each with its compile time apart, in gradient-equivalents, plus the Spearman rank
# correlation of GGN/Fisher vs Hessian over the layers.
# Writes into OUTDIR:
#   env.txt               date, commit, nvidia-smi and jax.devices()
#   gpu_resnet50.json     every figure (rewritten after each row: a cut run keeps its rows)
#   gpu_resnet50.log      the benchmark's output, ending with a Markdown table
# and prints one summary line. Everything, the benchmark's `timeout` included, ends within
# TOTAL seconds of the start (480); the benchmark gets a --deadline a little shorter, so
# that it shortens its last caps and ends by itself.
# Environment: PYTHON; TIME_CAP (seconds per curvature row, default 90).
# Exit status: 0 all rows ran; 2 no GPU backend / bad usage; 1 the benchmark failed or
# was cut by the timeout (the JSON then holds the rows that finished).
set -u -o pipefail

TOTAL=480
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
TIME_CAP=${TIME_CAP:-90}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: error: no Python at $PY; set PYTHON=/path/to/python (the environment" \
       "where amq-jax and a CUDA build of jax are installed)" >&2
  exit 2
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2

{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -n) commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1; else echo "(nvidia-smi not found)"; fi
} | tee "$OUT/env.txt"

echo "== jax" | tee -a "$OUT/env.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import sys
import jax
print("jax", jax.__version__, "default backend:", jax.default_backend())
print("jax.devices():", jax.devices())
if jax.default_backend() != "gpu":
  print(f"gpu_check: error: JAX has no GPU backend (default backend "
        f"{jax.default_backend()!r}, devices {jax.devices()}); this check measures the GPU "
        "only. Install a CUDA build of jax matching the driver (e.g. jax[cuda12]; this "
        "script installs nothing) and re-run.", file=sys.stderr)
  sys.exit(2)
EOF
status=$?
if [ $status -ne 0 ]; then
  echo "gpu_check: stopped: no usable GPU backend (exit 2); nothing was measured" >&2
  exit 2
fi

# What is left of TOTAL: `timeout` TERMs at LIMIT and KILLs 10 s later; the benchmark's own
# deadline is 30 s earlier still (it counts from its start, imports included).
LIMIT=$((TOTAL - SECONDS - 15))
if [ $LIMIT -lt 60 ]; then
  echo "gpu_check: error: only ${LIMIT}s left of ${TOTAL}s after the environment checks" >&2
  exit 1
fi
echo "== bench_gpu (timeout ${LIMIT}s, deadline $((LIMIT - 30))s, cap ${TIME_CAP}s per row)"
timeout --kill-after=10 "$LIMIT" "$PY" benchmarks/bench_gpu.py \
  --out "$OUT/gpu_resnet50.json" --deadline $((LIMIT - 30)) --time-cap "$TIME_CAP" \
  2>&1 | tee "$OUT/gpu_resnet50.log"
rc=$?

"$PY" - "$OUT/gpu_resnet50.json" "$rc" "$SECONDS" <<'EOF'
import json, sys
path, rc, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
  with open(path) as f:
    r = json.load(f)
except (OSError, ValueError) as e:
  print(f"gpu_check: no result ({e}); exit {rc} after {secs} s")
  sys.exit(0)
parts = []
for name, x in r.get("rows", {}).items():
  if "error" in x or "skipped" in x:
    parts.append(f"{name} {'FAILED' if 'error' in x else 'skipped'}")
  elif name == "grad":
    parts.append(f"grad {x['seconds'] * 1e3:.0f} ms")
  elif name == "hvp":
    parts.append(f"hvp {x['seconds'] * 1e3:.0f} ms = {x['grad_equivalents']:.2f} grads")
  else:
    parts.append(f"{name} {x['seconds']:.0f}s = {x['grad_equivalents']:.0f} grad-eq, "
                 f"{x['layers_at_rtol']}/{x['layers']} at {r['rtol']:.0%}")
for m, s in (r.get("spearman_vs_hessian") or {}).items():
  if s is not None:
    parts.append(f"Spearman {m} vs Hessian {s:.3f} ({r.get('spearman_layers')} layers)")
dev = r.get("device_kind", "?")
print(f"gpu_check: {dev}: " + "; ".join(parts) + f" (exit {rc}, {secs} s) -> {path}")
EOF

if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "gpu_check: error: bench_gpu.py was cut by the ${LIMIT}s timeout; the JSON holds the" \
       "rows that finished" >&2
  exit 1
elif [ $rc -ne 0 ]; then
  echo "gpu_check: error: bench_gpu.py exited $rc; see $OUT/gpu_resnet50.log" >&2
  exit 1
fi
