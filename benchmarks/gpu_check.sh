#!/usr/bin/env bash
# The curvature benchmarks on an NVIDIA GPU, in one prepared run.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Installs nothing: run it where JAX already sees the GPU (jax[cuda12] matching the driver)
# and the repository's Python environment exists (.venv/bin/python, or set PYTHON=...).
# Real Fashion-MNIST training images are needed (the Debian path, or AMQ_DATA_DIR=DIR).
# Writes into OUTDIR:
#   env.txt          nvidia-smi and jax.devices()
#   curvature.json   bench_curvature.py: GGN, exact GGN and the Hessian (per_layer) traces of
#                    the shipped ResNet20 on 1,024 training images, every layer to 5%
#   hessian.json     bench_hessian.py: HVP/gradient time and estimators on the same weights
#   *.log            each benchmark's output
# and prints one summary line. Each benchmark runs under `timeout`; a method that does not
# reach 5% everywhere within CAP seconds reports how far it got and a projection.
# Environment: CAP (seconds per method, default 120), PYTHON, AMQ_DATA_DIR.
# Exit status: 0 all ran; 2 no GPU backend / no data / bad usage; 1 a benchmark failed.
set -u -o pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CAP=${CAP:-120}
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
from amq_jax.data import fashion_mnist
try:
  fashion_mnist.load("train", limit=1024)
except Exception as e:  # noqa: BLE001 - any failure here means the data is not usable
  print(f"gpu_check: error: Fashion-MNIST training images are needed: {e}", file=sys.stderr)
  sys.exit(2)
EOF
status=$?
if [ $status -ne 0 ]; then
  exit 2
fi

failed=0
run() {  # run NAME LIMIT_SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s): $PY $*"
  local t0=$SECONDS
  timeout --kill-after=30 "$limit" "$PY" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  if [ $rc -ne 0 ]; then failed=1; fi
}

# GGN, exact GGN and Hessian per_layer on the shipped ResNet20, 1,024 real images (8 x 128),
# every layer to 5% relative standard error or CAP seconds per method.
run curvature $((3 * CAP + 600)) benchmarks/bench_curvature.py \
  --methods ggn,ggn_exact,per_layer --num-examples 1024 --batch-size 128 --rtol 0.05 \
  --time-cap "$CAP" --out "$OUT/curvature.json"
# HVP / gradient time and the Hessian estimators on the same (shipped) weights, batch 128.
run hessian $((2 * CAP + 600)) benchmarks/bench_hessian.py \
  --variables shipped --estimators per_layer,joint --time-cap "$CAP" \
  --out "$OUT/hessian.json"

"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
  try:
    with open(os.path.join(out, name)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
parts = []
c = load("curvature.json")
if c:
  for m, r in c.get("methods", {}).items():
    parts.append(f"{m} {r['seconds']:.1f}s ({r['layers_at_rtol']}/{c['layers']} at 5%)")
  sp = c.get("spearman_vs_hessian", {}).get("ggn")
  if sp is not None:
    parts.append(f"Spearman GGN vs Hessian {sp:.3f}")
else:
  parts.append("curvature: no result")
h = load("hessian.json")
if h:
  parts.append(f"HVP/grad {h['hvp_over_grad']:.2f}")
  for m, r in h.get("estimators", {}).items():
    parts.append(f"{m} {r['converged_layers']}/{h['layers']} converged in {r['seconds']:.0f}s")
else:
  parts.append("hessian: no result")
print("gpu_check: " + "; ".join(parts) + f" -> {out}")
EOF

if [ $failed -ne 0 ]; then
  echo "gpu_check: error: a benchmark failed; see $OUT/*.log" >&2
  exit 1
fi
