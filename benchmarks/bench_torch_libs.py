"""Per-layer curvature traces, amq-jax side by side with the PyTorch libraries (issue 10).

One process, one precision (float32 in both frameworks), the shipped ResNet20
(``amq_jax/assets/resnet20_fmnist.msgpack``) copied into its PyTorch twin
(``torch_reference.py``, eval-mode logits checked), the same ``--images`` Fashion-MNIST
training images in the same ``--batch``-sized batches, ``torch.set_num_threads(--threads)``.
Every trace is of the batch-MEAN cross-entropy over the images (per-batch means weighted
``n_b / N``), restricted to each Conv/Dense kernel (BatchNorm and biases held fixed).

Rows (``--rows`` takes group or row names, comma-separated):

* ``grad``: one gradient and one Hessian-vector product of the whole model over the images,
  PyTorch autograd vs ``jax.grad`` / ``amq_jax.hessian.make_hvp`` (warm medians; JAX compile
  apart), and how far the two results are apart (max per-layer ``||a - b|| / ||b||``).
* ``exact``: the exact per-layer GGN trace ``Tr(G_l)``. BackPACK ``DiagGGNExact`` (sum of the
  diagonal per kernel; one backward of a ``[C, N, ...]`` matrix per batch), amq-jax
  ``exact_ggn_traces`` (per-example VJPs, one per class), and curvlinops: it has no exact
  diagonal, so the trace goes through its ``GGNLinearOperator`` on one layer, ``D_l``
  matrix-vector products (identity columns in chunks): done only for layers with at most
  ``--curvlinops-exact-max-dim`` entries, the rest projected from the time per column.
* ``sampled``: GGN / Monte-Carlo Fisher traces until every layer's relative standard error
  is ``<= --rtol``. BackPACK ``DiagGGNMC(mc_samples=--mc-samples)``: each pass over the images
  gives every layer one sample (the sum of its MC diagonal); passes accumulate until the rule
  holds. amq-jax ``layer_traces(curvature='ggn' | 'fisher')`` (output-space probes, one VJP
  per probe gives every layer a sample). BackPACK's ``DiagGGNMC`` samples labels from the
  model, i.e. it is the MC Fisher: its counterpart is amq-jax ``'fisher'``.
* ``hessian``: Hessian traces per layer, same rule, at least ``--min-probes`` and at most
  ``--max-probes`` probes a layer (and ``--time-cap`` seconds a row). The PyHessian/MQBench
  style loop of ``torch_reference.per_layer_traces`` (one double backward per layer and
  probe on a first-order graph built once over all the images), curvlinops'
  ``HessianLinearOperator`` restricted to one layer's kernel with Hutchinson probes (the
  samples ``z^T H z`` that ``curvlinops.hutchinson_trace`` averages; kept one by one here
  so that the rule can be applied), and amq-jax ``layer_traces(estimator='per_layer')``.
* ``hutchpp``: Hutch++ per layer, same rule, sketch ``--sketch`` columns: amq-jax
  ``layer_traces(estimator='hutchpp')`` (its default) and the same algorithm on curvlinops'
  one-layer ``HessianLinearOperator`` (Gaussian sketch ``S``, ``Q = qr(H S)``, exact
  ``Tr(Q^T H Q)``, then samples ``Tr(Q^T H Q) + y^T H y`` with ``y = (I - QQ^T) z``).
  curvlinops' own ``hutchpp_trace`` returns one number for a fixed product budget, with no
  spread to stop on, so its algorithm is run here with the samples kept. Work counts the
  ``2 r`` sketch products of every layer.
  Rows stopped by the cap report how many layers converged and a projection of the work
  (and time) to reach the rule everywhere, from each layer's sample variance.

Stopping rule, everywhere but the ``torch_reference`` loop: amq-jax's
(``amq_jax.hessian._stats.rule_met`` at ``confidence=0.6827``, i.e. Student-t half-width at
about one standard error ``<= rtol * |mean|``, at least ``--min-probes`` samples). The
``torch_reference`` loop stops at ``stderr <= rtol * |mean|`` (the t factor is 1.10 at 10
samples, 1.02 at 50): marginally looser, in PyTorch's favour.

Every row reports seconds (warm: one warm-up first, reported apart with JAX's compile),
the ratio to its amq-jax counterpart (``torch / jax``; > 1 means amq-jax is faster),
gradient-equivalents (seconds over ONE gradient over the images in the row's own
framework), and its per-layer traces against amq-jax's exact GGN (Spearman across layers,
max relative difference). For Hessian rows the latter measures Hessian vs GGN, not an error.
The load average before and after is recorded: run on a quiet machine (other jobs on the
cores distort every figure), pinned to the same cores for both frameworks, e.g.::

    taskset -c 0,1 python benchmarks/bench_torch_libs.py --out benchmarks/torch_libs.json
    python benchmarks/bench_torch_libs.py --quick --out /tmp/torch_libs.json   # smoke run

Needs the benchmark environment (``benchmarks/requirements-bench.txt``: torch,
backpack-for-pytorch, curvlinops-for-pytorch) next to amq-jax's own.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(_HERE, ".."))

import torch_reference as tr  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from amq_jax import _io, _paths, adapters, hessian  # noqa: E402
from _shipped import shipped_resnet20  # noqa: E402
from amq_jax.data import fashion_mnist  # noqa: E402
from amq_jax.hessian import _stats  # noqa: E402

CONFIDENCE_1SE = 0.6827  # two-sided Student-t at ~1 standard error, as bench_curvature.py

GROUPS = {
    "grad": ("torch_grad", "jax_grad", "torch_hvp", "jax_hvp"),
    "exact": ("amq_ggn_exact", "amq_ggn_exact_vmap", "backpack_ggn_exact",
              "curvlinops_ggn_exact"),
    "sampled": ("amq_ggn", "amq_fisher", "amq_ggn_summed", "amq_fisher_summed",
                "backpack_ggn_mc"),
    "hessian": ("amq_hessian_per_layer", "torch_hessian_per_layer",
                "curvlinops_hessian_per_layer"),
    "hutchpp": ("amq_hessian_hutchpp", "curvlinops_hessian_hutchpp"),
}
ALL_ROWS = tuple(r for g in GROUPS.values() for r in g)
COUNTERPART = {"torch_grad": "jax_grad", "torch_hvp": "jax_hvp",
               "backpack_ggn_exact": "amq_ggn_exact", "curvlinops_ggn_exact": "amq_ggn_exact",
               "backpack_ggn_mc": "amq_fisher",
               "torch_hessian_per_layer": "amq_hessian_per_layer",
               "curvlinops_hessian_per_layer": "amq_hessian_per_layer",
               "curvlinops_hessian_hutchpp": "amq_hessian_hutchpp"}
LIBRARY = {"torch_grad": "PyTorch autograd", "jax_grad": "jax.grad",
           "torch_hvp": "PyTorch double backward", "jax_hvp": "amq-jax make_hvp",
           "amq_ggn_exact": "amq-jax exact_ggn_traces (layer hooks: patches x output grads)",
           "amq_ggn_exact_vmap": "amq-jax exact_ggn_traces without model= (vmap over examples)",
           "backpack_ggn_exact": "BackPACK DiagGGNExact",
           "curvlinops_ggn_exact": "curvlinops GGNLinearOperator (D matvecs)",
           "amq_ggn": "amq-jax layer_traces ggn (per example, layer hooks)",
           "amq_fisher": "amq-jax layer_traces fisher (per example, layer hooks)",
           "amq_ggn_summed": "amq-jax layer_traces ggn without model= (summed probe)",
           "amq_fisher_summed": "amq-jax layer_traces fisher without model= (summed probe)",
           "backpack_ggn_mc": "BackPACK DiagGGNMC",
           "amq_hessian_per_layer": "amq-jax layer_traces per_layer",
           "torch_hessian_per_layer": "PyHessian-style loop (torch_reference)",
           "curvlinops_hessian_per_layer": "curvlinops HessianLinearOperator + Hutchinson",
           "amq_hessian_hutchpp": "amq-jax layer_traces hutchpp",
           "curvlinops_hessian_hutchpp": "curvlinops HessianLinearOperator + Hutch++ (same "
                                         "algorithm and rule)"}


# --------------------------------------------------------------------------- the models

class _BackpackBlock(tr.TorchBasicBlock):
  """``TorchBasicBlock`` with module ReLUs: BackPACK's converter needs modules, not ``F.relu``."""

  def __init__(self, in_features: int, features: int, strides: int = 1):
    super().__init__(in_features, features, strides)
    self.relu1 = nn.ReLU()
    self.relu2 = nn.ReLU()

  def forward(self, x):
    y = self.relu1(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.has_proj:
      x = self.proj_bn(self.proj_conv(x))
    return self.relu2(x + y)  # the converter turns '+' into its SumModule


class _BackpackResNet(nn.Module):
  """The twin rebuilt from modules only (ReLU, AdaptiveAvgPool2d, Flatten), same names."""

  def __init__(self, ref: tr.TorchCifarResNet):
    super().__init__()
    c0 = ref.stem_conv
    self.stem_conv = nn.Conv2d(c0.in_channels, c0.out_channels, 3, 1, padding=1, bias=False)
    self.stem_bn = nn.BatchNorm2d(c0.out_channels, **tr._BN)
    self.stem_relu = nn.ReLU()
    self.block_names = list(ref.block_names)
    for name in self.block_names:
      c = getattr(ref, name).conv1
      self.add_module(name, _BackpackBlock(c.in_channels, c.out_channels, c.stride[0]))
    self.pool = nn.AdaptiveAvgPool2d(1)
    self.flatten = nn.Flatten()
    self.head = nn.Linear(ref.head.in_features, ref.head.out_features, bias=True)

  def forward(self, x):
    x = self.stem_relu(self.stem_bn(self.stem_conv(x)))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.head(self.flatten(self.pool(x)))


def backpack_twin(flax_model, variables, ref: tr.TorchCifarResNet, images_nhwc):
  """``(extended module, {flax kernel path: weight})`` for BackPACK, logits checked."""
  from backpack import extend
  m = _BackpackResNet(ref)
  tr.load_flax_variables(m, variables)
  tr.check_logits_match(flax_model, variables, m, images_nhwc)
  tr.kernels_only_trainable(m.eval())
  ext = extend(m, use_converter=True).eval()
  kp = {f"{n.replace('.', '/')}/kernel": mod.weight for n, mod in ext.named_modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear))}
  return ext, kp


