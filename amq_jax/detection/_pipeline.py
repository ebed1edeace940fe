"""Mixed-precision ACTIVATIONS for RetinaNet, end to end (``amq-jax run`` with a detection config).

HAWQ-V2 (Dong et al. 2020, Sec. 3.4 and Table 4) chooses activation widths with the same
second-order sensitivity as weights, the Hessian now taken with respect to each layer's INPUT
activation, and reports it most useful for object detection. This module runs that
experiment on a RetinaNet:

1. **FP32**: :func:`amq_jax.detection.train_detector` into ``workdir/fp32`` (resumes from its
   Orbax checkpoints; skipped once ``fp32/variables.msgpack`` exists).
2. **Analysis** (``workdir/analyze/*.json``):

   * weight traces ``Tr(H_l)`` per Conv kernel (:func:`amq_jax.hessian.layer_traces` on
     :func:`detection_loss_fn`), for the weight Omega ``Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2``;
   * activation traces ``T_l = (1/N) sum_n Tr(d^2 l_n / d x_{n,l}^2)`` of every layer's
     input ``x_{n,l}`` (:func:`amq_jax.hessian.activation_traces`, per example, averaged),
     on the model built with ``head_mode='packed'`` so that each head conv has ONE input;
   * activation errors ``e_l(a) = (1/N) sum_n ||Q_a(x_{n,l}) - x_{n,l}||^2`` at each width
     ``a`` on calibration images, with the range ``[lo_l, hi_l]`` calibrated on the same
     images (:func:`activation_quant_errors`; ``Q_a`` is :func:`amq_jax.quant.fake_quant_act`);
   * ``Omega_act[l, a] = (T_l / m_l) * e_l(a)`` (:func:`amq_jax.alloc.omega_from`), where
     ``m_l`` is the layer's input size per example (:func:`activation_sizes`).

   Sizes, traces and errors count the REAL activations: a head conv runs once per pyramid
   level, so ``m_l = sum_levels H W C`` and ``e_l`` sums the levels (the usual per-level
   model). The packed canvas used for the traces adds padding whose Hessian rows are exactly
   zero (each head conv masks its input), so ``T_l`` is the trace over the same cells.
3. **Search** (``workdir/search/bits.json``): weight widths by HAWQ-V2 at a size budget
   (the classification pipeline's :class:`amq_jax.pipeline._search.Problem`; first and last
   layers pinned). Activation widths against a SEPARATE activation budget on the activation
   memory ``C(a) = sum_l m_l * a_l`` (bits per example): the exact frontier of ``C`` vs
   ``sum_l Omega_act[l, a_l]`` (:func:`amq_jax.alloc.pareto_front`, first and last layers
   pinned at ``act_pin_first_last``), the least-Omega point within the budget. The uniform
   baseline puts every other layer at one width ``a`` (the widest whose memory fits the
   budget); with ``act_budget='uniform:6'`` the budget IS the uniform-6 memory, so both
   configurations have the same activation memory (to the bit, or the Hessian one less).
   Both use the same HAWQ-V2 weight widths, so their weight sizes are equal.
4. **QAT** (``workdir/finetune/<method>/seed<k>/``): weights fake-quantized per output
   channel and inputs fake-quantized on ranges calibrated with the quantized weights,
   straight-through gradients, ``finetune.num_steps`` steps of the same optimizer for each
   method and seed; COCO mAP@[.5:.95] and mAP@.5 on the test detection set before (PTQ) and
   after fine-tuning. Each result is a JSON file; an interrupted fine-tune resumes from its
   Orbax checkpoint.
5. **Report**: ``workdir/report.md`` and ``report.json`` (bits per layer, sizes, budgets,
   mAP mean +- std over seeds, seconds per stage).

>>> from amq_jax import detection
>>> from amq_jax.config import load_config
>>> report = detection.run_detection(load_config('configs/retinanet_fmnist_det.py'), 'runs/det')
>>> report['methods']['hawq_v2']['mAP']['mean']
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from amq_jax import alloc, hessian, models, quant, train
from amq_jax.detection import _data
from amq_jax.detection._coco_eval import coco_evaluate
from amq_jax.detection._train import (_build, _loss_kwargs, _post_kwargs,
                                      activation_loss, anchors_for, detection_loss_fn,
                                      make_detector_train_step, make_predict_fn, pack_targets,
                                      predict, train_detector)

__all__ = ["run_detection", "activation_quant_errors", "activation_sizes", "act_search",
           "ACT_METHODS"]

ACT_METHODS = ("hawq_v2", "uniform")
_QUANTIZED = (nn.Conv, nn.Dense, nn.ConvTranspose)


# --------------------------------------------------------------------------------------
# Activation sizes and quantization errors (any Linen model)
# --------------------------------------------------------------------------------------
def _norm(path: str) -> str:
  return quant.normalize_path(path)


def activation_sizes(model: nn.Module, variables, sample, layers: Sequence[str] | None = None,
                     *, apply_kwargs: Mapping | None = None) -> dict[str, int]:
  """Input elements per example of each Conv/Dense layer, summed over its calls.

  A module applied several times per forward pass (a RetinaNet head conv, once per pyramid
  level) stores one input per call, so its size is ``sum_calls prod(input.shape[1:])``.
  Runs the model abstractly (``jax.eval_shape``).

  Args:
    model, variables: a Linen model and its variables. sample: an input batch (any size).
    layers: layer or kernel paths to report (default: every Conv/Dense called).
    apply_kwargs: keyword arguments of ``apply`` (default ``{'train': False}``).

  Returns:
    ``{layer_path: elements}`` in first-call order.
  """
  apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
  sizes: dict[str, int] = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, _QUANTIZED) and args:
      p = "/".join(context.module.path)
      sizes[p] = sizes.get(p, 0) + int(np.prod(args[0].shape[1:]))
    return next_fun(*args, **kwargs)

  def run(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, **apply_kwargs)

  jax.eval_shape(run, variables, jnp.asarray(sample))
  if layers is None:
    return sizes
  want = [_norm(l) for l in layers]
  missing = [l for l in want if l not in sizes]
  if missing:
    raise KeyError(f"layer(s) {missing} are not called by the forward pass; Conv/Dense "
                   f"layers are {list(sizes)}")
  return {l: sizes[l] for l in want}


def activation_quant_errors(model: nn.Module, variables, batches, act_ranges: Mapping,
                            bit_choices: Sequence[int], *, layers: Sequence[str] | None = None,
                            apply_kwargs: Mapping | None = None,
                            input_key: str = "image") -> np.ndarray:
  """``[L, B]`` mean per-example squared activation quantization errors.

  For layer ``l`` with calibrated range ``[lo_l, hi_l]`` and width ``a``::

      e_l(a) = (1/N) sum_n sum_calls || Q_a(x_{n,l}) - x_{n,l} ||_2^2,

  ``Q_a = amq_jax.quant.fake_quant_act(., a, lo_l, hi_l)`` (asymmetric ``a``-bit grid over
  ``[min(lo, 0), max(hi, 0)]``, values outside clipped), ``x_{n,l}`` the input of layer
  ``l`` on example ``n`` in inference mode, summed over the layer's calls when it runs
  several times (a head conv over pyramid levels). This is the activation analogue of
  ``||Q_b(W) - W||^2`` in HAWQ-V2's Omega.

  Args:
    model, variables: a Linen model (float weights) and its variables.
    batches: an array, a batch dict (``input_key``), or an iterable of either.
    act_ranges: ``{layer: (lo, hi)}``, e.g. from :func:`amq_jax.quant.calibrate`.
    bit_choices: widths (columns). layers: rows (default: every layer of ``act_ranges``).
    apply_kwargs: keyword arguments of ``apply`` (default ``{'train': False}``).

  Returns:
    float64 ``[L, B]`` (host NumPy).
  """
  apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
  ranges = {_norm(k): (float(v[0]), float(v[1])) for k, v in act_ranges.items()}
  layers = list(ranges) if layers is None else [_norm(l) for l in layers]
  missing = [l for l in layers if l not in ranges]
  if missing:
    raise KeyError(f"no activation range for layer(s) {missing}")
  bits = tuple(int(b) for b in bit_choices)
  wanted = set(layers)

  def errors(v, x):
    acc: dict[str, jax.Array] = {}

    def rec(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and args:
        p = "/".join(context.module.path)
        if p in wanted:
          a = args[0].astype(jnp.float32)
          lo, hi = ranges[p]
          axes = tuple(range(1, a.ndim))
          e = jnp.stack([jnp.sum(jnp.square(quant.fake_quant_act(a, b, lo, hi) - a), axis=axes)
                         for b in bits], axis=-1)  # [N, B]
          acc[p] = acc[p] + e if p in acc else e
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(rec):
      model.apply(v, x, **apply_kwargs)
    return {p: jnp.sum(e, axis=0) for p, e in acc.items()}

  errors = jax.jit(errors)
  if isinstance(batches, (np.ndarray, jax.Array)) or (
      isinstance(batches, Mapping) and input_key in batches):
    batches = [batches]
  total = np.zeros((len(layers), len(bits)), np.float64)
  count = 0
  for batch in batches:
    x = batch[input_key] if isinstance(batch, Mapping) else batch
    out = jax.device_get(errors(variables, jnp.asarray(x)))
    never = [l for l in layers if l not in out]
    if never:
      raise KeyError(f"layer(s) {never} were never called by the model's forward pass")
    total += np.stack([np.asarray(out[l], np.float64) for l in layers])
    count += int(np.shape(x)[0])
  if count == 0:
    raise ValueError("activation_quant_errors got no batches")
  return total / count


# --------------------------------------------------------------------------------------
# Activation-bit search (host NumPy)
# --------------------------------------------------------------------------------------
def _uniform_act(L: int, b: int, pinned: Mapping[int, int]) -> list[int]:
  out = [int(b)] * L
  for i, pb in pinned.items():
    out[i] = int(pb)
  return out


def act_search(elems: Sequence[float], omega, bit_choices: Sequence[int], budget: str, *,
               pinned: Mapping[int, int] | None = None) -> dict:
  """Activation widths: HAWQ-V2 (least Omega within the budget) and the uniform baseline.

  The cost of a configuration ``a`` is its activation memory ``C(a) = sum_l m_l a_l``
  (bits per example; ``m_l = elems[l]``), its perturbation ``sum_l omega[l, j(a_l)]``.

  Args:
    elems: ``[L]`` input elements per example of each layer.
    omega: ``[L, B]`` ``Omega_act`` table (columns = ``bit_choices``).
    bit_choices: activation widths. pinned: ``{layer index: width}`` (in every config).
    budget: ``'uniform:b'`` (the memory of the uniform-``b`` baseline, pins included),
      ``'avg:x'`` (``x * sum_l m_l``: an average of ``x`` bits weighted by ``m_l``) or
      ``'bits:N'``.

  Returns:
    dict with ``budget_bits``, ``budget_description``, ``frontier`` (``{'cost', 'omega'}``
    lists), and ``hawq_v2`` / ``uniform``: ``{'bits': [L], 'cost': C, 'avg_bits': C /
    sum m, 'omega': total}``. The uniform baseline is the widest uniform width (pins kept)
    whose memory fits the budget.

  Raises:
    ValueError: unparsable budget, or a budget below every configuration.
  """
  m = np.asarray(elems, np.float64)
  w = np.asarray(omega, np.float64)
  bits = tuple(int(b) for b in bit_choices)
  L = len(m)
  if w.shape != (L, len(bits)):
    raise ValueError(f"omega must be [{L}, {len(bits)}], got {w.shape}")
  pinned = {int(k): int(v) for k, v in (pinned or {}).items()}
  bad = [v for v in pinned.values() if v not in bits]
  if bad:
    raise ValueError(f"pinned width(s) {bad} not among the activation bit choices {bits}")
  cost_of = lambda a: float(np.sum(m * np.asarray(a, np.float64)))  # noqa: E731
  s = str(budget).strip()
  if (mm := re.fullmatch(r"uniform:(\d+)", s)):
    b = int(mm.group(1))
    cost, desc = cost_of(_uniform_act(L, b, pinned)), f"memory of uniform {b}-bit activations"
  elif (mm := re.fullmatch(r"avg:([0-9.eE+-]+)", s)):
    cost, desc = float(mm.group(1)) * float(m.sum()), f"{mm.group(1)} average activation bits"
  elif (mm := re.fullmatch(r"bits:([0-9.eE+-]+)", s)):
    cost, desc = float(mm.group(1)), f"{mm.group(1)} activation bits per example"
  else:
    raise ValueError(f"cannot parse activation budget {budget!r}; use 'uniform:6', 'avg:6' "
                     "or 'bits:N'")
  costs = m[:, None] * np.asarray(bits, np.float64)[None, :]
  front = alloc.pareto_front(costs, w, pinned={i: bits.index(b) for i, b in pinned.items()})
  if cost < front.cost[0] * (1 - 1e-12):
    raise ValueError(f"activation budget {budget!r} ({cost:.0f} bits/example) is below the "
                     f"smallest configuration ({front.cost[0]:.0f}: every free layer at "
                     f"{min(bits)} bits, pinned layers pinned); average "
                     f"{front.cost[0] / m.sum():.3f} bits")
  chosen = {"hawq_v2": front.bits(front.at_budget(cost).index, bits)}
  fits = [b for b in bits if cost_of(_uniform_act(L, b, pinned)) <= cost * (1 + 1e-12)]
  if not fits:
    raise ValueError(f"no uniform activation width among {bits} fits the budget {budget!r}")
  chosen["uniform"] = _uniform_act(L, max(fits), pinned)

  def total_omega(a):
    return float(sum(w[l, bits.index(b)] for l, b in enumerate(a)))

  out = {"budget_bits": cost, "budget_description": desc,
         "budget_avg_bits": cost / float(m.sum()), "bit_choices": list(bits),
         "frontier": {"cost": front.cost.tolist(), "omega": front.omega.tolist()}}
  for name, a in chosen.items():
    out[name] = {"bits": [int(b) for b in a], "cost": cost_of(a),
                 "avg_bits": cost_of(a) / float(m.sum()), "omega": total_omega(a)}
  return out


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  train.write_json(path, obj)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _section(cfg, name: str) -> ml_collections.ConfigDict:
  if name not in cfg:
    raise KeyError(f"config has no '{name}' section; see configs/retinanet_fmnist_det.py")
  return cfg[name]


class _Run:
  """A detection run's model, FP32 variables, data and layout (built lazily)."""

  def __init__(self, cfg, workdir: str, mesh, log):
    self.cfg = cfg
    self.root = os.path.abspath(workdir)
    self.mesh = mesh
    self.log = log or (lambda s: None)
    self.model = _build(cfg)
    kw = cfg.get("model_kwargs", {})
    kw = kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)
    # Each head conv called once per forward pass: unique input activations for the traces.
    self.packed = models.get_model(cfg.model, **dict(kw, head_mode="packed"))
    self.loss_kw = _loss_kwargs(cfg)
    self.post_kw = _post_kwargs(cfg)
    self._sets = None

  def path(self, *parts: str) -> str:
    p = os.path.join(self.root, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

  # -- data ------------------------------------------------------------------------------
  def sets(self):
    """(train DetectionSet, test DetectionSet, image_hw) of the Fashion-MNIST detection set."""
    if self._sets is None:
      c = self.cfg
      if c.dataset != "fmnist_det":
        raise ValueError(f"run_detection supports dataset 'fmnist_det', got {c.dataset!r}")
      # The same sets as train_detector's (a deterministic function of the config).
      mk = lambda split, n: _data.make_detection_set(  # noqa: E731
          split, n, seed=c.seed, canvas=c.canvas, max_gt=c.max_gt,
          max_objects=c.get("max_objects", 4), data_dir=c.get("data_dir"))
      self._sets = (mk("train", c.train_images), mk("test", c.test_images), (c.canvas,) * 2)
    return self._sets

  def first_examples(self, n: int, batch_size: int) -> list[dict]:
    tr, _, _ = self.sets()
    n = min(n, len(tr.images)) // batch_size * batch_size
    if n == 0:
      raise ValueError(f"no full batch of {batch_size} among the training images")
    return [{"image": tr.images[i:i + batch_size], "boxes": tr.boxes[i:i + batch_size],
             "classes": tr.classes[i:i + batch_size]} for i in range(0, n, batch_size)]

  @property
  def anchors(self):
    return anchors_for(self.model, self.sets()[2], anchor_scale=self.cfg.anchor_scale)

  # -- FP32 ------------------------------------------------------------------------------
  def fp32(self) -> tuple[dict, dict]:
    vpath, rpath = self.path("fp32", "variables.msgpack"), self.path("fp32", "result.json")
    if not (os.path.isfile(vpath) and os.path.isfile(rpath)):
      state, res = train_detector(self.cfg, os.path.dirname(vpath), mesh=self.mesh, log=self.log)
      train.save_variables(vpath, jax.device_get(state.variables))
      _write_json(rpath, res)
    self.variables = train.restore_variables(vpath)
    self.params = self.variables["params"]
    sample = jnp.zeros((1,) + tuple(self.sets()[2]) + (self.cfg.channels,), jnp.float32)
    self.kernel_paths = models.layer_order(self.model, self.variables, sample)
    self.layers = [p.rsplit("/", 1)[0] for p in self.kernel_paths]
    self.sample = sample
    return self.variables, _read_json(rpath)


def _analyze(run: _Run) -> dict:
  """Weight traces, activation traces, sizes, ranges and errors -> ``analyze/*.json``."""
  hc = _section(run.cfg, "hessian")
  sc = _section(run.cfg, "search")
  anchors = run.anchors
  wpath = run.path("analyze", "weight_traces.json")
  if not os.path.isfile(wpath):
    t0 = time.time()
    batches = run.first_examples(hc.num_examples, hc.batch_size)
    loss_fn = detection_loss_fn(run.model, run.variables, anchors=anchors, **run.loss_kw)
    est = hessian.layer_traces(loss_fn, run.params, batches, key=jax.random.key(hc.seed),
                               wrt=run.kernel_paths, estimator=hc.get("estimator", "per_layer"),
                               rtol=hc.rtol, min_probes=hc.min_probes,
                               max_probes=hc.max_probes, mesh=run.mesh)
    _write_json(wpath, {"estimator": hc.get("estimator", "per_layer"), "rtol": hc.rtol,
                        "num_examples": len(batches) * hc.batch_size,
                        "seconds": time.time() - t0,
                        "layers": hessian.estimates_to_json(est)})
    run.log(f"weight traces: {time.time() - t0:.1f}s")
  tpath = run.path("analyze", "act_traces.json")
  if not os.path.isfile(tpath):
    t0 = time.time()
    ex = run.first_examples(hc.act_examples, hc.act_examples)[0]
    est = hessian.activation_traces(
        run.packed, run.variables,
        {"image": ex["image"], "label": pack_targets(ex["boxes"], ex["classes"])},
        key=jax.random.key(hc.seed + 1), layers=run.layers, probes=hc.act_probes,
        loss=activation_loss(anchors, **run.loss_kw), mesh=run.mesh)
    elems = activation_sizes(run.model, run.variables, run.sample, run.layers)
    _write_json(tpath, {
        "num_examples": int(len(ex["image"])), "probes": int(hc.act_probes),
        "seconds": time.time() - t0,
        "layers": {l: {"trace": est[l].trace, "stderr": est[l].stderr,
                       "canvas_elems": est[l].num_params, "elems": int(elems[l])}
                   for l in run.layers}})
    run.log(f"activation traces: {time.time() - t0:.1f}s")
  # Errors depend on the bit choices and calibration settings: redone (cheap) when they change.
  apath = run.path("analyze", "act_analysis.json")
  act_bits = tuple(int(b) for b in sc.act_bit_choices)
  key = {"act_bit_choices": list(act_bits), "calib_examples": int(hc.calib_examples),
         "calib_method": run.cfg.finetune.get("calib_method", "minmax"),
         "traces_seconds": _read_json(tpath)["seconds"]}
  if not os.path.isfile(apath) or _read_json(apath).get("key") != key:
    t0 = time.time()
    tr = _read_json(tpath)["layers"]
    calib = run.first_examples(hc.calib_examples, min(hc.calib_examples, 64))
    ranges = quant.calibrate(run.model, run.variables, calib,
                             {l: {"w": 8, "a": 8} for l in run.layers},
                             method=key["calib_method"], quantize_weights=False)
    errors = activation_quant_errors(run.model, run.variables, calib, ranges, act_bits,
                                     layers=run.layers)
    traces = np.array([tr[l]["trace"] for l in run.layers], np.float64)
    m = np.array([tr[l]["elems"] for l in run.layers], np.float64)
    # The Hessian is PSD at a minimum: a negative estimate (noise around zero) is clamped
    # to 0 so that it cannot reward quantization error (as for weights).
    avg = np.maximum(traces, 0.0) / m
    omega = alloc.omega_from(avg, errors)
    _write_json(apath, {
        "key": key, "layers": run.layers, "act_bit_choices": list(act_bits),
        "seconds": time.time() - t0, "elems": m.astype(int).tolist(),
        "traces": {l: dict(tr[l], avg_trace=float(a)) for l, a in zip(run.layers, avg)},
        "ranges": ranges, "errors": errors.tolist(), "omega": omega.tolist()})
  return {"weights": _read_json(wpath), "acts": _read_json(apath)}


def _search(run: _Run, analysis: dict) -> dict:
  from amq_jax.pipeline._search import Problem

  sc = _section(run.cfg, "search")
  wt = analysis["weights"]["layers"]
  pb = Problem(run.params, run.kernel_paths, {k: v["avg_trace"] for k, v in wt.items()},
               bit_choices=sc.bit_choices, symmetric=sc.get("symmetric", True),
               pin_first_last=sc.get("pin_first_last"))
  cost, desc = pb.budget(sc.budget)
  wbits = pb.at_budget(pb.front("hawq_v2"), cost)
  a = analysis["acts"]
  L = len(run.layers)
  pin = sc.get("act_pin_first_last")
  pinned = {0: int(pin), L - 1: int(pin)} if pin else {}
  act = act_search(a["elems"], np.asarray(a["omega"]), a["act_bit_choices"], sc.act_budget,
                   pinned=pinned)
  weights = {"bits": dict(zip(run.layers, map(int, wbits))), "size_mb": pb.size_mb(wbits),
             "fp32_size_mb": alloc.model_size_mb(run.params),
             "avg_bits": float(alloc.average_bits(pb.counts, wbits)),
             "omega": pb.omega_of(wbits), "budget": str(sc.budget), "budget_description": desc,
             "bit_choices": list(pb.bits), "param_counts": pb.counts.astype(int).tolist()}
  out = {"layers": run.layers, "weights": weights,
         "activations": {"budget": str(sc.act_budget),
                         "budget_description": act["budget_description"],
                         "budget_bits": act["budget_bits"],
                         "budget_avg_bits": act["budget_avg_bits"],
                         "bit_choices": act["bit_choices"], "elems": a["elems"],
                         "pinned": {run.layers[i]: b for i, b in pinned.items()},
                         "frontier_points": len(act["frontier"]["cost"])},
         "methods": {}}
  for name in ACT_METHODS:
    r = act[name]
    cfg = {l: {"w": int(w), "a": int(b)} for l, w, b in zip(run.layers, wbits, r["bits"])}
    out["methods"][name] = {"act_bits": dict(zip(run.layers, r["bits"])),
                            "act_memory_bits": r["cost"], "act_avg_bits": r["avg_bits"],
                            "omega_act": r["omega"], "config": cfg}
  _write_json(run.path("search", "bits.json"), out)
  _write_json(run.path("search", "act_frontier.json"), act["frontier"])
  return out


def _evaluate(run: _Run, predict_fn, variables) -> dict:
  _, test, _ = run.sets()
  batches = _data.detection_batches(test, run.cfg.get("eval_batch_size", 64), seed=None,
                                    drop_remainder=False)
  r = predict(predict_fn, variables, batches, mesh=run.mesh)
  return coco_evaluate(r["gt_boxes"], r["gt_classes"], r["boxes"], r["scores"], r["classes"],
                       r["valid"], num_classes=run.model.num_classes)


class _Method:
  """Jitted QAT step and predict function of one bit configuration (shared by its seeds)."""

  def __init__(self, run: _Run, name: str, bits: quant.BitConfig, ranges, ft_cfg, tx):
    from amq_jax.pipeline._finetune import qat_apply_fn

    self.name, self.bits = name, bits
    symmetric = bool(run.cfg.search.get("symmetric", True))
    self.apply_fn = qat_apply_fn(run.model, bits, ranges, symmetric=symmetric)
    self.step = make_detector_train_step(self.apply_fn, tx, run.anchors, **run.loss_kw)
    self.predict = make_predict_fn(self.apply_fn, run.anchors, run.sets()[2], **run.post_kw)
    self._ptq = None

  def ptq(self, run: _Run) -> dict:
    if self._ptq is None:
      self._ptq = _evaluate(run, self.predict, run.variables)
    return self._ptq


def _ft_config(run: _Run) -> ml_collections.ConfigDict:
  fc = _section(run.cfg, "finetune")
  c = ml_collections.ConfigDict(run.cfg.to_dict())
  c.learning_rate = fc.learning_rate
  c.warmup_steps = fc.get("warmup_steps", 0)
  c.weight_decay = fc.get("weight_decay", 0.0)
  c.batch_size = fc.batch_size
  return c


def _optimizer(ft_cfg, steps: int):
  tx = train.make_optimizer(ft_cfg, steps)
  if ft_cfg.get("clip_grad_norm", 0):
    tx = optax.chain(optax.clip_by_global_norm(ft_cfg.clip_grad_norm), tx)
  return tx


def _ft_key(run: _Run, config: Mapping) -> dict:
  """What a fine-tune result depends on (besides the FP32 model): bits and QAT settings."""
  return json.loads(json.dumps({"config": dict(config), "finetune": run.cfg.finetune.to_dict()}))


def _cached_result(run: _Run, name: str, seed: int, key: dict) -> dict | None:
  """The result of ``finetune/<name>/seed<seed>`` if it was made with ``key``; a directory
  made with other bits or settings is removed (its checkpoints must not be resumed)."""
  d = os.path.dirname(run.path("finetune", name, f"seed{seed}", "result.json"))
  kpath = os.path.join(d, "key.json")
  if os.path.isfile(kpath) and _read_json(kpath) != key:
    import shutil
    run.log(f"finetune/{name}/seed{seed} was made with other bits or settings: redone")
    shutil.rmtree(d)
    return None
  rpath = os.path.join(d, "result.json")
  return _read_json(rpath) if os.path.isfile(rpath) and os.path.isfile(kpath) else None


def _finetune(run: _Run, method: _Method, tx, seed: int, key: dict) -> dict:
  """QAT of ``method`` from the FP32 weights with data order ``seed``; cached, resumable."""
  fc = run.cfg.finetune
  out = run.path("finetune", method.name, f"seed{seed}", "result.json")
  cached = _cached_result(run, method.name, seed, key)
  if cached is not None:
    return cached
  _write_json(os.path.join(os.path.dirname(out), "key.json"), key)
  t0 = time.time()
  tr, _, _ = run.sets()
  bs, total = int(fc.batch_size), int(fc.num_steps)
  spe = _data.num_batches(tr, bs)
  if spe == 0:
    raise ValueError(f"finetune.batch_size={bs} is larger than the training set")
  state = train.replicate(train.create_state(run.variables, tx), run.mesh)
  ckpt = train.Checkpointer(os.path.join(os.path.dirname(out), "checkpoints"))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
  every = int(fc.get("checkpoint_every_steps", 100))
  log_every = int(fc.get("log_every_steps", 100))
  step, losses = int(state.step), []
  while step < total:
    epoch, offset = divmod(step, spe)
    for batch in _data.detection_batches(tr, bs, seed=seed, epoch=epoch, start=offset,
                                         flip=run.cfg.get("flip", False)):
      state, m = method.step(state, train.shard_batch(batch, run.mesh))
      step += 1
      if step % log_every == 0 or step == total:
        m = jax.device_get(m)
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"QAT loss of {method.name} is not finite at step {step}; "
                                   f"lower finetune.learning_rate ({fc.learning_rate})")
        losses.append((step, float(m["loss"])))
        run.log(f"finetune {method.name} seed {seed}: step {step}/{total} "
                f"loss {float(m['loss']):.4f}")
      if step % every == 0 or step == total:
        ckpt.save(step, state)
      if step >= total:
        break
  ckpt.close()
  t_train = time.time() - t0
  metrics = _evaluate(run, method.predict, state.variables)
  ptq = method.ptq(run)
  result = {"method": method.name, "seed": int(seed), "steps": total,
            "mAP": metrics["mAP"], "mAP50": metrics["mAP50"], "metrics": metrics,
            "ptq_mAP": ptq["mAP"], "ptq_mAP50": ptq["mAP50"], "losses": losses,
            "train_seconds": t_train, "seconds": time.time() - t0}
  _write_json(out, result)
  return result


