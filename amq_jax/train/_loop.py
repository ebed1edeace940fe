"""The one training loop (FP32 training, quantization-aware fine-tuning, detection) and
classification evaluation: optax, a jitted data-parallel step, Orbax resume.

:func:`fit` sees three things: a loss, a batch source and an optimization section.

* ``loss_fn(params, state, batch, *, train=True) -> (loss, (metrics, new_state))``:
  ``state`` holds the non-trainable collections (``{'batch_stats': ...}``, or ``{}``),
  ``metrics`` a dict of scalars to log. :func:`classification_loss` makes it from an
  ``apply_fn(variables, images, train) -> (logits, new_batch_stats or None)`` (FP32: the
  model's own, :func:`linen_apply_fn`; QAT: a fake-quantized one); detection makes it from
  its focal + box loss (``amq_jax.detection.detection_train_loss``).
* ``source``: ``steps_per_epoch(batch_size)`` and
  ``train_batches(batch_size, *, seed, epoch, start)`` (shuffled by ``(seed, epoch)``;
  ``start`` skips batches to resume mid-epoch), see :mod:`amq_jax.data._sources`. A source
  with ``process_local = True`` yields this process's share of each global batch; any other
  yields the global batch on every process and each process keeps its slice.
* ``section``: an optimization section of a config. Every config has two, with the SAME
  fields, ``c.train`` (FP32 training) and ``c.finetune`` (QAT, plus its own
  ``calib_examples``, ``calib_method`` and ``seeds``):

    optimizer               'sgd' (Nesterov momentum) | 'adam'
    learning_rate           peak learning rate, after warm-up
    momentum                SGD momentum
    weight_decay            decoupled, on kernels only (ndim > 1)
    warmup_steps            linear warm-up from 0
    final_lr_fraction       the cosine decay ends at learning_rate * final_lr_fraction
    clip_grad_norm          clip gradients to this global norm; 0 or None: off
    batch_size              global batch (all devices of all processes)
    num_epochs | num_steps  length; one is set, the other None (num_steps wins when set)
    augment                 training augmentation of the source (crop/flip)
    checkpoint_every_steps  Orbax checkpoint period (also at every epoch end)
    log_every_steps         metrics.jsonl period (one host sync each)
    eval_batch_size         batch of the evaluation after training

  Missing fields take :data:`amq_jax.train.OPTIM_DEFAULTS`; bad values raise
  :class:`amq_jax.errors.ConfigError` naming ``<field_prefix>.<field>``.

The loop is deterministic: the data order is a function of ``(seed, epoch)``, so a run
killed at any point and restarted ends with the same parameters as an uninterrupted one.
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
import numpy as np
import optax

from amq_jax._sharding import (data_mesh, process_slice, replicate, serial_on_cpu, shard_batch,
                               to_host)
from amq_jax.data._sources import as_source
from amq_jax.errors import ConfigError, DataError, NonFiniteError
from amq_jax.train._checkpoint import Checkpointer
from amq_jax.train._optim import (_legacy_section, lr_schedule, make_optimizer,
                                  num_train_steps, read_section)

__all__ = ["ApplyFn", "LossFn", "TrainState", "NonFiniteLossError", "linen_apply_fn",
           "classification_loss", "make_step", "make_train_step", "make_eval_step",
           "evaluate", "create_state", "init_state", "init_variables", "fit"]

ApplyFn = Callable[[Any, jax.Array, bool], tuple[jax.Array, Any]]
LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any]]]

# Kept under its old name: the NaN guard raises the package's NonFiniteError.
NonFiniteLossError = NonFiniteError


class TrainState(flax.struct.PyTreeNode):
  """Step counter, trainable ``params``, non-trainable ``model_state`` collections
  (``{'batch_stats': ...}`` or ``{}``) and the optimizer state."""
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any

  @property
  def batch_stats(self):
    return self.model_state.get("batch_stats", {})

  @property
  def variables(self) -> dict:
    """``{'params': ..., **model_state}``: what ``model.apply`` takes."""
    return {"params": self.params, **self.model_state}

  def __repr__(self):
    n = sum(int(np.size(x)) for x in jax.tree.leaves(self.params))
    return (f"TrainState(step={int(to_host(self.step))}, params={n:,}, "
            f"model_state={sorted(self.model_state)})")


def linen_apply_fn(model: nn.Module) -> ApplyFn:
  """The ``apply_fn`` of a Linen model with optional BatchNorm ('batch_stats')."""
  def apply_fn(variables, images, train):
    if train and "batch_stats" in variables:
      logits, upd = model.apply(variables, images, train=True, mutable=["batch_stats"])
      return logits, upd["batch_stats"]
    return model.apply(variables, images, train=train), None
  return apply_fn


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def classification_loss(apply_fn: ApplyFn) -> LossFn:
  """``loss_fn(params, state, batch, *, train=True)`` for :func:`fit`: mean softmax
  cross-entropy of ``apply_fn``'s logits on ``batch['image']`` vs ``batch['label']``;
  metrics ``{'accuracy'}``; BatchNorm statistics updated in training mode."""
  def loss_fn(params, state, batch, *, train=True):
    logits, new_stats = apply_fn({"params": params, **state}, batch["image"], train)
    loss = _xent(logits, batch["label"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_state = state if new_stats is None else dict(state, batch_stats=new_stats)
    return loss, ({"accuracy": acc}, new_state)
  return loss_fn


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation):
  """Jitted ``step(train_state, batch) -> (train_state, metrics)``, donating its state.

  Sharding follows the inputs (a replicated state and a batch split over the mesh: data
  parallel). ``metrics`` are ``loss_fn``'s plus ``loss`` and ``grad_norm`` (before any
  clipping).
  """
  def step(ts: TrainState, batch):
    def f(params):
      return loss_fn(params, ts.model_state, batch, train=True)
    (loss, (metrics, new_state)), grads = jax.value_and_grad(f, has_aux=True)(ts.params)
    updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    new_ts = ts.replace(step=ts.step + 1, params=params, opt_state=opt_state,
                        model_state=new_state)
    return new_ts, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return serial_on_cpu(jax.jit(step, donate_argnums=0))


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation):
  """:func:`make_step` of :func:`classification_loss` (``apply_fn``)."""
  return make_step(classification_loss(apply_fn), tx)


def make_eval_step(apply_fn: ApplyFn):
  """Jitted ``eval(variables, batch) -> (sum loss, sum correct, count)`` over masked examples."""
  def ev(variables, batch):
    logits, _ = apply_fn(variables, batch["image"], False)
    m = batch["mask"]
    return (jnp.sum(_xent(logits, batch["label"]) * m),
            jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * m), jnp.sum(m))
  return serial_on_cpu(jax.jit(ev))


def evaluate(eval_step, variables, data, *, batch_size: int, mesh=None) -> dict:
  """Top-1 accuracy and mean loss over every example of ``data`` (a Dataset or a source);
  short batches are padded to a multiple of the device count and masked. ``variables``
  are replicated on ``mesh`` (default: every device) first, wherever they live."""
  mesh = mesh or data_mesh()
  n_dev = mesh.devices.size
  variables = replicate(variables, mesh)
  totals = np.zeros(3)
  for b in as_source(data).eval_batches(batch_size):
    img, lbl = np.asarray(b["image"]), np.asarray(b["label"])
    k = len(lbl)
    bs = -(-k // n_dev) * n_dev
    mask = np.ones(bs, np.float32)
    if k < bs:
      mask[k:] = 0
      img = np.concatenate([img, np.zeros((bs - k,) + img.shape[1:], img.dtype)])
      lbl = np.concatenate([lbl, np.zeros(bs - k, lbl.dtype)])
    batch = process_slice({"image": img, "label": lbl, "mask": mask})
    out = eval_step(variables, shard_batch(batch, mesh))
    totals += np.array([float(o) for o in to_host(out)])
  return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}


def init_state(params, state, tx) -> TrainState:
  """A fresh :class:`TrainState`. Arrays are copied, since the step donates its state's
  buffers (the caller's ``params`` and ``state`` stay valid)."""
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
  params = copy(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=copy(dict(state or {})), opt_state=tx.init(params))


def create_state(variables, tx) -> TrainState:
  """:func:`init_state` from Linen ``variables`` (``'params'`` + other collections)."""
  return init_state(variables["params"],
                    {k: v for k, v in variables.items() if k != "params"}, tx)


def init_variables(model: nn.Module, input_shape, *, seed: int):
  return jax.jit(lambda k: model.init(k, jnp.zeros((1,) + tuple(input_shape)), train=False))(
      jax.random.key(seed))


class _Metrics:
  """Appends one JSON object per line to ``path`` (process 0 only; flushed each write).

  A log, not a state file: a run resumed after a kill appends again from its checkpoint,
  so a step may appear twice; readers take the last record of a step.
  """

  def __init__(self, path):
    self.path = path
    self.on = jax.process_index() == 0
    if self.on:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, **record):
    if self.on:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _prefix(field_prefix: str) -> str:
  return f"{field_prefix}." if field_prefix else ""