def _torch_layout(a) -> np.ndarray:
  """A Flax kernel (Conv HWIO, Dense [in, out]) in torch layout (OIHW, [out, in])."""
  a = np.asarray(a, np.float32)
  return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T


# --------------------------------------------------------------------------- statistics

def _mean_se(s) -> tuple[float, float]:
  s = np.asarray(s, np.float64)
  if s.size == 0:
    return math.nan, math.inf
  if s.size == 1:
    return float(s[0]), math.inf
  return float(s.mean()), float(s.std(ddof=1) / math.sqrt(s.size))


def _needed(s, rtol: float, min_probes: int) -> int:
  """Samples a layer needs for ``stderr <= rtol |mean|``, from its sample variance."""
  s = np.asarray(s, np.float64)
  if s.size < 2 or np.all(s == s[0]):
    return max(int(s.size), min_probes)
  k = (s.std(ddof=1) / (rtol * max(abs(float(s.mean())), 1e-30))) ** 2
  return max(min_probes, int(math.ceil(k)))


def _spearman(a, b) -> float | None:
  if len(a) < 3:
    return None
  from scipy.stats import spearmanr
  return float(spearmanr(a, b).statistic)


def _median_time(fn, reps: int) -> tuple[float, list[float]]:
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def _samples_row(samples: dict, num_params: dict, met: dict, *, rtol, min_probes,
                 per_layer_units: bool) -> dict:
  """Per-layer summary of sampled traces (``per_layer_units``: work = sum of samples)."""
  traces, stderr, probes, need = {}, {}, {}, {}
  for p, s in samples.items():
    traces[p], stderr[p] = _mean_se(s)
    probes[p] = len(s)
    need[p] = _needed(s, rtol, min_probes)
  conv = sum(bool(met.get(p)) for p in samples)
  # A layer a time cap left without samples is projected at min_probes (an underestimate).
  return {"layers_unsampled": sum(not len(s) for s in samples.values()),
          "traces": traces, "stderr": stderr, "probes": probes,
          "layers_converged": conv, "all_converged": conv == len(samples),
          "projected_samples": need,
          "projected_units": sum(need.values()) if per_layer_units else max(need.values()),
          "num_params": num_params}


