"""Training and evaluating RetinaNet through the shared loop: losses, sources, COCO mAP.

Detection brings only what is its own to :func:`amq_jax.train.fit`: the training loss
(:func:`detection_train_loss`: focal + box loss, targets assigned inside the jitted step from
the padded ground truth, anchors a constant of the image size), the batch sources
(:class:`DetectionSource`, :class:`CocoSource`) and the evaluator (:func:`evaluate_map`).
:func:`train_detector` is the FP32 stage of a detection config put together from them:

>>> model = build_detector(config)
>>> train_src, test_src = detection_sources(config)
>>> anchors = anchors_for(model, train_src.image_hw, anchor_scale=config.anchor_scale)
>>> loss_fn = detection_train_loss(detector_apply_fn(model), anchors, **loss_kwargs(config))
>>> ts, res = train.fit(loss_fn, params, {'batch_stats': stats}, train_src, config.train,
...                     workdir=w, seed=config.seed)
>>> evaluate_map(model, ts.variables, test_src, anchors=anchors)['mAP']
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from amq_jax import models
from amq_jax._sharding import data_mesh, process_slice, serial_on_cpu, shard_batch
from amq_jax.detection import _data
from amq_jax.detection._anchors import AnchorConfig, generate_anchors
from amq_jax.detection._coco_eval import coco_evaluate
from amq_jax.detection._data import CocoSource, DetectionSource
from amq_jax.detection._losses import detection_loss, per_example_detection_loss
from amq_jax.detection._nms import batched_postprocess
from amq_jax.errors import ConfigError
from amq_jax.train import TrainState, fit, linen_apply_fn, make_step, read_section

__all__ = ["anchor_config_for", "anchors_for", "detector_apply_fn", "detection_train_loss",
           "make_detector_train_step", "make_predict_fn", "predict", "evaluate_map",
           "detection_loss_fn", "pack_targets", "activation_loss", "build_detector",
           "detection_sources", "init_detector", "loss_kwargs", "post_kwargs",
           "train_detector"]

# apply_fn(variables, images, train) -> (outputs dict, new batch_stats or None)
ApplyFn = Callable[[Any, jax.Array, bool], tuple[dict, Any]]


def anchor_config_for(model: nn.Module, *, anchor_scale: float = 4.0) -> AnchorConfig:
  """The :class:`AnchorConfig` matching a RetinaNet's levels and anchor count."""
  cfg = AnchorConfig(min_level=model.min_level, max_level=model.max_level,
                     anchor_scale=anchor_scale)
  if cfg.num_anchors != model.num_anchors:
    raise ValueError(f"model has {model.num_anchors} anchors per location, the default "
                     f"anchor layout {cfg.num_anchors}; pass an AnchorConfig")
  return cfg


def anchors_for(model: nn.Module, image_hw, *, anchor_scale: float = 4.0) -> np.ndarray:
  return generate_anchors(tuple(image_hw), anchor_config_for(model, anchor_scale=anchor_scale))


def detector_apply_fn(model: nn.Module) -> ApplyFn:
  """``apply_fn(variables, images, train) -> (outputs, new_batch_stats)`` of a Linen detector
  (the classification loop's own: the outputs are a dict here instead of logits)."""
  return linen_apply_fn(model)


def detection_train_loss(apply_fn: ApplyFn, anchors, **loss_kw) -> Callable:
  """``loss_fn(params, state, batch, *, train=True)`` of :func:`amq_jax.train.fit` for a
  detector: :func:`amq_jax.detection.detection_loss` (focal classification + box
  regression) of ``apply_fn``'s outputs on ``batch = {'image', 'boxes', 'classes'}``.

  Metrics: ``cls``, ``box`` (the two loss terms) and ``num_pos`` (positive anchors).
  ``loss_kw`` go to ``detection_loss`` (alpha, gamma, beta, box_loss, ...). ``apply_fn``
  is the model's own (:func:`detector_apply_fn`) or a fake-quantized one for QAT.
  """
  anchors = jnp.asarray(anchors)

  def loss_fn(params, state, batch, *, train=True):
    out, new_stats = apply_fn({"params": params, **state}, batch["image"], train)
    loss, parts = detection_loss(out, batch["boxes"], batch["classes"], anchors, **loss_kw)
    new_state = state if new_stats is None else dict(state, batch_stats=new_stats)
    return loss, (dict(parts), new_state)
  return loss_fn


