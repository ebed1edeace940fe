"""PyTorch reference for the Hessian benchmark: a ResNet20 twin and two Hutchinson loops.

Nothing in ``amq_jax`` depends on this file (torch is a benchmark-only dependency). It gives
the benchmark what users have today in PyTorch, so that amq-jax's figures can be set side
by side with them on the same weights and the same batch:

* :class:`TorchCifarResNet`: the same network as ``amq_jax.models.resnet_cifar.CifarResNet``
  (stem 3x3 conv + BN, 3 stages of BasicBlocks with a 1x1 conv + BN projection shortcut
  where the shape changes, global mean pool, Dense head), with submodules named like the
  Flax ones, so that torch parameter ``stage1_block1.conv1.weight`` is Flax path
  ``stage1_block1/conv1/kernel``.
* :func:`load_flax_variables`: copies a Flax ``{'params', 'batch_stats'}`` dict into it
  (Conv kernel HWIO -> OIHW, Dense kernel [in, out] -> [out, in], BN scale/bias/mean/var);
  :func:`check_logits_match` verifies both models give the same eval-mode logits.
* :func:`per_layer_traces` (PyHessian/MQBench style: one Hessian-vector product per layer
  per probe, on a gradient graph built once and reused) and :func:`joint_traces` (NNCF
  style: one Rademacher probe over all kernels per HVP, every layer's ``z_i^T (H z)_i``).
  Both stop each layer with amq-jax's rule (``amq_jax.hessian.layer_traces``): a layer
  stops when it has ``min_probes`` samples and ``stderr <= rtol * |mean|`` (or
  ``<= atol``), or at ``max_probes``.

Hutchinson (1990): for a symmetric ``H`` and Rademacher ``z``, ``E[z^T H z] = Tr(H)``.
Layer ``i``'s diagonal block: per-layer probes give ``z_i^T H_ii z_i`` exactly; a joint
probe gives ``z_i^T H_ii z_i + sum_{j != i} z_i^T H_ij z_j``, same mean, more variance.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchBasicBlock", "TorchCifarResNet", "torch_model_like", "load_flax_variables",
           "kernel_params", "kernels_only_trainable", "check_logits_match", "TorchTrace", "TraceRun",
           "per_layer_traces", "joint_traces", "rademacher"]

# flax.linen.BatchNorm defaults: epsilon=1e-5; flax momentum 0.9 == torch momentum 0.1
# (only matters in training mode, never used here).
_BN = dict(eps=1e-5, momentum=0.1)


class TorchBasicBlock(nn.Module):
  """``amq_jax.models.resnet_cifar.BasicBlock`` in PyTorch (NCHW)."""

  def __init__(self, in_features: int, features: int, strides: int = 1):
    super().__init__()
    # Flax: Conv(padding=1) is explicit ((1, 1), (1, 1)), the same as torch padding=1.
    self.conv1 = nn.Conv2d(in_features, features, 3, strides, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(features, **_BN)
    self.conv2 = nn.Conv2d(features, features, 3, 1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(features, **_BN)
    self.has_proj = in_features != features or strides != 1
    if self.has_proj:
      # Flax: 1x1 conv with 'SAME' padding at stride 2 pads nothing on 28/14-pixel maps.
      self.proj_conv = nn.Conv2d(in_features, features, 1, strides, padding=0, bias=False)
      self.proj_bn = nn.BatchNorm2d(features, **_BN)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.has_proj:
      x = self.proj_bn(self.proj_conv(x))
    return F.relu(x + y)


class TorchCifarResNet(nn.Module):
  """``amq_jax.models.resnet_cifar.CifarResNet`` (ResNet-(6n+2)) in PyTorch, NCHW input."""

  def __init__(self, depth: int = 20, num_classes: int = 10, width: float = 1.0,
               stage_widths: Sequence[int] = (16, 32, 64), in_channels: int = 1):
    super().__init__()
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    widths = [max(1, int(round(w * width))) for w in stage_widths]
    self.stem_conv = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
    self.stem_bn = nn.BatchNorm2d(widths[0], **_BN)
    self.block_names = []
    c = widths[0]
    for s, w in enumerate(widths):
      for b in range(n):
        strides = 2 if (s > 0 and b == 0) else 1
        name = f"stage{s + 1}_block{b + 1}"
        self.add_module(name, TorchBasicBlock(c, w, strides))
        self.block_names.append(name)
        c = w
    self.head = nn.Linear(c, num_classes, bias=True)

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.head(x.mean(dim=(2, 3)))


def torch_model_like(flax_model, variables) -> TorchCifarResNet:
  """A :class:`TorchCifarResNet` with ``flax_model``'s hyper-parameters and ``variables``.

  Args:
    flax_model: an ``amq_jax.models.resnet_cifar.CifarResNet`` (e.g. from
      ``amq_jax.models.get_model('resnet20')``).
    variables: its Flax ``{'params': ..., 'batch_stats': ...}``.

  Returns:
    the torch model in eval mode, float32, holding a copy of ``variables``.
  """
  in_channels = int(np.shape(variables["params"]["stem_conv"]["kernel"])[2])
  model = TorchCifarResNet(depth=flax_model.depth, num_classes=flax_model.num_classes,
                           width=flax_model.width, stage_widths=tuple(flax_model.stage_widths),
                           in_channels=in_channels)
  load_flax_variables(model, variables)
  return model.eval()


def _flax_leaf(tree: dict, path: str):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      raise KeyError(f"Flax variables have no entry {path!r}")
    node = node[part]
  return np.asarray(node, np.float32)


def _flax_paths(tree: dict, prefix: str = "") -> list[str]:
  out = []
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    out.extend(_flax_paths(v, p) if isinstance(v, dict) else [p])
  return out


def load_flax_variables(model: nn.Module, variables) -> list[str]:
  """Copies Flax ``{'params', 'batch_stats'}`` into ``model`` in place, strictly.

  Layout conversions: Conv ``kernel`` [H, W, I, O] -> ``weight`` [O, I, H, W]; Dense
  ``kernel`` [I, O] -> ``weight`` [O, I]; ``bias`` as is; BatchNorm ``scale``/``bias``
  (params) and ``mean``/``var`` (batch_stats) -> ``weight``/``bias``/``running_mean``/
  ``running_var``. Torch module ``a.b`` is Flax module ``a/b``.

  Returns:
    the Flax paths copied. Raises ``KeyError``/``ValueError`` when a Flax entry is missing,
    left over, or has the wrong shape.
  """
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  used: set[str] = set()

  def take(collection, tree, path, to_torch, target: torch.Tensor):
    arr = to_torch(_flax_leaf(tree, path))
    if tuple(arr.shape) != tuple(target.shape):
      raise ValueError(f"{collection}/{path}: shape {arr.shape} (torch layout) does not "
                       f"match torch {tuple(target.shape)}")
    with torch.no_grad():
      target.copy_(torch.from_numpy(np.array(arr, np.float32, copy=True)))
    used.add(f"{collection}/{path}")

  ident = lambda a: a
  for name, mod in model.named_modules():
    fpath = name.replace(".", "/")
    if isinstance(mod, nn.Conv2d):
      take("params", params, f"{fpath}/kernel", lambda a: a.transpose(3, 2, 0, 1), mod.weight)
      if mod.bias is not None:
        take("params", params, f"{fpath}/bias", ident, mod.bias)
    elif isinstance(mod, nn.Linear):
      take("params", params, f"{fpath}/kernel", lambda a: a.T, mod.weight)
      if mod.bias is not None:
        take("params", params, f"{fpath}/bias", ident, mod.bias)
    elif isinstance(mod, nn.BatchNorm2d):
      take("params", params, f"{fpath}/scale", ident, mod.weight)
      take("params", params, f"{fpath}/bias", ident, mod.bias)
      take("batch_stats", stats, f"{fpath}/mean", ident, mod.running_mean)
      take("batch_stats", stats, f"{fpath}/var", ident, mod.running_var)
  everything = {f"params/{p}" for p in _flax_paths(params)}
  everything |= {f"batch_stats/{p}" for p in _flax_paths(stats)}
  left = sorted(everything - used)
  if left:
    raise KeyError(f"Flax entries with no torch counterpart: {left}")
  return sorted(used)


def kernel_params(model: nn.Module) -> dict[str, torch.nn.Parameter]:
  """``{flax kernel path: weight}`` for every Conv2d/Linear, in registration order.

  These are the layers amq-jax differentiates by default (``quantizable_paths``).
  """
  return {f"{name.replace('.', '/')}/kernel": mod.weight
          for name, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}


def kernels_only_trainable(model: nn.Module) -> nn.Module:
  """Sets ``requires_grad`` on Conv/Linear weights only (BN, biases frozen); returns ``model``.

  Then whole-model tools that differentiate every trainable parameter (PyHessian's
  ``get_params_grad``) see the same variables as amq-jax's default ``wrt``.
  """
  for p in model.parameters():
    p.requires_grad_(False)
  for w in kernel_params(model).values():
    w.requires_grad_(True)
  return model


def check_logits_match(flax_model, variables, torch_model: nn.Module, images_nhwc, *,
                       atol: float = 1e-4, rtol: float = 1e-4) -> float:
  """Compares eval-mode logits of the Flax model and its torch twin on the same images.

  Args:
    flax_model, variables: the Flax model (``apply(variables, x, train=False)``, NHWC).
    torch_model: the twin (NCHW); put in eval mode here.
    images_nhwc: ``[N, H, W, C]`` float32 images.
    atol, rtol: passes when ``max|a - b| <= atol + rtol * max|a|``.

  Returns:
    the maximum absolute difference of the logits.

  Raises:
    AssertionError: when the logits differ by more than the tolerance.
  """
  import jax  # local: torch_reference itself does not need JAX
  x = np.asarray(images_nhwc, np.float32)
  a = np.asarray(jax.jit(lambda v, im: flax_model.apply(v, im, train=False))(variables, x))
  torch_model.eval()
  with torch.no_grad():
    b = torch_model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  diff = float(np.max(np.abs(a - b)))
  tol = atol + rtol * float(np.max(np.abs(a)))
  if not diff <= tol:
    raise AssertionError(f"Flax and torch logits differ: max |diff| = {diff:.3g} > {tol:.3g}")
  return diff


class TorchTrace(NamedTuple):
  """One layer's Hutchinson estimate; fields as ``amq_jax.hessian.TraceEstimate``."""
  trace: float
  stderr: float
  probes: int
  num_params: int
  avg_trace: float
  samples: np.ndarray
  converged: bool

  @classmethod
  def from_samples(cls, samples, num_params: int, converged: bool) -> "TorchTrace":
    s = np.asarray(samples, np.float64)
    k = s.size
    mean = float(s.mean()) if k else float("nan")
    se = float(s.std(ddof=1) / math.sqrt(k)) if k > 1 else float("inf")
    return cls(mean, se, int(k), int(num_params), mean / num_params, s, bool(converged))


