"""Your own model (not from the zoo) through analyze -> search -> fine-tune, from Python.

  python examples/own_model.py [--steps 200] [--nnx]

A Linen CNN defined right here is trained briefly on Fashion-MNIST, then:
  1. per-layer Hessian traces (``hessian.layer_traces``),
  2. the least-Omega bits at an average of 3 bits (``pipeline.auto_bits``), also as qwix rules,
  3. quantization-aware fine-tuning with the quantized apply (``quant.make_quantized_apply``).
With ``--nnx`` the same analysis runs on an NNX model through ``nnx.split``: any
``loss_fn(params, batch)`` works.
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from amq_jax import hessian, pipeline, quant, train
from amq_jax.data import fashion_mnist


class MyCNN(nn.Module):
  """A user's model: no amq-jax naming conventions, auto-named layers are fine."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def linen_demo(steps: int, budget: str = "avg:3", progress: bool = True) -> dict:
  train_ds = fashion_mnist.load("train", limit=8192)
  test_ds = fashion_mnist.load("test", limit=2000)
  model = MyCNN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  cfg = ml_collections.ConfigDict(dict(batch_size=128, learning_rate=0.05, seed=0, optimizer="sgd",
                                       momentum=0.9, weight_decay=0.0, progress=progress,
                                       checkpoint_every_steps=10 ** 9, log_every_steps=50))
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    state, fp32 = train.fit(cfg, tmp + "/fp32", apply_fn=train.linen_apply_fn(model),
                            variables=variables, train_ds=train_ds, test_ds=test_ds,
                            num_epochs=steps / 64, desc="fp32")
    params = state.params
    # 1. Hessian traces of every Conv/Dense kernel.
    batch = next(fashion_mnist.batches(train_ds, 256, seed=1))
    loss_fn = hessian.linen_loss_fn(model, {"params": params})
    traces = hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(0), rtol=0.1,
                                  max_probes=50)
    # 2. Bits at the budget, from the exact frontier.
    bits, info = pipeline.auto_bits(params, traces, budget=budget, act_bits=8)
    rules = quant.to_qwix_rules(bits, as_objects=False)
    # 3. Fine-tune with fake-quantized weights and activations.
    ranges = quant.calibrate(model, {"params": params}, [batch], bits)
    qat = pipeline.qat_apply_fn(model, bits, ranges)
    cfg.learning_rate = 0.005
    _, ft = train.fit(cfg, tmp + "/qat", apply_fn=qat, variables={"params": params},
                      train_ds=train_ds, test_ds=test_ds, num_epochs=steps / 64 / 2, desc="qat")
  return {"fp32_accuracy": fp32["test_accuracy"], "qat_accuracy": ft["test_accuracy"],
          "traces": {k: v.trace for k, v in traces.items()}, "qwix_rules": rules, **info}


def nnx_demo() -> dict:
  """The same analysis and search for an NNX model."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(784, 64, rngs=rngs)
      self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))

  graphdef, state = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(state)

  def loss_fn(p, batch):
    s = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(s, p)
    logits = nnx.merge(graphdef, s)(batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  batch = next(fashion_mnist.batches(fashion_mnist.load("train", limit=512), 256, seed=0))
  traces = hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(0), rtol=0.1,
                                max_probes=50)
  bits, info = pipeline.auto_bits(params, traces, budget="avg:3")
  return {"traces": {k: v.trace for k, v in traces.items()}, **info}


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--nnx", action="store_true")
  a = ap.parse_args()
  import json
  out = nnx_demo() if a.nnx else linen_demo(a.steps)
  print(json.dumps(out, indent=2, default=str))
