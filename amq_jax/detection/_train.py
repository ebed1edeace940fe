"""Training and evaluating RetinaNet: jitted steps, COCO mAP, Orbax resume, loss for Hessians.

The step mirrors :func:`amq_jax.train.make_train_step` (the same :class:`TrainState`,
optimizer factory and data-parallel placement) with the detection loss: anchors are a
constant of the image size, targets are assigned inside the jitted step from the padded
ground truth, so the host only ships images and boxes.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from amq_jax import models
from amq_jax.detection import _data
from amq_jax.detection._anchors import AnchorConfig, generate_anchors
from amq_jax.detection._coco_eval import coco_evaluate
from amq_jax.detection._losses import detection_loss, per_example_detection_loss
from amq_jax.detection._nms import batched_postprocess
from amq_jax.train import (Checkpointer, TrainState, create_state, data_mesh, make_optimizer,
                           replicate, shard_batch)

__all__ = ["anchor_config_for", "anchors_for", "detector_apply_fn", "make_detector_train_step",
           "make_predict_fn", "predict", "evaluate_map", "detection_loss_fn",
           "pack_targets", "activation_loss", "train_detector"]

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
  from amq_jax.train import linen_apply_fn
  return linen_apply_fn(model)


def make_detector_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, anchors,
                             **loss_kw):
  """Jitted ``step(state, batch) -> (state, metrics)``; batch ``{'image','boxes','classes'}``.

  ``loss_kw`` go to :func:`amq_jax.detection.detection_loss` (alpha, gamma, beta...).
  Metrics: ``loss``, ``cls``, ``box``, ``num_pos``.
  """
  anchors = jnp.asarray(anchors)

  def step(state: TrainState, batch):
    def loss_fn(params):
      v = dict(state.variables, params=params)
      out, new_stats = apply_fn(v, batch["image"], True)
      loss, parts = detection_loss(out, batch["boxes"], batch["classes"], anchors, **loss_kw)
      return loss, (parts, new_stats)
    (loss, (parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=new_stats if new_stats is not None else state.batch_stats)
    return new_state, dict(parts, loss=loss)
  return jax.jit(step, donate_argnums=0)


def make_predict_fn(apply_fn: ApplyFn, anchors, image_hw, **post_kw):
  """Jitted ``predict(variables, images) -> detections`` (see ``batched_postprocess``)."""
  anchors = jnp.asarray(anchors)

  def predict(variables, images):
    out, _ = apply_fn(variables, images, False)
    return batched_postprocess(out, anchors, image_hw=tuple(image_hw), **post_kw)
  return jax.jit(predict)


def predict(predict_fn, variables, batches: Iterable[dict], *, mesh=None) -> dict:
  """Runs ``predict_fn`` over batches; returns host arrays of detections and ground truth."""
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
    det = jax.device_get(predict_fn(variables, shard_batch(img, mesh)))
    for name in keys:
      acc[name].append(np.asarray(det[name])[:k])
    acc["gt_boxes"].append(np.asarray(batch["boxes"]))
    acc["gt_classes"].append(np.asarray(batch["classes"]))
  return {k: np.concatenate(v) for k, v in acc.items()}


def evaluate_map(model: nn.Module, variables, data, *, anchors, batch_size: int = 64,
                 num_classes: int | None = None, mesh=None, apply_fn: ApplyFn | None = None,
                 **post_kw) -> dict:
  """COCO mAP of ``model`` on ``data`` (a :class:`DetectionSet` or an iterable of batches).

  Args:
    model, variables: the detector. anchors: ``[A, 4]`` for the data's image size.
    batch_size: for a ``DetectionSet`` (the last batch is kept). num_classes: category
      list for COCO (default ``model.num_classes``). apply_fn: e.g. a quantized apply
      (default the model's own). post_kw: :func:`postprocess` options.

  Returns:
    :func:`coco_evaluate`'s dict (``mAP``, ``mAP50``, ...).
  """
  if isinstance(data, _data.DetectionSet):
    image_hw = data.images.shape[1:3]
    data = _data.detection_batches(data, batch_size, seed=None, drop_remainder=False)
  else:
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
# End-to-end training from a config
# --------------------------------------------------------------------------------------
def _loss_kwargs(config) -> dict:
  lc = config.get("loss", None)
  if lc is None:
    return {}
  return {k: lc[k] for k in ("alpha", "gamma", "beta", "box_loss", "box_weight", "pos_iou",
                             "neg_iou") if k in lc}


def _post_kwargs(config) -> dict:
  ec = config.get("eval", None)
  if ec is None:
    return {}
  return {k: ec[k] for k in ("score_threshold", "pre_nms_topk", "iou_threshold",
                             "max_detections", "class_agnostic") if k in ec}


def _build(config):
  kw = config.get("model_kwargs", {})
  kw = kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)
  return models.get_model(config.model, **kw)


def _load_data(config):
  """(train batches factory, eval data, image_hw)."""
  if config.dataset == "fmnist_det":
    mk = lambda split, n, seed: _data.make_detection_set(  # noqa: E731
        split, n, seed=seed, canvas=config.canvas, max_gt=config.max_gt,
        max_objects=config.get("max_objects", 4), data_dir=config.get("data_dir"))
    train = mk("train", config.train_images, config.seed)
    test = mk("test", config.test_images, config.seed)

    def batches(epoch, start):
      return _data.detection_batches(train, config.batch_size, seed=config.seed, epoch=epoch,
                                     start=start, flip=config.get("flip", False))
    return batches, _data.num_batches(train, config.batch_size), test, (config.canvas,) * 2
  if config.dataset == "coco":
    src, _ = _data.open_coco(config.train_split, data_dir=config.get("data_dir"))
    ev, _ = _data.open_coco(config.eval_split, data_dir=config.get("data_dir"))
    limit = config.get("train_limit", None)
    pi, pc = jax.process_index(), jax.process_count()
    local_bs = config.batch_size // pc

    def batches(epoch, start):
      return _data.coco_batches(src, local_bs, image_size=config.image_size,
                                max_gt=config.max_gt, train=True, seed=config.seed,
                                epoch=epoch, start=start, process_index=pi,
                                process_count=pc, limit=limit)
    n = (min(limit, len(src)) if limit else len(src)) // config.batch_size
    # A generator: read once, at evaluation time (the split does not fit in memory).
    eval_data = _data.coco_batches(ev, config.eval_batch_size, image_size=config.image_size,
                                   max_gt=config.max_gt, limit=config.get("eval_limit"),
                                   drop_remainder=False)
    return batches, n, eval_data, (config.image_size,) * 2
  raise ValueError(f"unknown detection dataset {config.dataset!r}; use 'fmnist_det' or 'coco'")


def train_detector(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
                   log: Callable[[str], None] | None = print) -> tuple[TrainState, dict]:
  """Trains a RetinaNet from ``config`` in ``workdir`` (resumes from its checkpoints).

  Config fields: ``model``, ``model_kwargs``, ``dataset`` ('fmnist_det' or 'coco') and its
  data fields, ``anchor_scale``, ``batch_size``, ``num_steps``, optimizer fields of
  :func:`amq_jax.train.make_optimizer` (``optimizer``, ``learning_rate``, ``momentum``,
  ``weight_decay``, ``warmup_steps``), ``clip_grad_norm``, ``loss.*``, ``eval.*``,
  ``checkpoint_every_steps``, ``log_every_steps``, ``seed``.

  Returns:
    ``(state, result)`` with ``result`` holding the final loss, seconds per step and the
    test COCO metrics (``test_mAP``, ``test_mAP50``...).
  """
  mesh = mesh or data_mesh()
  model = _build(config)
  batches, steps_per_epoch, test, image_hw = _load_data(config)
  if steps_per_epoch == 0:
    raise ValueError("batch_size is larger than the training set")
  anchors = anchors_for(model, image_hw, anchor_scale=config.anchor_scale)
  total = int(config.num_steps)
  tx = make_optimizer(config, total)
  if config.get("clip_grad_norm", 0):
    tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
  sample = jnp.zeros((1,) + tuple(image_hw) + (config.channels,), jnp.float32)
  # The 'rbg' generator compiles ~3x faster than threefry on CPU for a model's init.
  variables = jax.jit(lambda k: model.init(k, sample, train=False))(
      jax.random.key(config.seed, impl="rbg"))
  state = replicate(create_state(variables, tx), mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
  apply_fn = detector_apply_fn(model)
  step_fn = make_detector_train_step(apply_fn, tx, anchors, **_loss_kwargs(config))
  every = int(config.get("checkpoint_every_steps", 200))
  log_every = int(config.get("log_every_steps", 50))
  step = int(state.step)
  losses, rates = [], []
  t_last, s_last = time.time(), step
  while step < total:
    epoch, offset = divmod(step, steps_per_epoch)
    for batch in batches(epoch, offset):
      state, m = step_fn(state, shard_batch(batch, mesh))
      step += 1
      if step % log_every == 0 or step == total or step % every == 0:
        m = jax.device_get(m)
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"detector loss is not finite at step {step}; lower "
                                   f"--config.learning_rate (now {config.learning_rate})")
        now = time.time()
        rates.append((now - t_last) / max(1, step - s_last))
        t_last, s_last = now, step
        losses.append((step, float(m["loss"])))
        if log is not None:
          log(f"step {step}/{total} loss {float(m['loss']):.4f} cls {float(m['cls']):.4f} "
              f"box {float(m['box']):.4f} pos {float(m['num_pos']):.0f}")
      if step % every == 0 or step == total:
        ckpt.save(step, state)
      if step >= total:
        break
  ckpt.close()
  # The first interval includes compilation: report the median of the others.
  result = {"steps": total, "final_loss": losses[-1][1] if losses else None,
            "losses": losses,
            "seconds_per_step": float(np.median(rates[1:] if len(rates) > 1 else rates))
            if rates else None}
  metrics = evaluate_map(model, state.variables, test, anchors=anchors,
                         batch_size=config.get("eval_batch_size", 64), mesh=mesh,
                         **_post_kwargs(config))
  result.update({f"test_{k}": v for k, v in metrics.items()})
  return state, result
