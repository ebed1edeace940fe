"""What a task gives the stages: losses, batches and an evaluator. Nothing else differs.

A :class:`Task` is plain data: functions and data sources. Classification (here) and
detection (:mod:`amq_jax.detection`) are two of them; a user's task is a third.

* ``curvature_loss(model)`` -> ``loss_fn(params, batch)``: the loss whose curvature is
  measured (inference mode, state fixed);
* ``logits_fn(model)`` -> ``logits_fn(params, batch) -> [N, C]`` for Gauss-Newton/Fisher
  curvature (None: only the Hessian);
* ``train_loss(apply)`` -> ``loss_fn(params, state, batch, *, train) -> (loss, (metrics,
  new_state))`` for :func:`amq_jax.train.fit` (FP32 training and QAT alike);
* ``evaluate(apply, params, state)`` -> metrics, ``metric`` naming the one that ranks;
* ``train_source`` (``steps_per_epoch``, ``train_batches``) and ``first_batches(n, bs)``
  (the first training examples, fixed, no augmentation: analysis and calibration);
* ``activation_traces(model, hessian_cfg, key)`` -> ``{layer: (trace, stderr)}`` of each
  layer's input activation, or None.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["Task", "classification_task", "xent_train_loss"]


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  name: str
  metric: str
  train_source: Any
  first_batches: Callable[[int, int], list]
  curvature_loss: Callable
  train_loss: Callable
  evaluate: Callable
  logits_fn: Callable | None = None
  activation_traces: Callable | None = None
  chance: float | None = None
  input_key: str = "image"

  def __repr__(self) -> str:
    return f"Task({self.name}, metric={self.metric})"


def xent_train_loss(apply: Callable) -> Callable:
  """Softmax cross-entropy training loss of ``apply(params, state, x, *, train)``."""
  def loss_fn(params, state, batch, *, train=True):
    logits, new_state = apply(params, state, batch["image"], train=train)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"accuracy": acc}, new_state)
  return loss_fn


def _first_batches(source, num_examples: int, batch_size: int) -> list[dict]:
  from amq_jax.errors import ConfigError
  n = min(int(num_examples), source.num_examples) // int(batch_size)
  if n == 0:
    raise ConfigError(f"{num_examples} examples give no full batch of {batch_size}; raise the "
                      "number of examples or lower the batch size (hessian.num_examples / "
                      "hessian.batch_size, finetune.calib_examples)")
  out = []
  for b in source.eval_batches(int(batch_size)):
    if len(out) == n or len(b["label"]) < batch_size:
      break
    out.append({"image": np.asarray(b["image"]), "label": np.asarray(b["label"])})
  return out


def classification_task(train_data, test_data, *, augment: bool = False,
                        eval_batch_size: int = 1000, num_classes: int | None = None) -> Task:
  """Image classification with softmax cross-entropy, top-1 accuracy.

  Args:
    train_data, test_data: ``amq_jax.data.fashion_mnist.Dataset``s or data sources
      (``amq_jax.data.InMemorySource``/``TfdsSource``); batches are
      ``{'image': [N, H, W, C] float32, 'label': [N] int}``.
    augment: crop/flip augmentation of the training batches.
  """
  from amq_jax import train
  from amq_jax.data import as_source

  train_src = as_source(train_data, augment=augment)
  plain_src = as_source(train_data)

  def curvature_loss(model):
    def loss_fn(params, batch):
      logits, _ = model.apply(params, model.state, batch["image"], train=False)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), batch["label"]).mean()
    return loss_fn

  def logits_fn(model):
    return lambda params, batch: model.apply(params, model.state, batch["image"], train=False)[0]

  # One compiled step per apply function: a fine-tune evaluates the same quantized apply
  # before, after and from the exported file.
  eval_steps = weakref.WeakKeyDictionary()

  def evaluate(apply, params, state) -> dict:
    try:
      step = eval_steps.get(apply)
    except TypeError:  # not weakly referenceable: compile for this call only
      step = None
    if step is None:
      def as_apply_fn(variables, images, is_train):
        return apply(variables["params"], variables["state"], images, train=is_train)
      step = train.make_eval_step(as_apply_fn)
      try:
        eval_steps[apply] = step
      except TypeError:
        pass
    return train.evaluate(step, {"params": params, "state": state}, test_data,
                          batch_size=eval_batch_size, mesh=train.data_mesh())

  return Task("classification", "accuracy", train_src,
              lambda n, bs: _first_batches(plain_src, n, bs), curvature_loss,
              xent_train_loss, evaluate, logits_fn=logits_fn,
              chance=None if not num_classes else 1.0 / num_classes)
