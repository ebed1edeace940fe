"""What every stage shares: the work directory layout, the model, its layers, data slices."""
from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from amq_jax import _paths, models, train


class Workdir:
  """Layout of a run's work directory; each stage owns one sub-directory."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)

  def path(self, *parts: str, mkdir: bool = True) -> str:
    p = os.path.join(self.root, *parts)
    if mkdir:
      os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

  fp32 = property(lambda self: self.path("fp32", "variables.msgpack"))
  traces = property(lambda self: self.path("analyze", "traces.json"))
  eigenvalues = property(lambda self: self.path("analyze", "eigenvalues.json"))
  frontier = property(lambda self: self.path("search", "frontier.json"))
  bits = property(lambda self: self.path("search", "bits.json"))

  def method_bits(self, method: str) -> str:
    return self.path("search", "methods", f"{method}.json")

  def finetune_dir(self, method: str) -> str:
    return self.path("finetune", method, mkdir=False)


def write_json(path: str, obj: Any) -> None:
  train.write_json(path, obj)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


class Context:
  """A config's model, trained FP32 variables and quantizable layers (forward order)."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, *, train_if_missing=True,
               progress=None):
    self.cfg = cfg
    self.wd = Workdir(workdir)
    self.model = train.build_model(cfg)
    self.input_shape = train.input_shape(cfg)
    self.progress = cfg.get("progress", True) if progress is None else progress
    try:
      self.variables, self.fp32_source = train.load_fp32(cfg, workdir)
    except FileNotFoundError:
      if not train_if_missing:
        raise
      train.train_fp32(cfg, workdir, progress=self.progress)
      self.variables, self.fp32_source = train.load_fp32(cfg, workdir)
    sample = jnp.zeros((1,) + tuple(self.input_shape), jnp.float32)
    self.kernel_paths = models.layer_order(self.model, self.variables, sample)
    self.layers = [p.rsplit("/", 1)[0] for p in self.kernel_paths]
    self.params = self.variables["params"]
    self.param_counts = [int(np.size(k)) for k in
                         _paths.select(self.params, self.kernel_paths).values()]

  def data(self):
    if not hasattr(self, "_data"):
      self._data = train.load_data(self.cfg)
    return self._data

  def analysis_batches(self, num_examples: int, batch_size: int) -> list[dict]:
    """The first ``num_examples`` training examples (no augmentation), as fixed batches."""
    from amq_jax.data import as_source
    train_ds, _ = self.data()
    source = as_source(train_ds)
    n = min(num_examples, source.num_examples) // batch_size
    if n == 0:
      raise ValueError(f"hessian.num_examples={num_examples} gives no full batch of "
                       f"{batch_size}; raise it or lower hessian.batch_size")
    out = []
    for b in source.eval_batches(batch_size):
      if len(out) == n or len(b["label"]) < batch_size:
        break
      out.append({"image": np.asarray(b["image"]), "label": np.asarray(b["label"])})
    return out

  def evaluate(self, apply_fn, variables) -> dict:
    _, test = self.data()
    mesh = train.data_mesh()
    return train.evaluate(train.make_eval_step(apply_fn), variables, test,
                          batch_size=self.cfg.get("eval_batch_size", 1000), mesh=mesh)
