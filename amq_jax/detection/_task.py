"""Object detection as a task of the one pipeline: RetinaNet losses, COCO mAP, data.

Only what is detection's own lives here: the focal/box loss on anchors (its curvature and
its training loss), mAP as the evaluator, the Fashion-MNIST detection set (or prepared
COCO) as batches, and the activation analysis (per-example traces w.r.t. each layer's
input, with the heads applied once per forward pass so each input is one tensor).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax.detection import _data
from amq_jax.detection._losses import detection_loss
from amq_jax.detection._train import (_loss_kwargs, _post_kwargs, activation_loss, anchors_for,
                                      make_predict_fn, pack_targets, predict)
from amq_jax.detection._coco_eval import coco_evaluate
from amq_jax.errors import ConfigError

__all__ = ["detection_task", "detection_input_shape"]


def detection_input_shape(cfg) -> tuple:
  if cfg.dataset == "fmnist_det":
    return (cfg.canvas, cfg.canvas, cfg.channels)
  return (cfg.image_size, cfg.image_size, 3)


def detection_task(cfg):
  """The RetinaNet task of a detection config (``configs/retinanet_fmnist_det.py``)."""
  from amq_jax import hessian, models
  from amq_jax.pipeline._task import Task

  from amq_jax.detection._train import detection_sources
  if cfg.dataset != "fmnist_det":
    raise ConfigError(f"the quantization pipeline reads dataset 'fmnist_det' here (got "
                      f"{cfg.dataset!r}); prepared COCO trains with amq-jax train")
  train_src, test_src = detection_sources(cfg)
  train_set, test_set = train_src.ds, test_src.ds
  kw = cfg.get("model_kwargs", {})
  kw = kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)
  module = models.get_model(cfg.model, **kw)
  hw = (cfg.canvas, cfg.canvas)
  anchors = jnp.asarray(anchors_for(module, hw, anchor_scale=cfg.anchor_scale))
  loss_kw, post_kw = _loss_kwargs(cfg), _post_kwargs(cfg)
  eval_bs = int(cfg.train.get("eval_batch_size", 64))

  def first_batches(n, bs):
    n = min(int(n), len(train_set.images)) // int(bs) * int(bs)
    if n == 0:
      raise ConfigError(f"no full batch of {bs} among the {len(train_set.images)} training "
                        "images; lower the batch size or raise train_images")
    return [{"image": train_set.images[i:i + bs], "boxes": train_set.boxes[i:i + bs],
             "classes": train_set.classes[i:i + bs]} for i in range(0, n, bs)]

  def curvature_loss(model):
    def loss_fn(params, batch):
      out, _ = model.apply(params, model.state, batch["image"], train=False)
      return detection_loss(out, batch["boxes"], batch["classes"], anchors, **loss_kw)[0]
    return loss_fn

  def train_loss(apply):
    def loss_fn(params, state, batch, *, train=True):
      out, new_state = apply(params, state, batch["image"], train=train)
      loss, parts = detection_loss(out, batch["boxes"], batch["classes"], anchors, **loss_kw)
      return loss, (parts, new_state)
    return loss_fn

  @functools.lru_cache(maxsize=4)
  def predict_fn(apply):
    # One compiled predict per apply: a fine-tune evaluates the same quantized apply
    # before, after and from the exported file.
    return make_predict_fn(lambda v, x, t: apply(v["params"], v["state"], x, train=t),
                           anchors, hw, **post_kw)

  def evaluate(apply, params, state) -> dict:
    fn = predict_fn(apply)
    batches = _data.detection_batches(test_set, eval_bs, seed=None, drop_remainder=False)
    r = predict(fn, {"params": params, "state": state}, batches)
    return coco_evaluate(r["gt_boxes"], r["gt_classes"], r["boxes"], r["scores"],
                         r["classes"], r["valid"], num_classes=module.num_classes)

  def activation_traces(model, hc, key) -> dict[str, tuple[float, float]]:
    # Heads applied once per forward pass: every layer's input is a single tensor.
    packed = models.get_model(cfg.model, **dict(kw, head_mode="packed"))
    ex = first_batches(hc.act_examples, hc.act_examples)[0]
    est = hessian.activation_traces(
        packed, dict(model.state, params=model.params),
        {"image": ex["image"], "label": pack_targets(ex["boxes"], ex["classes"])},
        key=key, layers=model.layers.names, probes=hc.act_probes,
        loss=activation_loss(anchors, **loss_kw))
    return {l: (float(est[l].trace), float(est[l].stderr)) for l in model.layers.names}

  return Task("detection", "mAP", train_src,
              first_batches, curvature_loss, train_loss, evaluate, logits_fn=None,
              activation_traces=activation_traces, chance=None)