class TraceRun(NamedTuple):
  """Result of a torch estimator: per-layer traces plus what it cost.

  Attributes:
    traces: ``{flax kernel path: TorchTrace}``.
    hvps: number of Hessian-vector products (autograd double-backward calls).
    seconds: wall time, including the forward/backward building the gradient graph.
  """
  traces: dict[str, TorchTrace]
  hvps: int
  seconds: float


def _done(samples: list, rtol: float, atol: float, min_probes: int) -> bool:
  """amq-jax's stopping rule (``amq_jax.hessian._trace._done``), restated."""
  k = len(samples)
  if k < max(min_probes, 2):
    return False
  s = np.asarray(samples, np.float64)
  se = s.std(ddof=1) / math.sqrt(k)
  return bool(se <= rtol * abs(s.mean()) or se <= atol)


def rademacher(shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
  """Entries +-1 with probability 1/2 each."""
  return torch.randint(0, 2, tuple(shape), generator=generator).to(dtype).mul_(2).sub_(1)


def _gradient_graph(model: nn.Module, loss_fn: Callable, batch, weights: list):
  """Gradient of the loss w.r.t. ``weights`` with its graph kept for double backward."""
  x, y = batch
  loss = loss_fn(model(x), y)
  return torch.autograd.grad(loss, weights, create_graph=True)


def per_layer_traces(model: nn.Module, batch, *, seed: int = 0, loss_fn: Callable = F.cross_entropy,
                     rtol: float = 0.05, atol: float = 0.0, min_probes: int = 10,
                     max_probes: int = 500, progress: Callable | None = None) -> TraceRun:
  """Per-layer Hutchinson loop, as PyHessian/MQBench users write it.

  The gradient ``g = dL/dW`` is built once with ``create_graph=True`` and reused (as
  PyHessian does for a single batch); each probe of layer ``i`` is one double backward
  ``torch.autograd.grad(g_i, W_i, grad_outputs=z_i, retain_graph=True) = H_ii z_i``. In
  every round, each still-active layer gets one probe; a layer stops with amq-jax's rule.

  Args:
    model: the network in eval mode (BatchNorm on running statistics).
    batch: ``(x [N, C, H, W], y [N])``.
    seed: seed of the torch generator drawing the probes.
    loss_fn: ``(logits, labels) -> mean loss``.
    rtol, atol, min_probes, max_probes: the stopping rule (as ``amq_jax.hessian.layer_traces``).
    progress: optional ``progress(hvps, converged_layers, active_layers)``, called once per
      round.

  Returns:
    a :class:`TraceRun`.
  """
  model.eval()
  kp = kernel_params(model)
  paths, weights = list(kp), list(kp.values())
  gen = torch.Generator().manual_seed(seed)
  t0 = time.perf_counter()
  grads = _gradient_graph(model, loss_fn, batch, weights)
  samples: list[list[float]] = [[] for _ in paths]
  active = [True] * len(paths)
  converged = [False] * len(paths)
  hvps = 0
  while any(active):
    for i in [i for i, a in enumerate(active) if a]:
      z = rademacher(weights[i].shape, gen)
      (hz,) = torch.autograd.grad(grads[i], weights[i], grad_outputs=z, retain_graph=True)
      hvps += 1
      samples[i].append(float(torch.sum(z * hz)))
      if _done(samples[i], rtol, atol, min_probes):
        active[i], converged[i] = False, True
      elif len(samples[i]) >= max_probes:
        active[i] = False
    if progress is not None:
      progress(hvps, sum(converged), sum(active))
  seconds = time.perf_counter() - t0
  traces = {p: TorchTrace.from_samples(samples[i], weights[i].numel(), converged[i])
            for i, p in enumerate(paths)}
  return TraceRun(traces, hvps, seconds)


def joint_traces(model: nn.Module, batch, *, seed: int = 0, loss_fn: Callable = F.cross_entropy,
                 rtol: float = 0.05, atol: float = 0.0, min_probes: int = 10,
                 max_probes: int = 500, only_active: bool = False,
                 progress: Callable | None = None) -> TraceRun:
  """Joint Hutchinson loop, NNCF style: one probe over every kernel per HVP.

  Each HVP ``H z = torch.autograd.grad(g, W, grad_outputs=z, retain_graph=True)`` on the
  reused gradient graph gives every still-active layer a sample ``z_i^T (H z)_i``; layers
  stop one by one with amq-jax's rule (converged layers take no more samples) and the loop
  ends when all have stopped. (NNCF's own stop is ``|mean_k - mean_{k-1}| / |mean_{k-1}| <
  tol`` on the average; the rule here is amq-jax's so that times are comparable.)

  Args:
    model, batch, seed, loss_fn, rtol, atol, min_probes, max_probes, progress: as
      :func:`per_layer_traces`.
    only_active: probe only the layers not yet stopped (zeros elsewhere), like amq-jax's
      ``'adaptive'`` estimator: stopped layers no longer add cross-term variance.

  Returns:
    a :class:`TraceRun`.
  """
  model.eval()
  kp = kernel_params(model)
  paths, weights = list(kp), list(kp.values())
  gen = torch.Generator().manual_seed(seed)
  t0 = time.perf_counter()
  grads = _gradient_graph(model, loss_fn, batch, weights)
  samples: list[list[float]] = [[] for _ in paths]
  active = [True] * len(paths)
  converged = [False] * len(paths)
  hvps = 0
  while any(active):
    z = [rademacher(w.shape, gen) for w in weights]
    if only_active:
      z = [zi if a else torch.zeros_like(zi) for zi, a in zip(z, active)]
    hz = torch.autograd.grad(grads, weights, grad_outputs=z, retain_graph=True)
    hvps += 1
    for i in [i for i, a in enumerate(active) if a]:
      samples[i].append(float(torch.sum(z[i] * hz[i])))
      if _done(samples[i], rtol, atol, min_probes):
        active[i], converged[i] = False, True
      elif len(samples[i]) >= max_probes:
        active[i] = False
    if progress is not None:
      progress(hvps, sum(converged), sum(active))
  seconds = time.perf_counter() - t0
  traces = {p: TorchTrace.from_samples(samples[i], weights[i].numel(), converged[i])
            for i, p in enumerate(paths)}
  return TraceRun(traces, hvps, seconds)
