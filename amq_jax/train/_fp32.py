"""FP32 training entry point and loading of trained weights (a run's, or the shipped ones)."""
from __future__ import annotations

import os
from importlib import resources

import flax.serialization
import jax
import ml_collections
import numpy as np

from amq_jax import models
from amq_jax._io import read_bytes, write_bytes, write_json
from amq_jax.data import fashion_mnist
from amq_jax.data._sources import as_source
from amq_jax.errors import ConfigError, StateError
from amq_jax.train._loop import (classification_loss, evaluate, fit, init_variables,
                                 linen_apply_fn, make_eval_step)
from amq_jax.train._optim import read_section

VARIABLES_FILE = "variables.msgpack"


def build_model(config: ml_collections.ConfigDict):
  kwargs = config.get("model_kwargs") or {}
  return models.get_model(config.model, **dict(kwargs))


def input_shape(config) -> tuple[int, int, int]:
  shape = config.get("input_shape", None)
  return tuple(shape) if shape else models.default_input_shape(config.model)


def load_data(config: ml_collections.ConfigDict):
  """(train, test) data of a config.

  ``config.dataset == 'fashion_mnist'``: in-memory arrays (sliced to ``train_limit`` /
  ``test_limit``). ``'tfds:NAME'``: a prepared TFDS data set read through grain
  (``config.data_dir``, ``config.train_split``, ``config.eval_split``,
  ``config.image_size``, ``config.preprocess``).
  """
  if config.dataset == "fashion_mnist":
    train = fashion_mnist.load("train", data_dir=config.get("data_dir"),
                               limit=config.get("train_limit"))
    test = fashion_mnist.load("test", data_dir=config.get("data_dir"),
                              limit=config.get("test_limit"))
    return train, test
  if str(config.dataset).startswith("tfds:"):
    from amq_jax.data import TfdsSource
    name = config.dataset[len("tfds:"):]
    kw = dict(data_dir=config.get("data_dir"), image_size=config.get("image_size"),
              preprocess=config.get("preprocess", "imagenet"),
              worker_count=config.get("worker_count", 0))
    return (TfdsSource(name, config.get("train_split", "train"), **kw),
            TfdsSource(name, config.get("eval_split", "validation"), **kw))
  raise ConfigError(f"dataset={config.dataset!r} is not a classification data set; use "
                    "'fashion_mnist' or 'tfds:NAME' (a prepared TFDS data set, e.g. "
                    "'tfds:imagenet2012')")


def save_variables(path: str, variables) -> None:
  """Writes params + other collections as flax msgpack, atomically (:mod:`amq_jax._io`)."""
  write_bytes(path, flax.serialization.msgpack_serialize(jax.device_get(variables)))


def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_variables(path: str, target=None):
  """Variables written by :func:`save_variables`; into ``target``'s structure if given.

  Raises:
    FileNotFoundError: no such file.
    StateError: the file is damaged, or holds another model's variables (shapes or layers
      differ from ``target``); the message names the file and what to do.
  """
  raw = read_bytes(path, what="the FP32 training (amq-jax train)")
  try:
    state = flax.serialization.msgpack_restore(raw)
  except Exception as e:  # noqa: BLE001 - msgpack raises several kinds
    raise StateError(f"{path} is damaged (not a flax msgpack file: {type(e).__name__}); "
                     "delete it and train again (amq-jax train), or restore a good copy"
                     ) from None
  if target is None:
    return state
  want, have = _shapes(target), _shapes(state)
  if want != have:
    diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
    k = diff[0]
    raise StateError(f"{path} holds the variables of another model ('{k}': "
                     f"{have.get(k, 'missing')} in the file, {want.get(k, 'absent')} in this "
                     "config's model); delete it, or use the config it was trained with")
  return flax.serialization.from_state_dict(target, state)


def train_fp32(config: ml_collections.ConfigDict, workdir: str, *, progress=None,
               mesh=None) -> dict:
  """Trains the config's classifier in FP32 with ``config.train``; evaluates it; writes
  ``workdir/fp32/{variables.msgpack,result.json}``.

  Resumes from ``workdir/fp32/checkpoints`` if a previous run was interrupted. ``progress``
  defaults to ``config.progress``.

  Returns:
    :func:`fit`'s result plus ``test_accuracy``, ``test_loss``, ``model``, ``num_params``.
  """
  out = os.path.join(workdir, "fp32")
  sec = read_section(config.train, field_prefix="train")
  model = build_model(config)
  train, test = load_data(config)
  variables = init_variables(model, input_shape(config), seed=config.seed)
  apply_fn = linen_apply_fn(model)
  others = {k: v for k, v in variables.items() if k != "params"}
  show = config.get("progress", True) if progress is None else progress
  state, result = fit(classification_loss(apply_fn), variables["params"], others,
                      as_source(train, augment=sec["augment"]), sec, workdir=out,
                      seed=config.seed, desc="fp32", progress=show, mesh=mesh)
  ev = evaluate(make_eval_step(apply_fn), state.variables, test,
                batch_size=sec["eval_batch_size"], mesh=mesh)
  save_variables(os.path.join(out, VARIABLES_FILE), state.variables)
  result.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"], model=config.model,
                num_params=int(sum(np.size(x) for x in jax.tree.leaves(state.params))))
  write_json(os.path.join(out, "result.json"), result)
  return result


def shipped_checkpoint(name: str) -> str | None:
  """Path of a trained checkpoint shipped in the package (``amq_jax/assets/NAME.msgpack``)."""
  p = resources.files("amq_jax") / "assets" / f"{name}.msgpack"
  return str(p) if p.is_file() else None


def load_fp32(config: ml_collections.ConfigDict, workdir: str):
  """Trained FP32 variables: ``workdir/fp32``'s, else the shipped checkpoint the config names.

  Returns ``(variables, path)``; the leaves are ``jax.Array`` (``qwix.quantize_params`` and
  other JAX libraries reject NumPy arrays).

  Raises:
    FileNotFoundError: neither exists; the message says how to train one.
  """
  model = build_model(config)
  target = jax.eval_shape(lambda: init_variables(model, input_shape(config), seed=0))
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
  own = os.path.join(workdir, "fp32", VARIABLES_FILE)
  if os.path.isfile(own):
    return jax.tree.map(jax.numpy.asarray, restore_variables(own, target)), own
  name = config.get("pretrained")
  shipped = shipped_checkpoint(name) if name else None
  if shipped:
    return jax.tree.map(jax.numpy.asarray, restore_variables(shipped, target)), shipped
  raise FileNotFoundError(
      f"no FP32 checkpoint: {own} does not exist"
      + (f" and no shipped checkpoint is named {name!r}" if name else "")
      + f". Train one first: amq-jax train --config <config> --workdir {workdir}")