def make_detector_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, anchors,
                             **loss_kw):
  """Jitted ``step(state, batch) -> (state, metrics)``: :func:`amq_jax.train.make_step` of
  :func:`detection_train_loss` (metrics ``loss``, ``cls``, ``box``, ``num_pos``,
  ``grad_norm``)."""
  return make_step(detection_train_loss(apply_fn, anchors, **loss_kw), tx)


def make_predict_fn(apply_fn: ApplyFn, anchors, image_hw, **post_kw):
  """Jitted ``predict(variables, images) -> detections`` (see ``batched_postprocess``)."""
  anchors = jnp.asarray(anchors)

  def predict(variables, images):
    out, _ = apply_fn(variables, images, False)
    return batched_postprocess(out, anchors, image_hw=tuple(image_hw), **post_kw)
  return serial_on_cpu(jax.jit(predict))


def _gather(tree):
  """Host copy of device values sharded over the batch (all processes' rows)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def predict(predict_fn, variables, batches: Iterable[dict], *, mesh=None) -> dict:
  """Runs ``predict_fn`` over batches; returns host arrays of detections and ground truth.

  Every process passes the same (global) batches; each places its slice, and the
  detections of all of them are gathered.
  """
  mesh = mesh or data_mesh()
  n_dev = mesh.devices.size
  keys = ("boxes", "scores", "classes", "valid")
  acc: dict[str, list] = {k: [] for k in keys + ("gt_boxes", "gt_classes")}
  for batch in batches:
    img = np.asarray(batch["image"])
    k = len(img)
    pad = -k % n_dev
    if pad:
      img = np.concatenate([img, np.zeros((pad,) + img.shape[1:], img.dtype)])
    det = _gather(predict_fn(variables, shard_batch(process_slice(img), mesh)))
    for name in keys:
      acc[name].append(np.asarray(det[name])[:k])
    acc["gt_boxes"].append(np.asarray(batch["boxes"]))
    acc["gt_classes"].append(np.asarray(batch["classes"]))
  return {k: np.concatenate(v) for k, v in acc.items()}


def evaluate_map(model: nn.Module, variables, data, *, anchors, batch_size: int = 64,
                 num_classes: int | None = None, mesh=None, apply_fn: ApplyFn | None = None,
                 **post_kw) -> dict:
  """COCO mAP of ``model`` on ``data``: a :class:`DetectionSet`, a source (its
  ``eval_batches``) or an iterable of batches.

  Args:
    model, variables: the detector. anchors: ``[A, 4]`` for the data's image size.
    batch_size: for a ``DetectionSet`` or a source (the last batch is kept). num_classes:
      category list for COCO (default ``model.num_classes``). apply_fn: e.g. a quantized
      apply (default the model's own). post_kw: :func:`postprocess` options.

  Returns:
    :func:`coco_evaluate`'s dict (``mAP``, ``mAP50``, ...).
  """
  if isinstance(data, _data.DetectionSet):
    data = DetectionSource(data)
  if hasattr(data, "eval_batches"):
    data = data.eval_batches(batch_size)
  data = iter(data)
  first = next(data)
  image_hw = np.shape(first["image"])[1:3]
  data = _chain(first, data)
  fn = make_predict_fn(apply_fn or detector_apply_fn(model), anchors, image_hw, **post_kw)
  r = predict(fn, variables, data, mesh=mesh)
  return coco_evaluate(r["gt_boxes"], r["gt_classes"], r["boxes"], r["scores"], r["classes"],
                       r["valid"], num_classes=num_classes or model.num_classes)


def _chain(first, rest):
  yield first
  yield from rest


def detection_loss_fn(model: nn.Module, variables, *, anchors=None, anchor_scale: float = 4.0,
                      **loss_kw) -> Callable:
  """``loss_fn(params, batch) -> scalar`` of a detector in inference mode, for Hessians.

  As :func:`amq_jax.hessian.linen_loss_fn` for classifiers: the non-params collections
  (BatchNorm statistics) are held fixed and ``train=False``. ``batch`` is
  ``{'image', 'boxes', 'classes'}``; the anchors follow the image size (or pass them).
  Works with :func:`amq_jax.hessian.layer_traces` and ``top_eigenvalues``.
  """
  others = {k: v for k, v in variables.items() if k != "params"}
  fixed = None if anchors is None else jnp.asarray(anchors)

  def loss_fn(params, batch):
    a = fixed if fixed is not None else jnp.asarray(
        anchors_for(model, batch["image"].shape[1:3], anchor_scale=anchor_scale))
    out = model.apply({"params": params, **others}, batch["image"], train=False)
    return detection_loss(out, batch["boxes"], batch["classes"], a, **loss_kw)[0]
  return loss_fn


def pack_targets(boxes, classes) -> np.ndarray:
  """``[N, G, 4], [N, G] -> [N, G, 5]`` (box, class as float): ONE label array per example,
  the form ``amq_jax.hessian.activation_traces`` expects as ``batch['label']``."""
  return np.concatenate([np.asarray(boxes, np.float32),
                         np.asarray(classes, np.float32)[..., None]], axis=-1)


def activation_loss(anchors, **loss_kw) -> Callable:
  """``loss(outputs, packed [B, G, 5]) -> [B]`` per-example detection losses.

  For ``activation_traces(model, variables, {'image': x, 'label': pack_targets(b, c)},
  loss=activation_loss(anchors), key=...)`` on a RetinaNet built with
  ``head_mode='packed'`` (each head conv called once per forward pass).
  """
  anchors = jnp.asarray(anchors)

  def loss(outputs, packed):
    cls = jnp.round(packed[..., 4]).astype(jnp.int32)
    return per_example_detection_loss(outputs, packed[..., :4], cls, anchors, **loss_kw)
  return loss


# --------------------------------------------------------------------------------------
# The pieces of a detection config, and its FP32 stage
# --------------------------------------------------------------------------------------
def loss_kwargs(config) -> dict:
  """``config.loss`` fields for :func:`detection_loss` (alpha, gamma, beta, ...)."""
  lc = config.get("loss", None)
  if lc is None:
    return {}
  return {k: lc[k] for k in ("alpha", "gamma", "beta", "box_loss", "box_weight", "pos_iou",
                             "neg_iou") if k in lc}


def post_kwargs(config) -> dict:
  """``config.eval`` fields for :func:`postprocess` (score threshold, NMS, ...)."""
  ec = config.get("eval", None)
  if ec is None:
    return {}
  return {k: ec[k] for k in ("score_threshold", "pre_nms_topk", "iou_threshold",
                             "max_detections", "class_agnostic") if k in ec}


def build_detector(config) -> nn.Module:
  kw = config.get("model_kwargs", {})
  kw = kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)
  return models.get_model(config.model, **kw)


# COMPAT: the names detection/_pipeline.py imports (it goes with the pipeline rewrite).
_build, _loss_kwargs, _post_kwargs = build_detector, loss_kwargs, post_kwargs


def detection_sources(config, *, augment: bool | None = None):
  """``(train_source, test_source)`` of a detection config.

  ``dataset='fmnist_det'``: :class:`DetectionSource` s of the Fashion-MNIST detection set
  (``train_images``/``test_images`` canvases of ``canvas`` px, a function of ``seed``);
  ``'coco'``: :class:`CocoSource` s of the prepared TFDS splits (``train_split``,
  ``eval_split``, ``train_limit``, ``eval_limit``, ``image_size``). ``augment`` (flips of
  the training batches) defaults to ``config.train.augment``.
  """
  if augment is None:
    augment = bool(read_section(config.train, field_prefix="train")["augment"])
  if config.dataset == "fmnist_det":
    mk = lambda split, n: _data.make_detection_set(  # noqa: E731
        split, n, seed=config.seed, canvas=config.canvas, max_gt=config.max_gt,
        max_objects=config.get("max_objects", 4), data_dir=config.get("data_dir"))
    return (DetectionSource(mk("train", config.train_images), augment=augment),
            DetectionSource(mk("test", config.test_images)))
  if config.dataset == "coco":
    kw = dict(data_dir=config.get("data_dir"), image_size=config.image_size,
              max_gt=config.max_gt)
    return (CocoSource(config.train_split, limit=config.get("train_limit"), augment=augment,
                       **kw),
            CocoSource(config.eval_split, limit=config.get("eval_limit"), augment=False, **kw))
  raise ConfigError(f"dataset={config.dataset!r} is not a detection data set; use "
                    "'fmnist_det' or 'coco'")


def init_detector(model: nn.Module, image_hw, channels: int, *, seed: int):
  """Fresh variables of ``model`` for ``[1, H, W, channels]`` images."""
  sample = jnp.zeros((1,) + tuple(image_hw) + (int(channels),), jnp.float32)
  # The 'rbg' generator compiles ~3x faster than threefry on CPU for a model's init.
  return jax.jit(lambda k: model.init(k, sample, train=False))(
      jax.random.key(seed, impl="rbg"))


def train_detector(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
                   progress: bool | None = None,
                   log: Callable[[str], None] | None = None) -> tuple[TrainState, dict]:
  """Trains a detection config's RetinaNet in FP32 with ``config.train`` in ``workdir``
  (resumes from ``workdir/checkpoints``), then evaluates COCO mAP on its test split.

  Config fields: ``model``, ``model_kwargs``, ``dataset`` and its data fields,
  ``anchor_scale``, ``channels``, ``seed``, ``loss.*``, ``eval.*`` and the optimization
  section ``train`` (see :mod:`amq_jax.train`). ``progress`` defaults to
  ``config.progress``; ``log``, if given, gets a one-line summary at the end.

  Returns:
    ``(state, result)``: :func:`amq_jax.train.fit`'s result plus ``final_loss`` and the
    test COCO metrics (``test_mAP``, ``test_mAP50``, ...).
  """
  sec = read_section(config.train, field_prefix="train")
  model = build_detector(config)
  train_src, test_src = detection_sources(config, augment=sec["augment"])
  anchors = anchors_for(model, train_src.image_hw, anchor_scale=config.anchor_scale)
  variables = init_detector(model, train_src.image_hw, config.channels, seed=config.seed)
  others = {k: v for k, v in variables.items() if k != "params"}
  loss_fn = detection_train_loss(detector_apply_fn(model), anchors, **loss_kwargs(config))
  show = config.get("progress", True) if progress is None else progress
  state, result = fit(loss_fn, variables["params"], others, train_src, sec, workdir=workdir,
                      seed=config.seed, desc="fp32", progress=show, mesh=mesh)
  metrics = evaluate_map(model, state.variables, test_src, anchors=anchors,
                         batch_size=sec["eval_batch_size"], mesh=mesh, **post_kwargs(config))
  result["final_loss"] = result["train_loss"]
  result.update({f"test_{k}": v for k, v in metrics.items()})
  if log is not None:
    log(f"detector: {result['steps']} steps, final loss {result['final_loss']}, "
        f"test mAP {result['test_mAP']:.4f}")
  return state, result
