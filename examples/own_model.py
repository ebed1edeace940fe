"""Your own model (not from the zoo) through analyze -> search -> fine-tune -> export.

  python examples/own_model.py [--framework linen|nnx|equinox|all] [--steps 200]
                               [--budget avg:3] [--workdir DIR]

A small model defined right here (Flax Linen, Flax NNX or Equinox) is trained briefly on
Fashion-MNIST; then the same five calls run for every framework:

  1. ``adapters.from_linen / from_nnx / from_equinox``: the model as a ``Model`` (params,
     state, a pure apply, its quantizable layers in execution order);
  2. ``hessian.layer_traces``: each layer's Hessian trace (Hutchinson, per-layer stopping);
  3. ``pipeline.auto_bits``: the least-Omega bits within the budget, from the exact frontier;
  4. ``pipeline.finetune_bits``: quantization-aware fine-tuning (fake-quantized weights and,
     where the adapter has activation hooks, inputs), then the packed ``model.amq`` export,
     loaded back and evaluated again;
  5. ``quant.to_qwix_rules``: the same widths as qwix rules, for deployment with qwix.

Equinox models are quantized on weights only (its adapter has no activation hooks).
``examples/own_model.ipynb`` walks through the same steps cell by cell.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from amq_jax import adapters, hessian, pipeline, quant, train
from amq_jax.data import fashion_mnist

FRAMEWORKS = ("linen", "nnx", "equinox")


# ----------------------------------------------------------------------- a user's models

class MyCNN(nn.Module):
  """A user's Linen model: no amq-jax naming conventions, auto-named layers are fine."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def nnx_mlp(seed: int = 0):
  """A user's NNX model: an MLP with BatchNorm (running statistics are the model's state)."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(784, 64, rngs=rngs)
      self.bn = nnx.BatchNorm(64, rngs=rngs)
      self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      x = x.reshape(x.shape[0], -1)
      return self.fc2(nnx.relu(self.bn(self.fc1(x))))

  return MLP(nnx.Rngs(seed))


def equinox_cnn(seed: int = 0):
  """A user's Equinox model: one example ``[28, 28, 1]`` in, weights ``[out, in, ...]``."""
  import equinox as eqx

  class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, key):
      k1, k2, k3, k4 = jax.random.split(key, 4)
      self.conv1 = eqx.nn.Conv2d(1, 16, 3, stride=2, padding=1, key=k1)
      self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k2)
      self.fc1 = eqx.nn.Linear(32 * 7 * 7, 64, key=k3)
      self.fc2 = eqx.nn.Linear(64, 10, key=k4)

    def __call__(self, x):
      x = jnp.transpose(x, (2, 0, 1))  # the data is HWC, Equinox convolutions take CHW
      x = jax.nn.relu(self.conv1(x))
      x = jax.nn.relu(self.conv2(x))
      x = jax.nn.relu(self.fc1(x.reshape(-1)))
      return self.fc2(x)

  return CNN(jax.random.key(seed))


def build(framework: str, sample) -> adapters.Model:
  """The user's model of ``framework``, adapted (``sample``: one input batch)."""
  if framework == "linen":
    module = MyCNN()
    return adapters.from_linen(module, module.init(jax.random.key(0), sample), sample)
  if framework == "nnx":
    return adapters.from_nnx(nnx_mlp(), sample)
  if framework == "equinox":
    return adapters.from_equinox(equinox_cnn(), sample)
  raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


# --------------------------------------------------------------------------- the steps

def load_task(train_examples: int = 8192, test_examples: int = 2000) -> pipeline.Task:
  """Fashion-MNIST classification on the first examples of each split."""
  return pipeline.classification_task(fashion_mnist.load("train", limit=train_examples),
                                      fashion_mnist.load("test", limit=test_examples),
                                      eval_batch_size=1000, num_classes=10)