def _non_finite(desc, bad_step, epoch, ckpt, s, pre) -> NonFiniteError:
  last = ckpt.latest_step()
  kept = (f"the last good checkpoint (step {last}) is kept in {ckpt.directory}"
          if last is not None else "no checkpoint was written before it")
  clip = ("" if s["clip_grad_norm"] else
          f", or clip the gradients (--config.{pre}clip_grad_norm=1.0)")
  return NonFiniteError(
      f"{desc}: the training loss is not finite at step {bad_step} (epoch {epoch}); {kept}. "
      f"Lower the learning rate (--config.{pre}learning_rate={s['learning_rate'] / 10:g}, "
      f"now {s['learning_rate']:g}){clip} and run again.")


def fit(loss_fn: LossFn, params=None, state=None, source=None, section=None, *,
        workdir: str | None = None, seed: int | None = None, desc: str = "train",
        progress: bool | None = None, mesh=None, field_prefix: str = "train",
        **legacy) -> tuple[TrainState, dict]:
  """Trains ``params`` on ``source`` with ``loss_fn`` as ``section`` says; resumable.

  Args:
    loss_fn: ``loss_fn(params, state, batch, *, train=True) -> (loss, (metrics, new_state))``.
    params: the trainable pytree. state: non-trainable collections (``{}`` if none).
    source: a batch source (see the module docstring).
    section: an optimization section (``config.train``, ``config.finetune``, a dict).
    workdir: checkpoints go to ``workdir/checkpoints`` (every ``checkpoint_every_steps``
      and at every epoch end), metrics to ``workdir/metrics.jsonl`` (every
      ``log_every_steps``: losses, metrics, images/s). A call that finds checkpoints
      resumes from the newest readable one with the identical data order.
    seed: the data order (shuffling and augmentation), as ``(seed, epoch)``.
    desc: names the run in the progress bar, the metrics and error messages.
    progress: a ``tqdm.auto`` bar (default on; False for none).
    mesh: a 1-D data mesh (default: every device of every process).
    field_prefix: how ``section`` is spelled in the config (``'train'``, ``'finetune'``),
      for error messages (``--config.finetune.learning_rate=...``).

  Returns:
    ``(train_state, result)``; ``result``: ``steps``, ``epochs``, ``steps_per_epoch``,
    ``batch_size``, ``train_loss`` and ``train_metrics`` (means over the last logged
    interval; None if nothing was left to train), ``losses`` (``[step, loss]`` at each log
    point of this session), ``images_per_sec`` and ``seconds_per_step`` (medians, the first
    interval, which compiles, left out), ``train_seconds_this_session``.

  Raises:
    ConfigError: a section field out of range, or a batch that does not fit the data or
      the devices. NonFiniteError: the loss became NaN/Inf (names the step and the field
      to lower). StateError: the checkpoints belong to another model.

  Example:
    >>> loss_fn = train.classification_loss(train.linen_apply_fn(model))
    >>> ts, res = train.fit(loss_fn, v['params'], {'batch_stats': v['batch_stats']},
    ...                     InMemorySource(ds, augment=True), config.train,
    ...                     workdir='runs/x/fp32', seed=0)
  """
  if not callable(loss_fn):  # COMPAT: fit(config, workdir, apply_fn=..., ...)
    return _fit_legacy(loss_fn, params, desc=desc, progress=progress, mesh=mesh, **legacy)
  if legacy:
    raise TypeError(f"fit() got unexpected keyword arguments {sorted(legacy)}")
  if workdir is None or seed is None or source is None or section is None:
    raise TypeError("fit() needs loss_fn, params, state, source, section, workdir= and seed=")
  pre = _prefix(field_prefix)
  s = read_section(section, field_prefix=field_prefix)
  mesh = mesh or data_mesh()
  bs, n_dev = s["batch_size"], mesh.devices.size
  if bs % n_dev:
    raise ConfigError(f"{pre}batch_size={bs} is not a multiple of the {n_dev} devices; set "
                      f"--config.{pre}batch_size={-(-bs // n_dev) * n_dev}")
  steps_per_epoch = source.steps_per_epoch(bs)
  if steps_per_epoch <= 0:
    n = getattr(source, "num_examples", "the")
    raise ConfigError(f"{pre}batch_size={bs} is larger than the {n} training examples; set "
                      f"a smaller --config.{pre}batch_size")
  total = num_train_steps(s, steps_per_epoch)
  tx = make_optimizer(s, total, field_prefix=field_prefix)
  schedule = lr_schedule(s, total)
  ts = replicate(init_state(params, state, tx), mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  if ckpt.latest_step() is not None:
    ts = ckpt.restore(ts)
  start = int(to_host(ts.step))
  step_fn = make_step(loss_fn, tx)
  every, log_every = s["checkpoint_every_steps"], s["log_every_steps"]
  local = bool(getattr(source, "process_local", False))
  writer = _Metrics(os.path.join(workdir, "metrics.jsonl"))
  bar = None
  if (True if progress is None else progress) and jax.process_index() == 0 and start < total:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
  t0 = last_t = time.time()
  last_step, step, pending = start, start, []
  losses, rates, last_rec = [], [], None
  try:
    while step < total:
      epoch, offset = divmod(step, steps_per_epoch)
      before = step
      for batch in source.train_batches(bs, seed=seed, epoch=epoch, start=offset):
        if not local:
          batch = process_slice(batch)
        ts, metrics = step_fn(ts, shard_batch(batch, mesh))
        pending.append(metrics)
        step += 1
        if bar is not None:
          bar.update(1)
        end_of_epoch = step % steps_per_epoch == 0
        save = step % every == 0 or end_of_epoch or step == total
        if save or step % log_every == 0:
          host = to_host(pending)
          loss = np.array([m["loss"] for m in host])
          if not np.all(np.isfinite(loss)):
            bad = step - len(loss) + 1 + int(np.argmax(~np.isfinite(loss)))
            raise _non_finite(desc, bad, epoch, ckpt, s, pre)
          now = time.time()
          dt = max(now - last_t, 1e-9)
          rates.append((dt / (step - last_step), (step - last_step) * bs / dt))
          last_t, last_step = now, step
          means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
          last_rec = means
          losses.append([step, means["loss"]])
          writer.write(stage=desc, step=step, epoch=step / steps_per_epoch,
                       train_loss=means["loss"],
                       **{f"train_{k}": v for k, v in means.items() if k != "loss"},
                       images_per_sec=rates[-1][1], learning_rate=float(schedule(step)))
          pending = []
          if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.3f}", img_s=f"{rates[-1][1]:.0f}")
          if save:
            ckpt.save(step, ts)
        if step >= total:
          break
      if step == before:  # an empty epoch would loop for ever
        raise DataError(f"{desc}: the training data gave no batch of {bs} for epoch {epoch} "
                        f"(from batch {offset}) although it reports {steps_per_epoch} per "
                        "epoch; check the data set and its size")
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
  kept = rates[1:] if len(rates) > 1 else rates
  result = {"steps": total, "epochs": total / steps_per_epoch,
            "steps_per_epoch": steps_per_epoch, "batch_size": bs,
            "train_loss": last_rec["loss"] if last_rec else None,
            "train_metrics": last_rec, "losses": losses,
            "seconds_per_step": float(np.median([r[0] for r in kept])) if kept else None,
            "images_per_sec": float(np.median([r[1] for r in kept])) if kept else None,
            "train_seconds_this_session": time.time() - t0}
  return ts, result


