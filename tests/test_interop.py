"""Your own Linen / NNX model through the Python API; qwix rules that qwix runs (issue 11)."""
import importlib.util
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import _paths, alloc, models, quant, train
from amq_jax.errors import BitsError

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


# ---------------------------------------------------------------- qwix's grid in amq-jax


def test_qwix_grid_is_qwix_quantize_bit_for_bit():
  qwix = pytest.importorskip("qwix")
  for shape in [(3, 3, 4, 6), (20, 5)]:
    w = jax.random.normal(jax.random.key(len(shape)), shape) * 0.3
    w = w.at[..., 0].set(0.0)  # an all-zero output channel
    for bits, symmetric in [(b, True) for b in range(2, 9)] + [(4, False), (8, False)]:
      ref = qwix.quantize(w, f"int{bits}", channelwise_axes=[w.ndim - 1],
                          calibration_method="absmax" if symmetric else "minmax")
      qt = quant.quantize(w, bits, axis=-1, symmetric=symmetric, grid="qwix")
      np.testing.assert_array_equal(qt.q, np.asarray(ref.qvalue, np.int32))
      np.testing.assert_array_equal(quant.dequantize(qt), qwix.dequantize(ref))
      np.testing.assert_array_equal(
          quant.fake_quant(w, bits, axis=-1, symmetric=symmetric, grid="qwix"),
          qwix.dequantize(ref))


def test_qwix_grid_levels_and_limits():
  w = jnp.linspace(-1.0, 1.0, 101)
  # 2 bits: qwix uses the four levels -2..1, amq-jax's symmetric grid the three -1..1.
  assert sorted(set(np.asarray(quant.quantize(w, 2, grid="qwix").q).tolist())) == [-2, -1, 0, 1]
  assert sorted(set(np.asarray(quant.quantize(w, 2).q).tolist())) == [-1, 0, 1]
  # the default stays amq-jax's grid
  np.testing.assert_array_equal(quant.fake_quant(w, 3), quant.fake_quant(w, 3, grid="amq"))
  for bad in (1, 9, 16):
    with pytest.raises(BitsError, match=f"no {bad}-bit"):
      quant.quantize(w, bad, grid="qwix")
  with pytest.raises(BitsError, match="4 and 8 bits"):
    quant.quantize(w, 3, symmetric=False, grid="qwix")
  with pytest.raises(ValueError, match="minmax"):
    quant.quant_error(w, 4, scale_method="mse", grid="qwix")
  with pytest.raises(ValueError, match="grid must be"):
    quant.quantize(w, 4, grid="tflite")


def test_omega_table_on_qwix_grid():
  k = {"a/kernel": jax.random.normal(jax.random.key(0), (3, 3, 4, 8)),
       "b/kernel": jax.random.normal(jax.random.key(1), (16, 4))}
  errs = alloc.quant_errors(k, ["a", "b"], (2, 4, 8), grid="qwix")
  for i, layer in enumerate(["a", "b"]):
    w = k[layer + "/kernel"]
    for j, b in enumerate((2, 4, 8)):
      want = float(jnp.sum((quant.fake_quant(w, b, axis=-1, grid="qwix") - w) ** 2))
      assert errs[i, j] == pytest.approx(want, rel=1e-5)
  amq = alloc.quant_errors(k, ["a", "b"], (2, 4, 8))
  assert not np.allclose(errs[:, 0], amq[:, 0])  # the 2-bit grids differ
  _, _, omega = alloc.omega_table(k, ["a", "b"], (2, 4, 8), avg_traces=[1.0, 2.0], grid="qwix")
  np.testing.assert_allclose(omega, errs * np.array([[1.0], [2.0]]))


# ---------------------------------------------------------------- rules qwix accepts