def _stats(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "n": int(v.size), "values": v.tolist()}


def _report(run: _Run, fp32: dict, analysis: dict, search: dict, results: dict,
            timings: dict) -> dict:
  wts = analysis["weights"]["layers"]
  acts = analysis["acts"]["traces"]
  methods = {}
  for name, rs in results.items():
    sm = search["methods"][name]
    methods[name] = {"mAP": _stats([r["mAP"] for r in rs]),
                     "mAP50": _stats([r["mAP50"] for r in rs]),
                     "ptq_mAP": rs[0]["ptq_mAP"] if rs else None,
                     "seeds": [r["seed"] for r in rs], "act_bits": sm["act_bits"],
                     "act_avg_bits": sm["act_avg_bits"],
                     "act_memory_bits": sm["act_memory_bits"], "omega_act": sm["omega_act"],
                     "weight_size_mb": search["weights"]["size_mb"]}
  fc = run.cfg.finetune
  report = {"model": run.cfg.model, "dataset": run.cfg.dataset,
            "fp32": {"mAP": fp32.get("test_mAP"), "mAP50": fp32.get("test_mAP50"),
                     "steps": fp32.get("steps"), "size_mb": search["weights"]["fp32_size_mb"]},
            "weights": search["weights"], "activations": search["activations"],
            "methods": methods,
            "finetune": {"steps": int(fc.num_steps), "batch_size": int(fc.batch_size),
                         "learning_rate": float(fc.learning_rate),
                         "seeds": list(map(int, run.cfg.get("seeds", (0,))))},
            "timings": dict(timings), "total_seconds": float(sum(timings.values()))}
  _write_json(os.path.join(run.root, "report.json"), report)

  pm = lambda s: f"{s['mean']:.4f} +- {s['std']:.4f} (n={s['n']})"  # noqa: E731
  w, a = search["weights"], search["activations"]
  lines = [f"# Mixed-precision activations: {run.cfg.model} on {run.cfg.dataset}", "",
           f"FP32: mAP@[.5:.95] {report['fp32']['mAP']:.4f}, mAP@.5 "
           f"{report['fp32']['mAP50']:.4f} ({report['fp32']['steps']} steps), "
           f"{w['fp32_size_mb']:.4f} MB.", "",
           f"Weights (both methods): HAWQ-V2 at budget `{w['budget']}` ({w['budget_description']}):"
           f" {w['size_mb']:.4f} MB, {w['avg_bits']:.3f} average bits, bit choices "
           f"{w['bit_choices']}, first/last layers pinned.", "",
           f"Activation budget `{a['budget']}` ({a['budget_description']}): "
           f"{a['budget_bits']:.0f} bits of layer inputs per example = {a['budget_avg_bits']:.3f}"
           f" bits on average, weighted by each layer's input size; choices {a['bit_choices']};"
           f" pinned {a['pinned']}; exact frontier of {a['frontier_points']} points.", "",
           f"QAT: {report['finetune']['steps']} steps of batch {report['finetune']['batch_size']},"
           f" learning rate {report['finetune']['learning_rate']:g}, seeds "
           f"{report['finetune']['seeds']} (data order), weights and inputs fake-quantized.", "",
           "| method | act avg bits | act memory (bits/example) | Omega_act | weight MB | "
           "PTQ mAP | mAP@[.5:.95] | mAP@.5 |", "|---|---|---|---|---|---|---|---|"]
  for name, r in methods.items():
    lines.append(f"| {name} | {r['act_avg_bits']:.3f} | {r['act_memory_bits']:.0f} | "
                 f"{r['omega_act']:.4g} | {r['weight_size_mb']:.4f} | "
                 f"{r['ptq_mAP']:.4f} | {pm(r['mAP'])} | {pm(r['mAP50'])} |")
  if len(methods) == 2 and len({json.dumps(r["act_bits"]) for r in methods.values()}) == 1:
    lines += ["", "HAWQ-V2 chose the uniform activation widths: they are the least-Omega "
              "configuration at this budget (with these bit choices, no trade between layers "
              "lowers the total Omega_act), so both rows are the same fine-tunes."]
  lines += ["", "## Bits per layer", "",
            "| layer | params | w bits | Tr(H_w)/n | input elems | Tr(H_a)/m | "
            + " | ".join(f"a bits {n}" for n in methods) + " |",
            "|" + "---|" * (6 + len(methods))]
  for i, l in enumerate(search["layers"]):
    kp = l + "/kernel"
    lines.append(f"| {l} | {w['param_counts'][i]} | {w['bits'][l]} | "
                 f"{wts[kp]['avg_trace']:.3g} | {a['elems'][i]} | {acts[l]['avg_trace']:.3g} | "
                 + " | ".join(str(methods[n]['act_bits'][l]) for n in methods) + " |")
  lines += ["", "## Seconds per stage", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
  lines.append(f"| **total** | {report['total_seconds']:.1f} |")
  with open(os.path.join(run.root, "report.md.tmp"), "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(os.path.join(run.root, "report.md.tmp"), os.path.join(run.root, "report.md"))
  return report


def run_detection(cfg: ml_collections.ConfigDict, workdir: str, *, mesh=None,
                  log: Callable[[str], None] | None = print) -> dict:
  """FP32 -> analysis -> weight + activation search -> QAT per method and seed -> report.

  Every stage writes its outputs in ``workdir`` (atomically) and is skipped when they
  exist, so a re-run only redoes what is missing and a killed run resumes (fine-tunes from
  their last Orbax checkpoint). See the module docstring for the method, and
  ``configs/retinanet_fmnist_det.py`` for the config sections (``hessian``, ``search``,
  ``finetune``, ``seeds``).

  Args:
    cfg: a detection config (``dataset='fmnist_det'``). workdir: output directory.
    mesh: device mesh for data parallelism (default: all devices).
    log: progress lines (None: silent).

  Returns:
    The report (also ``workdir/report.json``; ``workdir/report.md`` for people).
  """
  from amq_jax.pipeline._run import Timer

  mesh = mesh or train.data_mesh()
  os.makedirs(workdir, exist_ok=True)
  run = _Run(cfg, workdir, mesh, log)
  timer = Timer(run.path("timings.json"))
  fp32_done = os.path.isfile(run.path("fp32", "variables.msgpack"))
  _, fp32 = timer.run("fp32", run.fp32, done=fp32_done)
  analysis = timer.run("analyze", lambda: _analyze(run),
                       done=all(os.path.isfile(run.path("analyze", f)) for f in
                                ("weight_traces.json", "act_traces.json")))
  search = timer.run("search", lambda: _search(run, analysis), done=False)
  seeds = [int(s) for s in cfg.get("seeds", (0,))]
  ft_cfg = _ft_config(run)
  tx = _optimizer(ft_cfg, int(cfg.finetune.num_steps))
  results = {}
  ranges = None
  for name in ACT_METHODS:
    key = _ft_key(run, search["methods"][name]["config"])
    cached = {s: _cached_result(run, name, s, key) for s in seeds}
    method = None
    if any(r is None for r in cached.values()):
      if ranges is None:
        ranges = _qat_ranges(run, search)
      bits = quant.BitConfig(search["methods"][name]["config"])
      method = _Method(run, name, bits, ranges, ft_cfg, tx)
    results[name] = [
        timer.run(f"finetune {name} seed{s}",
                  (lambda s=s: _finetune(run, method, tx, s, key)) if cached[s] is None else
                  (lambda s=s: cached[s]), done=cached[s] is not None)
        for s in seeds]
  return _report(run, fp32, analysis, search, results, dict(timer.t))


def _qat_ranges(run: _Run, search: dict) -> dict:
  """Input ranges of every layer with the HAWQ-V2 weights quantized (the same for both
  methods, whose weights are equal); ``finetune/act_ranges.json``."""
  path = run.path("finetune", "act_ranges.json")
  fc = run.cfg.finetune
  key = json.loads(json.dumps({"weights": search["weights"]["bits"],
                               "examples": int(fc.calib_examples),
                               "method": fc.get("calib_method", "minmax")}))
  if not os.path.isfile(path) or _read_json(path).get("key") != key:
    calib = run.first_examples(fc.calib_examples, min(fc.calib_examples, 64))
    ranges = quant.calibrate(run.model, run.variables, calib,
                             search["methods"]["hawq_v2"]["config"],
                             method=fc.get("calib_method", "minmax"))
    _write_json(path, {"key": key, "ranges": ranges})
  return {k: tuple(v) for k, v in _read_json(path)["ranges"].items()}
