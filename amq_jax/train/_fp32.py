"""FP32 training entry point and loading of trained weights (a run's, or the shipped ones)."""
from __future__ import annotations

import json
import os
from importlib import resources

import flax.serialization
import jax
import ml_collections
import numpy as np

from amq_jax import models
from amq_jax.data import fashion_mnist
from amq_jax.train._loop import fit, init_variables, linen_apply_fn

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
  raise ValueError(f"unknown dataset {config.dataset!r}; use 'fashion_mnist' or "
                   "'tfds:NAME' (a prepared TFDS data set, e.g. 'tfds:imagenet2012')")


def save_variables(path: str, variables) -> None:
  """Writes params + batch_stats as msgpack, atomically (temp file + rename)."""
  data = flax.serialization.msgpack_serialize(jax.device_get(variables))
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def restore_variables(path: str, target=None):
  with open(path, "rb") as f:
    raw = f.read()
  state = flax.serialization.msgpack_restore(raw)
  return state if target is None else flax.serialization.from_state_dict(target, state)


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o))
  os.replace(tmp, path)


def train_fp32(config: ml_collections.ConfigDict, workdir: str, *, progress=None) -> dict:
  """Trains the config's model in FP32; writes ``workdir/fp32/{variables.msgpack,result.json}``.

  Resumes from ``workdir/fp32/checkpoints`` if a previous run was interrupted.
  """
  out = os.path.join(workdir, "fp32")
  os.makedirs(out, exist_ok=True)
  model = build_model(config)
  train, test = load_data(config)
  variables = init_variables(model, input_shape(config), seed=config.seed)
  state, result = fit(config, out, apply_fn=linen_apply_fn(model), variables=variables,
                      train_ds=train, test_ds=test, num_epochs=config.num_epochs,
                      desc="fp32", progress=progress)
  save_variables(os.path.join(out, VARIABLES_FILE), state.variables)
  result.update(model=config.model, num_params=int(sum(np.size(x) for x in
                                                       jax.tree.leaves(state.params))))
  write_json(os.path.join(out, "result.json"), result)
  return result


def shipped_checkpoint(name: str) -> str | None:
  """Path of a trained checkpoint shipped in the package (``amq_jax/assets/NAME.msgpack``)."""
  p = resources.files("amq_jax") / "assets" / f"{name}.msgpack"
  return str(p) if p.is_file() else None


def load_fp32(config: ml_collections.ConfigDict, workdir: str):
  """Trained FP32 variables: ``workdir/fp32``'s, else the shipped checkpoint the config names.

  Raises:
    FileNotFoundError: neither exists; the message says how to train one.
  """
  model = build_model(config)
  target = jax.eval_shape(lambda: init_variables(model, input_shape(config), seed=0))
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
  own = os.path.join(workdir, "fp32", VARIABLES_FILE)
  if os.path.isfile(own):
    return restore_variables(own, target), own
  name = config.get("pretrained")
  shipped = shipped_checkpoint(name) if name else None
  if shipped:
    return restore_variables(shipped, target), shipped
  raise FileNotFoundError(
      f"no FP32 checkpoint: {own} does not exist"
      + (f" and no shipped checkpoint is named {name!r}" if name else "")
      + f". Train one first: amq-jax train --config <config> --workdir {workdir}")