# --------------------------------------------------------------------------- the torch rows

def _torch_loss(model, x, y):
  return F.cross_entropy(model(x), y)


def torch_grad(model, weights, tbatches, n):
  """Gradient of the mean loss over all batches (each batch's mean weighted ``n_b / N``)."""
  total = None
  for x, y in tbatches:
    g = torch.autograd.grad(_torch_loss(model, x, y) * (x.shape[0] / n), weights)
    total = list(g) if total is None else [a + b for a, b in zip(total, g)]
  return total


def torch_hvp(model, weights, tbatches, n, z):
  """Fresh HVP per batch: forward, ``create_graph`` backward, double backward."""
  total = None
  for x, y in tbatches:
    g = torch.autograd.grad(_torch_loss(model, x, y) * (x.shape[0] / n), weights,
                            create_graph=True)
    hv = torch.autograd.grad(g, weights, grad_outputs=z)
    total = list(hv) if total is None else [a + b for a, b in zip(total, hv)]
  return total


def backpack_diag_traces(ext, kp, tbatches, n, extension, attr) -> dict[str, float]:
  """``sum_b (n_b / N) sum(diag_b)`` per kernel for a BackPACK diagonal extension."""
  from backpack import backpack
  lossf = _backpack_loss()
  out = {p: 0.0 for p in kp}
  for x, y in tbatches:
    for w in kp.values():
      w.grad = None
    with backpack(extension):
      lossf(ext(x), y).backward()
    for p, w in kp.items():
      out[p] += float(getattr(w, attr).sum()) * (x.shape[0] / n)
  return out


_LOSS = []


def _backpack_loss():
  if not _LOSS:
    from backpack import extend
    _LOSS.append(extend(nn.CrossEntropyLoss()))
  return _LOSS[0]


def backpack_mc_until(ext, kp, tbatches, n, *, mc_samples, rtol, min_probes, max_passes,
                      time_cap, seed):
  """BackPACK ``DiagGGNMC`` passes until every layer meets the rule (or a cap)."""
  from backpack.extensions import DiagGGNMC
  torch.manual_seed(seed)  # BackPACK samples labels from torch's global generator
  samples = {p: [] for p in kp}
  met, active = {}, set(kp)
  passes = 0
  t0 = time.perf_counter()
  while active and passes < max_passes:
    vals = backpack_diag_traces(ext, kp, tbatches, n, DiagGGNMC(mc_samples=mc_samples),
                                "diag_ggn_mc")
    passes += 1
    for p in [p for p in kp if p in active]:  # a converged layer keeps its samples (as amq-jax)
      samples[p].append(vals[p])
      if _stats.rule_met(samples[p], rtol=rtol, atol=0.0, min_probes=min_probes,
                         confidence=CONFIDENCE_1SE):
        met[p] = True
        active.discard(p)
    if time.perf_counter() - t0 > time_cap:
      break
  return samples, met, passes, time.perf_counter() - t0


def curvlinops_until(ops: dict, gen, *, sketch, rtol, min_probes, max_probes, time_cap,
                     probes_per_step):
  """Per-layer Hutchinson (``sketch=0``) or Hutch++ (``sketch=r``) on curvlinops operators.

  Hutch++ first sketches every layer (``2 r`` products each, as amq-jax: Gaussian ``S``,
  ``Q = qr(A S)``, exact ``Tr(Q^T A Q)``); then rounds of probes per active layer, each
  sample ``Tr(Q^T A Q) + y^T A y`` with ``y = (I - QQ^T) z`` (plain ``z^T A z`` for r = 0).
  """
  t0 = time.perf_counter()
  base, Qs, matvecs = {}, {}, 0
  for p, A in ops.items():
    r = min(sketch, A.shape[1])
    base[p], Qs[p] = 0.0, None
    if r:
      Q, _ = torch.linalg.qr(A @ torch.randn((A.shape[1], r), generator=gen))
      base[p], Qs[p] = float(torch.einsum("ij,ij->", Q, A @ Q)), Q
      matvecs += 2 * r
  samples = {p: [] for p in ops}
  met, active = {}, set(ops)
  while active:
    for p in [p for p in ops if p in active]:
      A, Q = ops[p], Qs[p]
      k = min(probes_per_step, max_probes - len(samples[p]))
      Y = tr.rademacher((A.shape[1], k), gen)
      if Q is not None:
        Y = Y - Q @ (Q.T @ Y)
      matvecs += k
      samples[p].extend(base[p] + float(v) for v in torch.einsum("ij,ij->j", Y, A @ Y))
      if _stats.rule_met(samples[p], rtol=rtol, atol=0.0, min_probes=min_probes,
                         confidence=CONFIDENCE_1SE):
        met[p] = True
        active.discard(p)
      elif len(samples[p]) >= max_probes:
        active.discard(p)
      if time.perf_counter() - t0 > time_cap:  # one round of 22 layers can take minutes
        return samples, met, matvecs, time.perf_counter() - t0
  return samples, met, matvecs, time.perf_counter() - t0


def curvlinops_exact_trace(op, chunk: int) -> float:
  """``Tr(A)`` from ``A @ I`` in column chunks (``D`` matrix-vector products)."""
  d = op.shape[1]
  total = 0.0
  for c0 in range(0, d, chunk):
    E = torch.zeros(d, min(chunk, d - c0))
    E[torch.arange(c0, c0 + E.shape[1]), torch.arange(E.shape[1])] = 1.0
    total += float(torch.einsum("ij,ij->", E, op @ E))
  return total