def _fit_legacy(config, workdir, *, apply_fn: ApplyFn, variables, train_ds, test_ds,
                num_epochs: float, learning_rate: float | None = None, mesh=None,
                desc: str = "train", progress: bool | None = None):
  """COMPAT (the pipeline's old call; remove when it calls the new signature):
  ``fit(config, workdir, apply_fn=, variables=, train_ds=, test_ds=, num_epochs=, ...)``.

  The section is ``config.train`` with the optimization fields the caller set at the top
  level of ``config`` taking precedence (how the old flat configs read); the result also
  holds ``test_accuracy`` / ``test_loss`` on ``test_ds`` when given.
  """
  sec = _legacy_section(config)
  sec.update(num_epochs=num_epochs, num_steps=None)
  if learning_rate is not None:
    sec["learning_rate"] = learning_rate
  prefix = "finetune" if desc.startswith("finetune") else "train"
  show = config.get("progress", True) if progress is None else progress
  source = as_source(train_ds, augment=bool(sec.get("augment") or False))
  others = {k: v for k, v in variables.items() if k != "params"}
  mesh = mesh or data_mesh()
  ts, result = fit(classification_loss(apply_fn), variables["params"], others, source, sec,
                   workdir=workdir, seed=config.seed, desc=desc, progress=show, mesh=mesh,
                   field_prefix=prefix)
  result["epochs"] = num_epochs
  if test_ds is not None:
    ev = evaluate(make_eval_step(apply_fn), ts.variables, test_ds,
                  batch_size=read_section(sec, field_prefix=prefix)["eval_batch_size"],
                  mesh=mesh)
    result.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
    _Metrics(os.path.join(workdir, "metrics.jsonl")).write(
        stage=desc, step=result["steps"], test_accuracy=ev["accuracy"], test_loss=ev["loss"])
  return ts, result
