"""Your own Linen / NNX model through the Python API; qwix rules."""
import importlib.util
import re

import pytest

from amq_jax import quant

spec = importlib.util.spec_from_file_location("own_model", "examples/own_model.py")
own_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(own_model)


def test_linen_own_model_end_to_end():
  out = own_model.linen_demo(steps=40, progress=False)
  assert out["fp32_accuracy"] > 0.5
  assert out["qat_accuracy"] > 0.5
  assert 2.0 <= out["avg_bits"] <= 3.0 + 1e-9
  assert set(out["bits"]) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
  assert all(t > 0 for t in out["traces"].values())
  paths = [r["module_path"] for r in out["qwix_rules"]]
  assert paths == ["^Conv_0$", "^Conv_1$", "^Dense_0$", "^Dense_1$"]


def test_nnx_model_analysis_and_search():
  out = own_model.nnx_demo()
  assert set(out["traces"]) == {"fc1/kernel", "fc2/kernel"}
  assert out["avg_bits"] <= 3.0 + 1e-9


def test_qwix_rules_objects():
  qwix = pytest.importorskip("qwix")
  cfg = quant.BitConfig({"stem_conv": {"w": 8, "a": 8}, "stage1_block1/conv1": {"w": 3, "a": None}})
  rules = quant.to_qwix_rules(cfg)
  assert all(isinstance(r, qwix.QuantizationRule) for r in rules)
  assert rules[1].weight_qtype == "int3" and rules[1].act_qtype is None
  assert re.fullmatch(rules[1].module_path, "stage1_block1/conv1")
  assert not re.fullmatch(rules[0].module_path, "stem_conv_extra")
