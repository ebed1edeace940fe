"""The shipped FP32 ResNet20: its accuracy, and 8-bit quantization keeps it (issue 4)."""
import jax.numpy as jnp
import pytest

from amq_jax import models, quant, train
from amq_jax.config import load_config
from amq_jax.data import fashion_mnist
from amq_jax.pipeline import qat_apply_fn


@pytest.fixture(scope="module")
def shipped():
  cfg = load_config("configs/resnet20_fmnist.py")
  model = train.build_model(cfg)
  variables, source = train.load_fp32(cfg, "/nonexistent-workdir")
  assert source.endswith("resnet20_fmnist.msgpack")
  return model, variables


def test_shipped_checkpoint_accuracy_and_8bit(shipped):
  model, variables = shipped
  test = fashion_mnist.load("test", limit=2000)
  mesh = train.data_mesh()
  fp32 = train.evaluate(train.make_eval_step(train.linen_apply_fn(model)), variables, test,
                        batch_size=1000, mesh=mesh)["accuracy"]
  assert fp32 >= 0.92
  layers = [p[:-len("/kernel")] for p in
            models.layer_order(model, variables, jnp.zeros((1, 28, 28, 1)))]
  bits = quant.uniform_config(layers, 8, 8)
  calib = fashion_mnist.load("train", limit=512).images
  ranges = quant.calibrate(model, variables, [calib], bits, method="percentile")
  q8 = train.evaluate(train.make_eval_step(qat_apply_fn(model, bits, ranges)), variables, test,
                      batch_size=1000, mesh=mesh)["accuracy"]
  assert abs(q8 - fp32) <= 0.005, (fp32, q8)
  # 2 bits everywhere without fine-tuning must hurt: the check above can fail.
  q2 = train.evaluate(train.make_eval_step(qat_apply_fn(model, quant.uniform_config(layers, 2, 8),
                                                        ranges)), variables, test,
                      batch_size=1000, mesh=mesh)["accuracy"]
  assert q2 < fp32 - 0.05