class _ConvDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def test_rule_checks_agree_with_what_qwix_runs():
  """Every (provider, layer kind, w, a): to_qwix_rules accepts it iff qwix runs it on CPU."""
  qwix = pytest.importorskip("qwix")
  model, x = _ConvDense(), jnp.ones((2, 6, 6, 2))
  params = model.init(jax.random.key(0), x)["params"]
  accepted = 0
  for provider, layer, (w, a) in itertools.product(
      ("ptq", "qt"), ("conv", "fc"), itertools.product((3, 5, 8), (None, 3, 5, 8))):
    cfg = quant.BitConfig({layer: {"w": w, "a": a}})
    try:
      rules = quant.to_qwix_rules(cfg, provider=provider, params=params, platform="cpu")
    except BitsError as e:
      assert layer in str(e)
      rules = [qwix.QuantizationRule(module_path=f"^{layer}$", weight_qtype=f"int{w}",
                                     act_qtype=None if a is None else f"int{a}")]
      runs = None
    else:
      runs = True
    prov = (qwix.PtqProvider if provider == "ptq" else qwix.QtProvider)(rules)
    try:
      qm = qwix.quantize_model(model, prov)
      jax.block_until_ready(qm.apply(qm.init(jax.random.key(1), x), x))
      ran = True
    except Exception:  # noqa: BLE001 - qwix and XLA raise several kinds
      ran = False
    assert ran == bool(runs), (provider, layer, w, a)
    accepted += ran
  assert 10 < accepted < 48  # both outcomes occur


def test_unrunnable_layers_are_named_and_adapt_act_fixes_them():
  qwix = pytest.importorskip("qwix")
  m = models.get_model("resnet_tiny")
  v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))
  layers = quant.quantizable_layers(v["params"])
  convs = [l for l in layers if l != "head"]
  cfg = quant.uniform_config(layers, 8)  # weight-only, amq-jax's usual configuration
  with pytest.raises(BitsError) as e:
    quant.to_qwix_rules(cfg, provider="ptq", params=v, platform="cpu")
  msg = str(e.value)
  assert all(c in msg for c in convs) and "head (" not in msg
  assert "act_qtype must equal weight_qtype" in msg and "adapt_act=True" in msg
  with pytest.warns(UserWarning, match="a float -> 8"):
    rules = quant.to_qwix_rules(cfg, provider="ptq", params=v, platform="cpu", adapt_act=True)
  by = {r.module_path: r for r in rules}
  assert all(by[f"^{re.escape(c)}$"].act_qtype == "int8" for c in convs)
  assert by["^head$"].act_qtype is None  # a Dense layer may stay weight-only
  # 1-bit and 16-bit weights have no qwix type: adapting activations cannot help
  with pytest.raises(BitsError, match=r"stem_conv .*no int1 type"):
    quant.to_qwix_rules({"stem_conv": 1}, params=v, adapt_act=True)
  with pytest.raises(BitsError, match=r"head .*no int16 type"):
    quant.to_qwix_rules({"head": 16}, params=v)
  # int4 x int4 products exist on TPU only
  four = {"head": {"w": 4, "a": 4}}
  with pytest.raises(BitsError, match="no int4 x int4 matmul"):
    quant.to_qwix_rules(four, params=v, platform="cpu")
  assert quant.to_qwix_rules(four, params=v, platform="tpu")[0].act_qtype == "int4"
  # without params a layer's kind is unknown: held to the convolution limits, and told so
  with pytest.raises(BitsError, match="Pass params="):
    quant.to_qwix_rules({"head": 8}, provider="ptq")
  assert quant.to_qwix_rules({"head": 8}, provider="ptq", kinds={"head": "dense"})


def test_qwix_rules_objects():
  qwix = pytest.importorskip("qwix")
  cfg = quant.BitConfig({"stem_conv": {"w": 8, "a": 8}, "stage1_block1/conv1/kernel": 3})
  rules = quant.to_qwix_rules(cfg)
  assert all(isinstance(r, qwix.QuantizationRule) for r in rules)
  assert rules[1].weight_qtype == "int3" and rules[1].act_qtype is None
  assert re.fullmatch(rules[1].module_path, "stage1_block1/conv1")
  assert not re.fullmatch(rules[0].module_path, "stem_conv_extra")
  assert quant.to_qwix_rules(cfg, as_objects=False)[0] == {
      "module_path": "^stem_conv$", "weight_qtype": "int8", "act_qtype": "int8",
      "weight_calibration_method": "absmax"}


