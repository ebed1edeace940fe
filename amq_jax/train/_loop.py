"""FP32 training and evaluation: optax, a jitted data-parallel step, Orbax resume.

The loop is shared with quantization-aware fine-tuning: it only sees an ``apply_fn``,

    apply_fn(variables, images, train: bool) -> (logits, new_batch_stats or None)

so QAT passes an apply that fake-quantizes and FP32 passes the model's own.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from amq_jax.data._sources import as_source
from amq_jax.train._checkpoint import Checkpointer
from amq_jax.train._sharding import data_mesh, replicate, shard_batch

ApplyFn = Callable[[Any, jax.Array, bool], tuple[jax.Array, Any]]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    v = {"params": self.params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/Inf; the message says where and what to change."""


def linen_apply_fn(model: nn.Module) -> ApplyFn:
  """The ``apply_fn`` of a Linen model with optional BatchNorm ('batch_stats')."""
  def apply_fn(variables, images, train):
    if train and "batch_stats" in variables:
      logits, upd = model.apply(variables, images, train=True, mutable=["batch_stats"])
      return logits, upd["batch_stats"]
    return model.apply(variables, images, train=train), None
  return apply_fn


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """SGD+Nesterov momentum (or Adam) with linear warm-up and cosine decay; weight decay
  on kernels only (not on BatchNorm scales or biases)."""
  warmup = int(config.get("warmup_steps", 0) or 0)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else config.learning_rate, peak_value=config.learning_rate,
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=config.learning_rate * config.get("final_lr_fraction", 0.0))
  name = config.get("optimizer", "sgd")
  if name == "sgd":
    opt = optax.sgd(schedule, momentum=config.get("momentum", 0.9), nesterov=True)
  elif name == "adam":
    opt = optax.adam(schedule)
  else:
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")
  wd = config.get("weight_decay", 0.0)
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
  return optax.chain(optax.add_decayed_weights(wd, mask=mask), opt) if wd else opt


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation):
  """Jitted ``step(state, batch) -> (state, metrics)``; sharding follows the inputs."""
  def step(state: TrainState, batch):
    def loss_fn(params):
      v = dict(state.variables, params=params)
      logits, new_stats = apply_fn(v, batch["image"], True)
      loss = _xent(logits, batch["label"]).mean()
      return loss, (logits, new_stats)
    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=new_stats if new_stats is not None else state.batch_stats)
    return new_state, {"loss": loss, "accuracy": acc}
  return jax.jit(step, donate_argnums=0)


def make_eval_step(apply_fn: ApplyFn):
  """Jitted ``eval(variables, batch) -> (sum loss, sum correct, count)`` over masked examples."""
  def ev(variables, batch):
    logits, _ = apply_fn(variables, batch["image"], False)
    m = batch["mask"]
    return (jnp.sum(_xent(logits, batch["label"]) * m),
            jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * m), jnp.sum(m))
  return jax.jit(ev)


def evaluate(eval_step, variables, data, *, batch_size: int, mesh) -> dict:
  """Top-1 accuracy and mean loss over every example of ``data`` (a Dataset or a source);
  short batches are padded to a multiple of the device count and masked."""
  n_dev = mesh.devices.size
  totals = np.zeros(3)
  for b in as_source(data).eval_batches(batch_size):
    img, lbl = b["image"], b["label"]
    k = len(lbl)
    bs = -(-k // n_dev) * n_dev
    mask = np.ones(bs, np.float32)
    if k < bs:
      mask[k:] = 0
      img = np.concatenate([img, np.zeros((bs - k,) + img.shape[1:], img.dtype)])
      lbl = np.concatenate([lbl, np.zeros(bs - k, lbl.dtype)])
    out = eval_step(variables, shard_batch({"image": img, "label": lbl, "mask": mask}, mesh))
    totals += np.array([float(o) for o in out])
  return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}


def create_state(variables, tx) -> TrainState:
  """A fresh state; arrays are copied, since the train step donates its state's buffers
  (the caller's ``variables`` stay valid)."""
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
  params = copy(variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=copy(variables.get("batch_stats", {})),
                    opt_state=tx.init(params))


def init_variables(model: nn.Module, input_shape, *, seed: int):
  return jax.jit(lambda k: model.init(k, jnp.zeros((1,) + tuple(input_shape)), train=False))(
      jax.random.key(seed))