# --------------------------------------------------------------------------- main

def _dist_version(dist: str) -> str:
  """The installed version of a distribution (these packages define no ``__version__``)."""
  from importlib import metadata
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return "?"


def _expand_rows(spec: str, ap) -> list[str]:
  out = []
  for tok in [t.strip() for t in spec.split(",") if t.strip()]:
    names = GROUPS.get(tok, (tok,))
    for r in names:
      if r not in ALL_ROWS:
        ap.error(f"--rows: unknown row or group {tok!r}; groups {sorted(GROUPS)}, rows "
                 f"{list(ALL_ROWS)}")
      if r not in out:
        out.append(r)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="bench_torch_libs.json", help="JSON result (rewritten "
                  "after every row, 'complete': false until the end)")
  ap.add_argument("--quick", action="store_true",
                  help="tiny smoke run: 32 images, batch 16, rtol 0.5, 2..3 probes, 20 s caps")
  ap.add_argument("--images", type=int, default=None, help="training images (default 256)")
  ap.add_argument("--batch", type=int, default=None, help="batch size (default 128)")
  ap.add_argument("--rows", default="grad,exact,sampled,hessian",
                  help=f"groups {sorted(GROUPS)} or rows {list(ALL_ROWS)}, comma-separated")
  ap.add_argument("--rtol", type=float, default=None, help="relative standard error (0.05)")
  ap.add_argument("--min-probes", type=int, default=None, help="default 10")
  ap.add_argument("--max-probes", type=int, default=None,
                  help="Hessian rows: probes per layer at most (default 30)")
  ap.add_argument("--max-vjps", type=int, default=None,
                  help="sampled rows: probes / passes at most (default 2000)")
  ap.add_argument("--time-cap", type=float, default=None,
                  help="seconds per sampled/Hessian row (default 900); the torch_reference "
                       "loop has only --max-probes")
  ap.add_argument("--mc-samples", type=int, default=1, help="BackPACK DiagGGNMC per pass")
  ap.add_argument("--probes-per-step", type=int, default=8,
                  help="Hessian rows: probes per jitted amq-jax step (its default for "
                       "per_layer/hutchpp, whose products of a step share the forward and "
                       "backward pass) and columns per curvlinops matmat (a vmap: shares them "
                       "too)")
  ap.add_argument("--vjp-probes-per-step", type=int, default=4,
                  help="amq-jax ggn/fisher probes per jitted step (as bench_curvature.py)")
  ap.add_argument("--curvlinops-exact-max-dim", type=int, default=None,
                  help="exact curvlinops GGN trace only for layers with <= this many "
                       "entries (default 144: the stem conv)")
  ap.add_argument("--curvlinops-chunk", type=int, default=16,
                  help="identity columns per curvlinops matmat")
  ap.add_argument("--reps", type=int, default=None, help="grad/HVP repetitions (default 5)")
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--sketch", type=int, default=8,
                  help="hutchpp rows: sketch columns per layer (amq-jax's default, 8)")
  args = ap.parse_args(argv)
  q = args.quick
  n = args.images or (32 if q else 256)
  bs = min(args.batch or (16 if q else 128), n)
  if n % bs:
    ap.error(f"--images {n} must be a multiple of --batch {bs}")
  rtol = args.rtol or (0.5 if q else 0.05)
  min_probes = args.min_probes or (2 if q else 10)
  max_probes = args.max_probes or (3 if q else 30)
  max_vjps = args.max_vjps or (6 if q else 2000)
  cap = args.time_cap or (20.0 if q else 900.0)
  exact_max_dim = (args.curvlinops_exact_max_dim if args.curvlinops_exact_max_dim is not None
                   else 144)
  reps = args.reps or (2 if q else 5)
  rows = _expand_rows(args.rows, ap)
  torch.set_num_threads(args.threads)
  load_before = os.getloadavg()

  model, variables = shipped_resnet20(ap)
  params = variables["params"]
  wrt = _paths.quantizable_paths(params)
  ds = fashion_mnist.load("train", limit=n)
  jbatches = [{"image": jnp.asarray(ds.images[i:i + bs]),
               "label": jnp.asarray(ds.labels[i:i + bs], jnp.int32)} for i in range(0, n, bs)]
  x_all = torch.from_numpy(np.ascontiguousarray(ds.images.transpose(0, 3, 1, 2)))
  y_all = torch.from_numpy(ds.labels.astype(np.int64))
  tbatches = [(x_all[i:i + bs], y_all[i:i + bs]) for i in range(0, n, bs)]

  tmodel = tr.kernels_only_trainable(tr.torch_model_like(model, variables))
  logits_diff = tr.check_logits_match(model, variables, tmodel, ds.images)
  tkp = tr.kernel_params(tmodel)
  if list(tkp) != list(wrt) and sorted(tkp) != sorted(wrt):
    raise SystemExit(f"torch kernels {list(tkp)} do not match the Flax kernels {wrt}")
  W = [tkp[p] for p in wrt]
  num_params = {p: int(tkp[p].numel()) for p in wrt}
  loss_fn = hessian.linen_loss_fn(model, variables)
  logits_fn = hessian.linen_logits_fn(model, variables)
  mesh = hessian.default_mesh()

  import backpack  # noqa: F401  (fail here, before any timing, without the bench environment)
  import curvlinops  # noqa: F401
  result = {
      "complete": False, "model": "resnet20", "weights": "shipped",
      "images": n, "batch": bs, "layers": len(wrt), "rows": rows, "quick": q,
      "rule": {"rtol": rtol, "confidence": CONFIDENCE_1SE, "min_probes": min_probes,
               "max_probes_hessian": max_probes, "max_vjps_sampled": max_vjps,
               "time_cap_s": cap},
      "precision": {"torch_dtype": str(torch.get_default_dtype()),
                    "torch_matmul": torch.get_float32_matmul_precision(),
                    "jax_x64": bool(jax.config.jax_enable_x64),
                    "jax_matmul": str(jax.config.jax_default_matmul_precision)},
      "versions": {"torch": torch.__version__, "jax": jax.__version__,
                   "backpack": _dist_version("backpack-for-pytorch"),
                   "curvlinops": _dist_version("curvlinops-for-pytorch")},
      "torch_threads": torch.get_num_threads(),
      "cpu_affinity": len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": platform.machine(),
      "jax_devices": [str(d) for d in jax.devices()],
      "logits_max_abs_diff": logits_diff, "load_before": list(load_before), "runs": {}}
  runs = result["runs"]

  def save():
    result["load_now"] = list(os.getloadavg())
    _io.write_json(args.out, result)

  def say(msg):
    print(f"[bench] {msg}", flush=True)

  say(f"resnet20 shipped, {n} images in batches of {bs}, {len(wrt)} layers, torch threads "
      f"{torch.get_num_threads()}, logits max |diff| {logits_diff:.1e}, load {load_before[0]:.2f}")

  # ---- gradients (always: the gradient-equivalent unit of each framework)
  t_grad_torch, runs_tg = _median_time(lambda: torch_grad(tmodel, W, tbatches, n),
                                       reps + 1)  # first one warms the allocator
  t_grad_torch = statistics.median(runs_tg[1:])
  jgrad = jax.jit(lambda w, b: jax.grad(lambda w_: loss_fn(_paths.merge(params, w_), b))(w))
  w0 = _paths.select(params, wrt)

  def jax_grad():
    gs = [jgrad(w0, b) for b in jbatches]
    return jax.block_until_ready(jax.tree.map(lambda *a: sum(
        bi["image"].shape[0] / n * ai for ai, bi in zip(a, jbatches)), *gs))

  t0 = time.perf_counter()
  jax_grad()
  grad_compile = time.perf_counter() - t0
  t_grad_jax, runs_jg = _median_time(jax_grad, reps)
  g_t = torch_grad(tmodel, W, tbatches, n)
  g_j = jax_grad()
  grad_rel = {p: float(np.linalg.norm(g_t[i].numpy() - _torch_layout(g_j[p]))
                       / np.linalg.norm(_torch_layout(g_j[p]))) for i, p in enumerate(wrt)}
  result["grad_seconds"] = {"torch": t_grad_torch, "jax": t_grad_jax}
  say(f"one gradient over {n} images: torch {t_grad_torch:.3f} s, jax {t_grad_jax:.3f} s "
      f"(compile {grad_compile:.1f} s), max layer rel diff {max(grad_rel.values()):.1e}")
  if "torch_grad" in rows:
    runs["torch_grad"] = {"seconds": t_grad_torch, "runs": runs_tg[1:], "units": 1,
                          "unit": "gradient", "value_max_rel_vs_jax": max(grad_rel.values())}
  if "jax_grad" in rows:
    runs["jax_grad"] = {"seconds": t_grad_jax, "runs": runs_jg, "compile_s": grad_compile,
                        "units": 1, "unit": "gradient"}

  # ---- full-model HVP
  if "torch_hvp" in rows or "jax_hvp" in rows:
    key = jax.random.key(args.seed)
    v = {p: jax.random.rademacher(jax.random.fold_in(key, i), w0[p].shape, jnp.float32)
         for i, p in enumerate(wrt)}
    zt = [torch.from_numpy(np.ascontiguousarray(_torch_layout(v[p]))) for p in wrt]
    hvp = hessian.make_hvp(loss_fn, params, jbatches, wrt=wrt, mesh=mesh)
    t0 = time.perf_counter()
    hv_j = jax.block_until_ready(hvp(v))
    hvp_compile = time.perf_counter() - t0
    t_hvp_jax, runs_jh = _median_time(lambda: jax.block_until_ready(hvp(v)), reps)
    torch_hvp(tmodel, W, tbatches, n, zt)  # warm-up
    t_hvp_torch, runs_th = _median_time(lambda: torch_hvp(tmodel, W, tbatches, n, zt), reps)
    hv_t = torch_hvp(tmodel, W, tbatches, n, zt)
    hvp_rel = max(float(np.linalg.norm(hv_t[i].numpy() - _torch_layout(hv_j[p]))
                        / np.linalg.norm(_torch_layout(hv_j[p]))) for i, p in enumerate(wrt))
    if "torch_hvp" in rows:
      runs["torch_hvp"] = {"seconds": t_hvp_torch, "runs": runs_th, "units": 1, "unit": "HVP",
                           "value_max_rel_vs_jax": hvp_rel}
    if "jax_hvp" in rows:
      runs["jax_hvp"] = {"seconds": t_hvp_jax, "runs": runs_jh, "compile_s": hvp_compile,
                         "units": 1, "unit": "HVP"}
    say(f"one HVP: torch {t_hvp_torch:.3f} s, amq-jax {t_hvp_jax:.3f} s (compile "
        f"{hvp_compile:.1f} s), max layer rel diff {hvp_rel:.1e}")
  save()

  # ---- exact GGN (amq-jax's is the reference of every row's values: always computed).
  # As the pipeline calls it: with the adapted model, per-example gradients through the
  # layer hooks; the vmap way (no model=) is its own row.
  adapted = adapters.from_linen(model, variables, jbatches[0]["image"][:1])
  cols = int(np.shape(params["head"]["kernel"])[-1]) - 1  # C - 1 factor columns

  def exact_row(**kw):
    t0 = time.perf_counter()
    hessian.exact_ggn_traces(logits_fn, params, jbatches, wrt=wrt, mesh=mesh, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = hessian.exact_ggn_traces(logits_fn, params, jbatches, wrt=wrt, mesh=mesh, **kw)
    return time.perf_counter() - t0, first, {p: float(ex[p].trace) for p in wrt}

  t_ex, first, exact = exact_row(model=adapted)
  result["exact_ggn_traces"] = exact
  if "amq_ggn_exact" in rows:
    runs["amq_ggn_exact"] = {"seconds": t_ex, "compile_s": max(first - t_ex, 0.0),
                             "units": cols, "unit": "backward passes (one per factor column)",
                             "traces": exact}
  say(f"amq-jax exact GGN: {t_ex:.2f} s (first call {first:.1f} s), sum {sum(exact.values()):.4g}")
  if "amq_ggn_exact_vmap" in rows:
    t_v, first_v, ev = exact_row()
    rel = {p: abs(ev[p] - exact[p]) / abs(exact[p]) for p in wrt}
    runs["amq_ggn_exact_vmap"] = {"seconds": t_v, "compile_s": max(first_v - t_v, 0.0),
                                  "units": cols, "unit": "per-example VJPs per factor column",
                                  "traces": ev, "max_rel_diff_vs_amq_exact": max(rel.values())}
    say(f"amq-jax exact GGN by vmap: {t_v:.2f} s (first call {first_v:.1f} s), max rel diff "
        f"{max(rel.values()):.1e}")
  save()

  ext = bkp = None
  if "backpack_ggn_exact" in rows or "backpack_ggn_mc" in rows:
    ext, bkp = backpack_twin(model, variables, tmodel, ds.images)
  if "backpack_ggn_exact" in rows:
    from backpack.extensions import DiagGGNExact
    t0 = time.perf_counter()
    backpack_diag_traces(ext, bkp, tbatches, n, DiagGGNExact(), "diag_ggn_exact")
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    bt = backpack_diag_traces(ext, bkp, tbatches, n, DiagGGNExact(), "diag_ggn_exact")
    sec = time.perf_counter() - t0
    rel = {p: abs(bt[p] - exact[p]) / abs(exact[p]) for p in wrt}
    runs["backpack_ggn_exact"] = {"seconds": sec, "warmup_s": warm, "units": len(tbatches),
                                  "unit": "DiagGGNExact backward passes (batches)",
                                  "traces": bt, "rel_diff_vs_amq_exact": rel,
                                  "max_rel_diff_vs_amq_exact": max(rel.values())}
    say(f"BackPACK DiagGGNExact: {sec:.2f} s (warm-up {warm:.1f} s), max rel diff vs amq-jax "
        f"{max(rel.values()):.1e}")
    save()

  if "curvlinops_ggn_exact" in rows:
    from curvlinops import GGNLinearOperator
    small = [p for p in wrt if num_params[p] <= exact_max_dim]
    if not small:
      runs["curvlinops_ggn_exact"] = {"skipped": f"no layer has <= {exact_max_dim} entries"}
    else:
      def op(p):
        return GGNLinearOperator(tmodel, nn.CrossEntropyLoss(), [tkp[p]], tbatches,
                                 check_deterministic=False, num_data=n)
      t0 = time.perf_counter()
      o = op(small[0])
      o @ torch.eye(o.shape[1])[:, :min(args.curvlinops_chunk, o.shape[1])]
      warm = time.perf_counter() - t0
      ct, per = {}, {}
      t0 = time.perf_counter()
      for p in small:
        t1 = time.perf_counter()
        ct[p] = curvlinops_exact_trace(op(p), args.curvlinops_chunk)
        per[p] = time.perf_counter() - t1
      sec = time.perf_counter() - t0
      s_per_col = sec / sum(num_params[p] for p in small)
      projected = s_per_col * sum(num_params.values())
      rel = {p: abs(ct[p] - exact[p]) / abs(exact[p]) for p in small}
      runs["curvlinops_ggn_exact"] = {
          "seconds": sec, "warmup_s": warm, "layers_done": small, "seconds_per_layer": per,
          "units": sum(num_params[p] for p in small), "unit": "GGN matrix-vector products",
          "seconds_per_matvec": s_per_col, "projected_seconds_all_layers": projected,
          "projected_units_all_layers": sum(num_params.values()),
          "traces": ct, "rel_diff_vs_amq_exact": rel,
          "max_rel_diff_vs_amq_exact": max(rel.values()),
          "note": (f"curvlinops has no exact GGN diagonal; Tr(G_l) via D_l products with the "
                   f"identity, done for {len(small)} layer(s) with <= {exact_max_dim} "
                   f"entries; all {len(wrt)} layers projected at the measured s/product")}
      say(f"curvlinops exact GGN on {small}: {sec:.1f} s ({s_per_col:.3f} s/matvec; all "
          f"layers projected {projected:.0f} s), max rel diff {max(rel.values()):.1e}")
    save()

  # ---- sampled GGN / Fisher to rtol
  stop = dict(rtol=rtol, confidence=CONFIDENCE_1SE, min_probes=min_probes)

  def amq_row(loss, warm_seed, seed, max_n, *, per_layer_units, **kw):
    """One amq-jax layer_traces row: an untimed one-probe call compiles, then the timed run
    to rtol; returns the estimates and the row (seconds, compile_s, samples statistics)."""
    common = dict(wrt=wrt, mesh=mesh, progress=False, **kw)
    t0 = time.perf_counter()
    hessian.layer_traces(loss, params, jbatches, key=jax.random.key(warm_seed + args.seed),
                         min_probes=1, max_probes=1, **common)
    comp = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = hessian.layer_traces(loss, params, jbatches, key=jax.random.key(args.seed + seed),
                               max_probes=max_n, max_time=cap, **stop, **common)
    sec = time.perf_counter() - t0
    r = _samples_row({p: est[p].samples for p in wrt}, num_params,
                     {p: est[p].status == "converged" for p in wrt}, rtol=rtol,
                     min_probes=min_probes, per_layer_units=per_layer_units)
    r.update(seconds=sec, compile_s=comp)
    return est, r
  for curv, hooked in (("ggn", True), ("fisher", True), ("ggn", False), ("fisher", False)):
    name = f"amq_{curv}" + ("" if hooked else "_summed")
    if name not in rows:
      continue
    est, r = amq_row(None, 10_000, 1, max_vjps, per_layer_units=False, curvature=curv,
                     logits_fn=logits_fn, probes_per_step=args.vjp_probes_per_step,
                     model=adapted if hooked else None)
    sec = r["seconds"]
    r.update(units=max(e.probes for e in est.values()),
             unit="VJPs (all layers each)",
             statuses={p: e.status for p, e in est.items()})
    runs[name] = r
    say(f"amq-jax {curv}: {sec:.1f} s, {r['units']} VJPs, {r['layers_converged']}/{len(wrt)} "
        f"converged (warm-up/compile {r['compile_s']:.1f} s)")
    save()

  if "backpack_ggn_mc" in rows:
    from backpack.extensions import DiagGGNMC
    t0 = time.perf_counter()
    backpack_diag_traces(ext, bkp, tbatches, n, DiagGGNMC(mc_samples=args.mc_samples),
                         "diag_ggn_mc")
    warm = time.perf_counter() - t0
    samples, met, passes, sec = backpack_mc_until(
        ext, bkp, tbatches, n, mc_samples=args.mc_samples, rtol=rtol, min_probes=min_probes,
        max_passes=max_vjps, time_cap=cap, seed=args.seed + 2)
    r = _samples_row(samples, num_params, met, rtol=rtol, min_probes=min_probes,
                     per_layer_units=False)
    r.update(seconds=sec, warmup_s=warm, units=passes * args.mc_samples,
             unit=f"MC samples ({passes} passes x {args.mc_samples})", passes=passes)
    runs["backpack_ggn_mc"] = r
    say(f"BackPACK DiagGGNMC: {sec:.1f} s, {passes} passes, {r['layers_converged']}/{len(wrt)} "
        f"converged (warm-up {warm:.1f} s)")
    save()

  # ---- Hessian per layer to rtol (capped)
  if "amq_hessian_per_layer" in rows:
    est, r = amq_row(loss_fn, 20_000, 3, max_probes, per_layer_units=True,
                     estimator="per_layer", probes_per_step=args.probes_per_step)
    sec = r["seconds"]
    r.update(units=sum(e.probes for e in est.values()),
             unit="one-layer HVPs", statuses={p: e.status for p, e in est.items()})
    runs["amq_hessian_per_layer"] = r
    say(f"amq-jax per_layer: {sec:.1f} s, {r['units']} HVPs, {r['layers_converged']}/"
        f"{len(wrt)} converged (warm-up/compile {r['compile_s']:.1f} s)")
    save()

  if "torch_hessian_per_layer" in rows:
    t0 = time.perf_counter()  # warm-up: the graph and one HVP of the last layer
    g = torch.autograd.grad(_torch_loss(tmodel, x_all, y_all), W, create_graph=True)
    torch.autograd.grad(g[-1], W[-1], grad_outputs=torch.ones_like(W[-1]))
    del g
    warm = time.perf_counter() - t0
    tr_run = tr.per_layer_traces(tmodel, (x_all, y_all), seed=args.seed + 4, rtol=rtol,
                                 min_probes=min_probes, max_probes=max_probes)
    trt = tr_run.traces
    r = _samples_row({p: trt[p].samples for p in wrt}, num_params,
                     {p: trt[p].converged for p in wrt}, rtol=rtol, min_probes=min_probes,
                     per_layer_units=True)
    r.update(seconds=tr_run.seconds, warmup_s=warm, units=tr_run.hvps, unit="one-layer HVPs",
             note="graph over all images at once; stderr <= rtol |mean| (no t factor)")
    runs["torch_hessian_per_layer"] = r
    say(f"torch per-layer loop: {tr_run.seconds:.1f} s, {tr_run.hvps} HVPs, "
        f"{r['layers_converged']}/{len(wrt)} converged (warm-up {warm:.1f} s)")
    save()

  if "amq_hessian_hutchpp" in rows:
    est, r = amq_row(loss_fn, 30_000, 6, max_probes, per_layer_units=True,
                     estimator="hutchpp", sketch_size=args.sketch,
                     probes_per_step=args.probes_per_step)
    sketch_hvps = sum(2 * min(args.sketch, num_params[p]) for p in wrt)
    if r.get("projected_units") is not None:
      r["projected_units"] += sketch_hvps
    r.update(units=sum(e.probes for e in est.values()) + sketch_hvps, sketch_hvps=sketch_hvps,
             unit="one-layer HVPs (sketch included)",
             statuses={p: e.status for p, e in est.items()})
    runs["amq_hessian_hutchpp"] = r
    say(f"amq-jax hutchpp: {r['seconds']:.1f} s, {r['units']} HVPs, {r['layers_converged']}/"
        f"{len(wrt)} converged (warm-up/compile {r['compile_s']:.1f} s)")
    save()

  if "curvlinops_hessian_per_layer" in rows or "curvlinops_hessian_hutchpp" in rows:
    from curvlinops import HessianLinearOperator
    ops = {p: HessianLinearOperator(tmodel, nn.CrossEntropyLoss(), [tkp[p]], tbatches,
                                    check_deterministic=False, num_data=n) for p in wrt}

  for name, sketch, seed_off in (("curvlinops_hessian_hutchpp", args.sketch, 7),
                                 ("curvlinops_hessian_per_layer", 0, 5)):
    if name not in rows:
      continue
    gen = torch.Generator().manual_seed(args.seed + seed_off)
    t0 = time.perf_counter()  # warm-up: one product with the first layer's operator
    ops[wrt[0]] @ torch.ones(ops[wrt[0]].shape[1])
    warm = time.perf_counter() - t0
    samples, met, mv, sec = curvlinops_until(
        ops, gen, sketch=sketch, rtol=rtol, min_probes=min_probes, max_probes=max_probes,
        time_cap=cap, probes_per_step=args.probes_per_step)
    r = _samples_row(samples, num_params, met, rtol=rtol, min_probes=min_probes,
                     per_layer_units=True)
    sketch_mv = sum(2 * min(sketch, num_params[p]) for p in wrt)
    if sketch_mv and r.get("projected_units") is not None:
      r["projected_units"] += sketch_mv
    r.update(seconds=sec, warmup_s=warm, units=mv, sketch_hvps=sketch_mv,
             unit="one-layer HVPs" + (" (sketch included)" if sketch else ""))
    runs[name] = r
    say(f"{LIBRARY[name]}: {sec:.1f} s, {mv} HVPs, {r['layers_converged']}/{len(wrt)} "
        f"converged (warm-up {warm:.1f} s)")
    save()

  # ---- ratios, agreement, table
  grad_s = {"jax": t_grad_jax, "torch": t_grad_torch}
  ex_vals = [exact[p] for p in wrt]
  for name, r in runs.items():
    if r is None or "seconds" not in r:
      continue
    fw = "jax" if name.startswith(("amq_", "jax_")) else "torch"
    r["framework"] = fw
    r["grad_equivalents"] = r["seconds"] / grad_s[fw]
    cp = COUNTERPART.get(name)
    if cp in runs and runs[cp] and "seconds" in runs[cp]:
      mine = r.get("projected_seconds_all_layers", r["seconds"])
      r["ratio_to_amq"] = mine / runs[cp]["seconds"]
      r["ratio_is_projected"] = "projected_seconds_all_layers" in r
    if "units" in r and r.get("projected_units") is not None and not r.get("all_converged", True):
      r["projected_seconds"] = r["projected_units"] * r["seconds"] / max(r["units"], 1)
    if "traces" in r:  # layers a capped row never reached have no value: left out
      ps = [p for p in wrt if p in r["traces"] and math.isfinite(r["traces"][p])]
      r["layers_with_value"] = len(ps)
      r["spearman_vs_exact_ggn"] = _spearman([r["traces"][p] for p in ps],
                                             [exact[p] for p in ps])
      r["max_rel_vs_exact_ggn"] = max(abs(r["traces"][p] - exact[p]) / abs(exact[p])
                                      for p in ps)
  # Hessian rows against each other, layer by layer (z-scores of the difference).
  if "amq_hessian_per_layer" in runs:
    a = runs["amq_hessian_per_layer"]
    for name in ("torch_hessian_per_layer", "curvlinops_hessian_per_layer"):
      if name in runs:
        b = runs[name]
        zs = {}
        for p in wrt:
          se = math.hypot(a["stderr"][p], b["stderr"][p])
          d = a["traces"][p] - b["traces"][p]
          zs[p] = d / se if math.isfinite(se) and se > 0 else None
        fin = [abs(z) for z in zs.values() if z is not None]
        b["z_vs_amq_per_layer"] = zs
        b["max_abs_z_vs_amq_per_layer"] = max(fin) if fin else None
  result["load_after"] = list(os.getloadavg())

  def fmt(x, f="{:.2f}"):
    return "" if x is None else f.format(x)

  lines = [f"## Per-layer curvature, amq-jax vs PyTorch libraries: ResNet20 (shipped), {n} "
           f"Fashion-MNIST training images, batch {bs}, {len(wrt)} layers, float32, torch "
           f"threads {torch.get_num_threads()}{' (quick)' if q else ''}", "",
           f"One gradient over the images: torch {t_grad_torch:.3f} s, jax {t_grad_jax:.3f} s. "
           f"Rule: rse <= {rtol} (t at {CONFIDENCE_1SE}), {min_probes}..{max_probes} probes a "
           f"layer (Hessian), cap {cap:.0f} s a row. Load average before "
           f"{load_before[0]:.2f}, after {result['load_after'][0]:.2f}.", "",
           "| row | library | seconds | / amq-jax | work | grad-eq | layers at rtol | "
           "projected to rtol | Spearman vs exact GGN | max rel vs exact GGN |",
           "|---|---|---:|---:|---|---:|---:|---|---:|---:|"]
  for name in rows:
    r = runs.get(name)
    if r is None:
      continue
    if "seconds" not in r:
      lines.append(f"| {name} | {LIBRARY[name]} | skipped: {r.get('skipped', '')} |||||||| ")
      continue
    ratio = fmt(r.get("ratio_to_amq"))
    if r.get("ratio_is_projected"):
      ratio += " (projected)"
    conv = (f"{r['layers_converged']}/{len(wrt)}" if "layers_converged" in r else "")
    if r.get("layers_unsampled"):
      conv += f" ({r['layers_unsampled']} unsampled)"
    proj = ""
    if r.get("projected_seconds") is not None:
      proj = f"{r['projected_units']} units, ~{r['projected_seconds']:.0f} s"
    elif "projected_seconds_all_layers" in r:
      proj = f"all layers ~{r['projected_seconds_all_layers']:.0f} s"
    work = f"{r.get('units', '')} {r.get('unit', '')}".strip()
    if name == "curvlinops_ggn_exact":
      work += f" ({len(r['layers_done'])} layer(s))"
    lines.append(f"| {name} | {LIBRARY[name]} | {r['seconds']:.2f} | {ratio} | {work} | "
                 f"{r['grad_equivalents']:.1f} | {conv} | {proj} | "
                 f"{fmt(r.get('spearman_vs_exact_ggn'), '{:.3f}')} | "
                 f"{fmt(r.get('max_rel_vs_exact_ggn'), '{:.2e}')} |")
  extra = []
  for name, r in runs.items():
    if r and ("compile_s" in r or "warmup_s" in r):
      extra.append(f"{name} {r.get('compile_s', r.get('warmup_s')):.1f} s")
  lines += ["", "Compile (JAX) / warm-up (torch), not in the seconds above: " + ", ".join(extra)]
  for name in ("torch_grad", "torch_hvp"):
    if name in runs:
      lines.append(f"{name}: max per-layer relative difference torch vs JAX "
                   f"{runs[name]['value_max_rel_vs_jax']:.1e}")
  for name in ("torch_hessian_per_layer", "curvlinops_hessian_per_layer"):
    if runs.get(name, {}).get("max_abs_z_vs_amq_per_layer") is not None:
      lines.append(f"{name}: max |z| of the per-layer difference vs amq-jax per_layer "
                   f"{runs[name]['max_abs_z_vs_amq_per_layer']:.2f}")
  table = "\n".join(lines)
  print(table, flush=True)
  result["table_md"] = table
  result["complete"] = True
  save()
  say(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