# ---------------------------------------------------------------- qwix runs amq-jax bits


def _fake_quant_params(params, cfg):
  """amq-jax's weight fake-quant on qwix's grid (per output channel) for every layer."""
  kps = [l + "/kernel" for l in cfg.layers if cfg[l]["w"] is not None]
  ks = _paths.select(params, kps)
  return _paths.merge(params, {kp: quant.fake_quant(ks[kp], cfg[kp]["w"], axis=-1, grid="qwix")
                               for kp in kps})


def _act_interceptor(cfg):
  """Quantizes each configured layer's input per example on qwix's grid, as qwix does with
  dynamic-range activations (one absmax scale per batch element)."""
  def icpt(next_fun, args, kwargs, context):
    path = "/".join(context.module.scope.path)
    if context.method_name == "__call__" and path in cfg and cfg[path]["a"] is not None:
      args = (quant.fake_quant(args[0], cfg[path]["a"], axis=0, grid="qwix"),) + args[1:]
    return next_fun(*args, **kwargs)
  return icpt


def _kernel(tree, layer):
  for part in (layer + "/kernel").split("/"):
    tree = tree[part]
  return tree


def test_qwix_qat_logits_and_gradients_equal_amq_fake_quant():
  qwix = pytest.importorskip("qwix")
  m = models.get_model("resnet_tiny")
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  v = m.init(jax.random.key(1), x, train=False)
  # BatchNorm scales of 1 (the zoo starts residual branches at 0) so every layer has a gradient
  v = {**v, "params": _paths.map_paths(
      lambda p, a: jnp.ones_like(a) if p.endswith("/scale") else a, v["params"])}
  layers = quant.quantizable_layers(v["params"])
  others = {k: val for k, val in v.items() if k != "params"}

  def losses(cfg):
    prov = qwix.QtProvider(quant.to_qwix_rules(cfg, provider="qt", params=v, platform="cpu"))
    qm = qwix.quantize_model(m, prov)

    def loss_qwix(p):
      return jnp.sum(qm.apply({**others, "params": p}, x, train=False) ** 2)

    def loss_amq(p):
      with nn.intercept_methods(_act_interceptor(cfg)):
        return jnp.sum(m.apply({**others, "params": _fake_quant_params(p, cfg)}, x,
                               train=False) ** 2)
    return prov, qm, loss_qwix, loss_amq

  # mixed widths 2..8, weight-only except a convolution and the Dense head with inputs
  cfg = quant.BitConfig({l: {"w": 2 + i % 7, "a": None} for i, l in enumerate(layers)}
                        | {"stage2_block1/conv1": {"w": 6, "a": 8}, "head": {"w": 8, "a": 5}})
  prov, qm, _, _ = losses(cfg)
  y_qwix = qm.apply(v, x, train=False)
  with nn.intercept_methods(_act_interceptor(cfg)):
    y_amq = m.apply({**v, "params": _fake_quant_params(v["params"], cfg)}, x, train=False)
  assert prov.get_unused_rules() == []
  np.testing.assert_allclose(y_qwix, y_amq, rtol=1e-5, atol=1e-5)
  # a single layer one bit off moves the logits far beyond that tolerance
  off = quant.BitConfig(cfg.to_dict() | {"stem_conv": {"w": cfg["stem_conv"]["w"] + 1}})
  with nn.intercept_methods(_act_interceptor(off)):
    y_off = m.apply({**v, "params": _fake_quant_params(v["params"], off)}, x, train=False)
  assert float(jnp.max(jnp.abs(y_off - y_amq))) > 1e-3

  # QAT: through convolutions qwix's gradients are amq-jax's straight-through ones. (qwix
  # backpropagates a quantized Dense layer through its float operands, so the head stays
  # float here.) Jitted: eagerly, JAX may round the scale differently under differentiation,
  # which moves a weight sitting exactly on qwix's half-step at -max|w|.
  conv_cfg = quant.BitConfig(cfg.to_dict() | {"head": {"w": None, "a": None}})
  _, _, loss_qwix, loss_amq = losses(conv_cfg)
  (l_qwix, g_qwix) = jax.jit(jax.value_and_grad(loss_qwix))(v["params"])
  (l_amq, g_amq) = jax.jit(jax.value_and_grad(loss_amq))(v["params"])
  assert float(l_qwix) == pytest.approx(float(l_amq), rel=1e-6)
  for l in layers:
    assert float(jnp.max(jnp.abs(_kernel(g_amq, l)))) > 0, l
    np.testing.assert_allclose(_kernel(g_qwix, l), _kernel(g_amq, l), rtol=1e-4, atol=1e-6)