class MetricsWriter:
  """Appends one JSON object per line to ``path`` (flushed each write)."""

  def __init__(self, path):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, **record):
    record = {k: (float(v) if isinstance(v, (np.floating, jax.Array)) else v)
              for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def fit(config: ml_collections.ConfigDict, workdir: str, *, apply_fn: ApplyFn, variables,
        train_ds, test_ds,
        num_epochs: float, learning_rate: float | None = None, mesh=None,
        desc: str = "train", progress: bool | None = None) -> tuple[TrainState, dict]:
  """Trains ``variables`` with ``apply_fn`` for ``num_epochs``, resuming from ``workdir``.

  ``train_ds``/``test_ds``: a ``fashion_mnist.Dataset`` or a data source
  (``amq_jax.data.InMemorySource``/``TfdsSource``); ``test_ds`` may be None.

  Checkpoints go to ``workdir/checkpoints`` every ``config.checkpoint_every_steps`` and at the
  end of each epoch; a restarted call continues from the last one with the identical data
  order (the order is a function of (seed, epoch)), so an interrupted and an uninterrupted run
  end with the same parameters. Metrics are appended to ``workdir/metrics.jsonl``.

  Returns:
    The final state and ``{'test_accuracy', 'test_loss', 'train_seconds', ...}``.
  """
  mesh = mesh or data_mesh()
  if learning_rate is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.learning_rate = learning_rate
  bs = config.batch_size
  source = as_source(train_ds, augment=config.get("augment", False))
  steps_per_epoch = source.steps_per_epoch(bs)
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {bs} is larger than the {source.num_examples} training examples")
  total = max(1, int(round(num_epochs * steps_per_epoch)))
  tx = make_optimizer(config, total)
  state = replicate(create_state(variables, tx), mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
  start = int(state.step)
  train_step = make_train_step(apply_fn, tx)
  eval_step = make_eval_step(apply_fn)
  every = int(config.get("checkpoint_every_steps", 200))
  log_every = int(config.get("log_every_steps", 50))
  show = config.get("progress", True) if progress is None else progress
  bar = None
  if show:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
  t0, last_t, last_step = time.time(), time.time(), start
  pending = []
  step = start
  while step < total:
    epoch, offset = divmod(step, steps_per_epoch)
    for batch in source.train_batches(bs, seed=config.seed, epoch=epoch, start=offset):
      state, metrics = train_step(state, shard_batch(batch, mesh))
      pending.append(metrics)
      step += 1
      if bar is not None:
        bar.update(1)
      end_of_epoch = step % steps_per_epoch == 0
      if step % log_every == 0 or step % every == 0 or end_of_epoch or step == total:
        host = jax.device_get(pending)
        losses = np.array([m["loss"] for m in host])
        if not np.all(np.isfinite(losses)):
          bad = step - len(losses) + int(np.argmax(~np.isfinite(losses)))
          raise NonFiniteLossError(
              f"{desc}: the training loss is not finite at step {bad} (epoch {epoch}). "
              f"The last good checkpoint (step {ckpt.latest_step()}) is kept in "
              f"{ckpt.directory}; lower the learning rate (e.g. "
              f"--config.learning_rate={config.learning_rate / 10:g}) and run again.")
        now = time.time()
        ips = (step - last_step) * bs / max(now - last_t, 1e-9)
        last_t, last_step = now, step
        rec = dict(stage=desc, step=step, epoch=step / steps_per_epoch,
                   train_loss=float(losses.mean()),
                   train_accuracy=float(np.mean([m["accuracy"] for m in host])),
                   images_per_sec=ips)
        writer.write(**rec)
        pending = []
        if bar is not None:
          bar.set_postfix(loss=f"{rec['train_loss']:.3f}", img_s=f"{ips:.0f}")
        if step % every == 0 or end_of_epoch or step == total:
          ckpt.save(step, state)
      if step >= total:
        break
  if bar is not None:
    bar.close()
  result = {"steps": total, "epochs": num_epochs, "train_seconds_this_session": time.time() - t0}
  if test_ds is not None:
    ev = evaluate(eval_step, state.variables, test_ds,
                  batch_size=config.get("eval_batch_size", 1000), mesh=mesh)
    result.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
    writer.write(stage=desc, step=total, test_accuracy=ev["accuracy"], test_loss=ev["loss"])
  ckpt.close()
  return state, result
