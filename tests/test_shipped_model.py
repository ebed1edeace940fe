"""The shipped FP32 ResNet20: its accuracy, and 8-bit quantization keeps it (issue 4)."""
import jax.numpy as jnp
import pytest

from amq_jax import adapters, pipeline, quant, train
from amq_jax.config import load_config
from amq_jax.data import fashion_mnist


@pytest.fixture(scope="module")
def shipped():
  cfg = load_config("configs/resnet20_fmnist.py")
  module = train.build_model(cfg)
  variables, source = train.load_fp32(cfg, "/nonexistent-workdir")
  assert source.endswith("resnet20_fmnist.msgpack")
  return adapters.from_linen(module, variables, jnp.zeros((1, 28, 28, 1)))


def test_shipped_checkpoint_accuracy_and_8bit(shipped):
  model = shipped
  assert model.layers.names[0] == "stem_conv" and model.layers.names[-1] == "head"
  task = pipeline.classification_task(fashion_mnist.load("train", limit=512),
                                      fashion_mnist.load("test", limit=2000))
  fp32 = task.evaluate(model.apply, model.params, model.state)["accuracy"]
  assert fp32 >= 0.92
  bits = quant.uniform_config(model.layers.names, 8, 8)
  calib = task.first_batches(512, 128)
  ranges = quant.calibrate_model(model, calib, bits, method="percentile")
  q8 = task.evaluate(quant.quantize_model(model, bits, act_ranges=ranges), model.params,
                     model.state)["accuracy"]
  assert abs(q8 - fp32) <= 0.005, (fp32, q8)
  # 2 bits everywhere without fine-tuning must hurt: the check above can fail.
  q2 = task.evaluate(quant.quantize_model(model, quant.uniform_config(model.layers.names, 2, 8),
                                          act_ranges=ranges), model.params,
                     model.state)["accuracy"]
  assert q2 < fp32 - 0.05