def test_qwix_ptq_of_the_shipped_model_from_load_fp32():
  qwix = pytest.importorskip("qwix")
  from amq_jax.config import load_config
  cfg_run = load_config("configs/resnet20_fmnist.py")
  m = train.build_model(cfg_run)
  v, _ = train.load_fp32(cfg_run, "/nonexistent-workdir")
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(v))
  layers = quant.quantizable_layers(v["params"])
  kinds = quant.qwix_layer_kinds(v)
  assert list(kinds.values()).count("dense") == 1 and len(kinds) == len(layers)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  y_fp = m.apply(v, x, train=False)

  def ptq(cfg):
    prov = qwix.PtqProvider(quant.to_qwix_rules(cfg, provider="ptq", params=v, platform="cpu"))
    qm = qwix.quantize_model(m, prov)
    abstract = jax.eval_shape(lambda: qm.init(jax.random.key(0), x, train=False))
    qparams = qwix.quantize_params(v["params"], abstract["params"])  # rejects NumPy leaves
    with nn.intercept_methods(_act_interceptor(cfg)):
      y_amq = m.apply({**v, "params": _fake_quant_params(v["params"], cfg)}, x, train=False)
    return qparams, qm.apply({**v, "params": qparams}, x, train=False), y_amq

  # PTQ on CPU: convolutions at w = a in 5..8, the Dense head weight-only at 3 bits
  cfg = quant.BitConfig({l: ({"w": 3, "a": None} if kinds[l] == "dense" else
                             {"w": 5 + i % 4, "a": 5 + i % 4}) for i, l in enumerate(layers)})
  qparams, y_qwix, y_amq = ptq(cfg)
  for l in layers:  # each layer's qwix type is its configured width ...
    k = _kernel(qparams, l)
    assert k.array.qtype == f"int{cfg[l]['w']}", l
    assert k.array.qvalue.dtype == (jnp.int4 if cfg[l]["w"] <= 4 else jnp.int8)
    np.testing.assert_array_equal(  # ... and its integer levels are amq-jax's on qwix's grid
        np.asarray(k.array.qvalue, np.int32),
        quant.quantize(_kernel(v["params"], l), cfg[l]["w"], axis=-1, grid="qwix").q)
  # qwix sums integers, amq-jax floats: the last-bit differences can move a 5-bit activation
  # by one level somewhere in 19 layers, so the logits agree to 1% of the quantization effect
  effect = float(jnp.max(jnp.abs(y_qwix - y_fp)))
  assert float(jnp.max(jnp.abs(y_qwix - y_amq))) < 0.01 * effect
  # at 8 bits those level moves vanish: float tolerance
  _, y_qwix8, y_amq8 = ptq(quant.BitConfig({l: {"w": 8, "a": 8} for l in layers}))
  np.testing.assert_allclose(y_qwix8, y_amq8, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(y_qwix8 - y_fp))) > 1e-2  # quantization did something