def optim_section(steps: int, learning_rate: float, **extra) -> ml_collections.ConfigDict:
  """An optimization section for ``train.fit`` / ``pipeline.finetune_bits``."""
  return ml_collections.ConfigDict(dict(
      optimizer="adam", learning_rate=learning_rate, batch_size=128, num_steps=int(steps),
      num_epochs=None, checkpoint_every_steps=10 ** 9, log_every_steps=max(1, steps // 4),
      eval_batch_size=1000, **extra))


def fit_fp32(model: adapters.Model, task: pipeline.Task, steps: int, workdir: str, *,
             progress: bool = True) -> tuple[adapters.Model, dict]:
  """The model trained for ``steps`` steps in float32, and its test metrics."""
  state, _ = train.fit(task.train_loss(model.apply), model.params, model.state,
                       task.train_source, optim_section(steps, 3e-3), workdir=workdir, seed=0,
                       desc=f"{model.framework} fp32", progress=progress)
  model = model.replace(params=state.params, state=state.model_state)
  return model, task.evaluate(model.apply, model.params, model.state)


def quantize(model: adapters.Model, task: pipeline.Task, workdir: str, *, budget: str = "avg:3",
             steps: int = 100, pin_first_last: int | None = 8, max_probes: int = 50,
             progress: bool = True) -> dict:
  """Traces -> bits at ``budget`` -> QAT for ``steps`` steps -> packed export.

  Activations (each layer's input) are quantized to 8 bits where the adapter can hook them.
  """
  batches = task.first_batches(256, 128)
  traces = hessian.layer_traces(task.curvature_loss(model), model.params, batches,
                                key=jax.random.key(0), wrt=model.layers.params_paths,
                                rtol=0.1, max_probes=max_probes, progress=progress)
  act_bits = 8 if model.act_apply is not None else None
  bits, info = pipeline.auto_bits(model, traces, budget=budget, act_bits=act_bits,
                                  pin_first_last=pin_first_last)
  section = optim_section(steps, 1e-3, calib_examples=512, calib_method="percentile")
  result = pipeline.finetune_bits(model, task, bits, section, os.path.join(workdir, "qat"),
                                  seed=0, progress=progress, desc=f"{model.framework} QAT")
  # qwix's QtProvider runs weight-only rules for every layer kind (see quant.to_qwix_rules
  # for which weight x input widths it can run).
  rules = quant.to_qwix_rules({l: {"w": bits[l]["w"], "a": None} for l in bits.layers},
                              kinds={l.name: l.kind for l in model.layers.values()},
                              as_objects=False)
  return {"traces": {p: e.trace for p, e in traces.items()},
          "trace_status": {p: e.status for p, e in traces.items()},
          "bits": {l: bits[l]["w"] for l in bits.layers}, "act_bits": act_bits,
          "avg_bits": info["avg_bits"], "size_mb": info["size_mb"],
          "ptq_accuracy": result["ptq_accuracy"], "qat_accuracy": result["accuracy"],
          "exported_accuracy": result["exported_accuracy"],
          "export": {k: result["export"][k] for k in ("file_bytes", "payload_bytes",
                                                       "sizes_agree")},
          "model_file": os.path.join(workdir, "qat", "model.amq"), "qwix_rules": rules}


def demo(framework: str, *, steps: int = 200, budget: str = "avg:3",
         pin_first_last: int | None = 8, progress: bool = True, workdir: str | None = None,
         train_examples: int = 8192, test_examples: int = 2000) -> dict:
  """The whole example for one framework; FP32 for ``steps`` steps, QAT for half as many."""
  task = load_task(train_examples, test_examples)
  sample = task.first_batches(2, 2)[0]["image"]
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(workdir or tmp, framework)
    model, fp32 = fit_fp32(build(framework, sample), task, steps, os.path.join(root, "fp32"),
                           progress=progress)
    out = quantize(model, task, root, budget=budget, steps=max(1, steps // 2),
                   pin_first_last=pin_first_last, progress=progress)
    if workdir is None:
      out.pop("model_file")
  return {"framework": framework, "layers": model.layers.names,
          "fp32_accuracy": fp32["accuracy"], **out}


def linen_demo(steps: int = 200, budget: str = "avg:3", progress: bool = True, **kw) -> dict:
  """:func:`demo` of the Linen CNN (weights and 8-bit inputs quantized)."""
  return demo("linen", steps=steps, budget=budget, progress=progress, **kw)


def nnx_demo(steps: int = 40, budget: str = "avg:3", progress: bool = False, **kw) -> dict:
  """:func:`demo` of the NNX MLP (two layers, so no pins: nothing would be left to choose)."""
  return demo("nnx", steps=steps, budget=budget, progress=progress, pin_first_last=None, **kw)


def equinox_demo(steps: int = 200, budget: str = "avg:3", progress: bool = True, **kw) -> dict:
  """:func:`demo` of the Equinox CNN (weights only: the adapter has no activation hooks)."""
  return demo("equinox", steps=steps, budget=budget, progress=progress, **kw)


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--framework", choices=FRAMEWORKS + ("all",), default="all")
  ap.add_argument("--steps", type=int, default=200, help="FP32 steps (QAT: half as many)")
  ap.add_argument("--budget", default="avg:3")
  ap.add_argument("--workdir", default=None, help="keep checkpoints and model.amq here")
  a = ap.parse_args()
  runs = {"linen": linen_demo, "nnx": nnx_demo, "equinox": equinox_demo}
  chosen = FRAMEWORKS if a.framework == "all" else (a.framework,)
  out = {f: runs[f](steps=a.steps, budget=a.budget, progress=True, workdir=a.workdir)
         for f in chosen}
  print(json.dumps(out, indent=2, default=str))
