"""Adapters: the layer table traced from any framework, and Linen, NNX, Equinox and plain JAX
through analysis -> bits -> fake-quantized apply -> QAT -> packed export."""
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from amq_jax import _paths, adapters, alloc, hessian, quant
from amq_jax.data import fashion_mnist
from amq_jax.errors import BitsError, LayerError


@pytest.fixture(scope="module")
def fmnist():
  """A few hundred real Fashion-MNIST images (NHWC) and labels."""
  ds = fashion_mnist.load("train", limit=320)
  return jnp.asarray(ds.images), jnp.asarray(ds.labels)


def xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ---------------------------------------------------------------------- the layer table

class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv1")(x))
    y = nn.Conv(8, (3, 3), name="conv2")(y)
    return nn.relu(y + nn.Conv(8, (1, 1), strides=2, name="proj")(x))


class ResNetish(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
    x = Block(name="block")(x)
    return nn.Dense(10, name="head")(x.mean((1, 2)))


class Deep(nn.Module):
  """Twelve auto-named Dense layers: 'Dense_10' sorts before 'Dense_2'."""

  @nn.compact
  def __call__(self, x):
    for _ in range(12):
      x = nn.relu(nn.Dense(16)(x))
    return x


class StemBodyHead(nn.Module):
  """Alphabetical order (body, head, stem) is not the execution order (stem, body, head)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="stem")(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="body")(x))
    return nn.Dense(10, name="head")(x.mean((1, 2)))


def _linen(module, x, *, real=False):
  """The Linen Model; its variables abstract (shapes only, nothing compiled) unless
  ``real``: tracing the layer table needs no values."""
  if real:
    variables = jax.jit(module.init)(jax.random.key(0), x)
  else:
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
  return adapters.from_linen(module, variables, x)


def test_linen_resnet_layers_and_shared_input():
  x = jnp.zeros((2, 12, 12, 1))
  m = _linen(ResNetish(), x)
  assert m.layers.names == ["stem", "block/conv1", "block/conv2", "block/proj", "head"]
  assert m.layers.shared_inputs() == [["block/conv1", "block/proj"]]
  stem, proj, head = m.layers["stem"], m.layers["block/proj"], m.layers["head"]
  assert (stem.kind, stem.channel_axis, stem.param) == ("conv", 3, "stem/kernel")
  assert stem.macs == 12 * 12 * 4 * 9 and stem.in_shape == (12, 12, 1)  # SAME, stride 1
  assert proj.macs == 6 * 6 * 8 * 4 and proj.in_size == 12 * 12 * 4    # 1x1, stride 2
  assert (head.kind, head.channel_axis, head.macs) == ("dense", 1, 80)
  assert m.act_apply is not None


def test_more_than_ten_auto_named_layers_keep_execution_order():
  m = _linen(Deep(), jnp.zeros((2, 16)))
  names = m.layers.names
  assert names == [f"Dense_{i}" for i in range(12)] and names != sorted(names)
  assert [l.index for l in m.layers.values()] == list(range(12))


def test_conv_transpose_macs_count_real_products_only():
  x = jnp.zeros((1, 5, 5, 4))
  up = _linen(nn.ConvTranspose(6, (3, 3), strides=(2, 2), padding="VALID"), x)
  (l,) = up.layers.values()
  # Each of the 5*5*4 input values meets the 3*3*6 weights of its input channel once;
  # the zeros a strided transposed convolution inserts cost nothing.
  assert l.kind == "conv_transpose" and l.macs == (5 * 5 * 4) * (3 * 3 * 6)
  # The dilated-input convolution would count every output position: ~stride^2 more.
  out = 11 * 11 * 6
  assert out * 3 * 3 * 4 > 4 * l.macs
  conv = _linen(nn.Conv(6, (3, 3), padding="VALID"), x)
  (c,) = conv.layers.values()
  assert c.kind == "conv" and c.macs == (3 * 3 * 6) * (3 * 3 * 4)  # outputs x (kh kw C_in)


def _traces(model, batch):
  """Per-layer average Hessian traces of the model's loss (in layer order)."""
  def loss_fn(params, batch):
    return xent(model.apply(params, model.state, batch["image"])[0], batch["label"])
  # One device and the joint estimator: one small program to compile (seconds on CPU).
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  est = hessian.layer_traces(loss_fn, model.params, batch, key=jax.random.key(1),
                             wrt=model.layers.params_paths, estimator="joint", min_probes=3,
                             max_probes=3, mesh=one, progress=False)
  assert list(est) == model.layers.params_paths
  return [est[p].avg_trace for p in model.layers.params_paths]


def _auto_bits(model, traces, budget="avg:3", choices=(2, 3, 4, 8), pin=8, errors=None):
  if errors is None:
    errors = alloc.quant_errors(model.params, model.layers, choices)
  bits, _ = alloc.auto_bits(model.layers.names, model.layers.counts(), errors, traces,
                            budget=budget, bit_choices=choices, pin_first_last=pin)
  return bits


def test_pins_go_to_the_execution_order_first_and_last():
  # The pins depend on the order only: unit traces, errors 4^-b per weight.
  choices = (2, 3, 4, 8)

  def errors(m):
    return m.layers.counts()[:, None] * 4.0 ** -np.array(choices, np.float64)

  m = _linen(StemBodyHead(), jnp.zeros((2, 28, 28, 1)))
  assert m.layers.names == ["stem", "body", "head"]
  # 72 + 1152 + 160 weights: at 3.5 bits on average, with stem and head pinned at 8,
  # body can only take 2 bits; pinning the alphabetical first/last would pin body.
  bits = _auto_bits(m, np.ones(3), budget="avg:3.5", errors=errors(m))
  assert bits == {"stem": 8, "body": 2, "head": 8}
  deep = _linen(Deep(), jnp.zeros((2, 16)))
  bits = _auto_bits(deep, np.ones(12), budget="avg:4", errors=errors(deep))
  assert bits["Dense_0"] == 8 and bits["Dense_11"] == 8
  assert all(bits[f"Dense_{i}"] < 8 for i in range(1, 11))


# ------------------------------------------------------------ three frameworks, end to end

class EqxCNN(eqx.Module):
  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  fc: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(1, 8, 3, stride=2, key=k1)
    self.conv2 = eqx.nn.Conv2d(8, 16, 3, stride=2, key=k2)
    self.fc = eqx.nn.Linear(16, 10, key=k3)

  def __call__(self, x):  # one example [1, 28, 28]
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.fc(x.mean((1, 2)))


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), strides=2, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.fc = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv1(x)))
    x = nnx.relu(self.conv2(x))
    return self.fc(x.mean((1, 2)))


def mlp(p, x):
  x = x.reshape((x.shape[0], -1))
  return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _mlp_params():
  k1, k2 = jax.random.split(jax.random.key(3))
  return {"w1": jax.random.normal(k1, (784, 32)) / 28.0, "b1": jnp.zeros(32),
          "w2": jax.random.normal(k2, (32, 10)) / 6.0, "b2": jnp.zeros(10)}


def build(kind, images):
  """(Model, the model's input layout of ``images``). Models are initialized under jit
  (one compilation instead of one per initializer op)."""
  if kind == "equinox":
    to = lambda x: jnp.moveaxis(x, -1, 1)  # NCHW
    return adapters.from_equinox(eqx.filter_jit(EqxCNN)(jax.random.key(2)),
                                 to(images[:2])), to
  to = lambda x: x
  if kind == "nnx":
    return adapters.from_nnx(nnx.jit(lambda: NnxCNN(nnx.Rngs(2)))(), images[:2]), to
  return adapters.from_apply(mlp, jax.jit(_mlp_params)(), images[:2]), to


EXPECTED = {
    "equinox": (["conv1", "conv2", "fc"], [0, 0, 0]),
    "nnx": (["conv1", "conv2", "fc"], [3, 3, 1]),
    "apply": (["w1", "w2"], [1, 1]),
}


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("kind", ["equinox", "nnx", "apply"])
def test_end_to_end(kind, fmnist, tmp_path):
  images, labels = fmnist
  model, to = build(kind, images)
  x, y = to(images), labels
  names, axes = EXPECTED[kind]
  assert model.layers.names == names
  assert [l.channel_axis for l in model.layers.values()] == axes

  # analyze -> search: the pins land on the first and last layers the input meets
  traces = _traces(model, {"image": x[:64], "label": y[:64]})
  assert all(np.isfinite(traces))
  # A two-layer MLP pinned at both ends would have nothing left to choose.
  pin = None if kind == "apply" else 8
  bits = _auto_bits(model, traces, budget="avg:4", choices=(2, 4, 8), pin=pin)
  assert list(bits) == names and min(bits.values()) < 8
  if pin:
    assert bits[names[0]] == bits[names[-1]] == 8

  # fake-quantized apply: 8 bits close to float, the mixed widths clearly not
  q8 = quant.quantize_model(model, quant.uniform_config(names, 8))
  qm = quant.quantize_model(model, bits)
  ref, out8, outm = jax.jit(lambda p, s, x: (model.apply(p, s, x)[0], q8(p, s, x)[0],
                                             qm(p, s, x)[0]))(model.params, model.state, x)
  assert rel(out8, ref) < 0.02 and rel(outm, ref) > 3 * rel(out8, ref), (rel(out8, ref),
                                                                          rel(outm, ref))
  # per channel on the layer's own axis (Equinox: axis 0 of [out, in, kh, kw])
  @jax.jit
  def per_channel(params):
    raw = _paths.flatten(params)
    return (_paths.flatten(quant.quantize_params(params, bits, layers=model.layers)),
            {l.param: quant.fake_quant(raw[l.param], bits[l.name], axis=l.channel_axis)
             for l in model.layers.values()})

  qp, want = per_channel(model.params)
  for p, w in want.items():
    np.testing.assert_array_equal(qp[p], w)

  # QAT with optax directly on the quantized apply: finite STE gradients, loss goes down
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, state, opt, xb, yb):
    def loss(p):
      out, new_state = qm(p, state, xb, train=True)
      return xent(out, yb), new_state
    (l, new_state), g = jax.value_and_grad(loss, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), new_state, opt, l, g

  params, state, opt = model.params, model.state, tx.init(model.params)
  losses = []
  for i in range(12):
    sl = slice(64 * (i % 5), 64 * (i % 5 + 1))
    params, state, opt, l, g = step(params, state, opt, x[sl], y[sl])
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree_util.tree_leaves(g))
    losses.append(float(l))
  assert float(jnp.abs(jax.tree_util.tree_leaves(g)[0]).sum()) > 0
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  if kind == "nnx":  # BatchNorm statistics moved in training
    assert not np.allclose(state["bn"]["mean"], model.state["bn"]["mean"])

  # packed export: payload == computed size, the file loads into the model's own pytree
  path = tmp_path / "m.amq"
  info = quant.export_packed(params, bits, path, layers=model.layers)
  assert info["payload_bytes"] == alloc.model_size_bytes(params, bits, layers=model.layers)
  assert info["file_bytes"] == path.stat().st_size
  header, _ = quant.read_header(path)
  assert {e["layer"]: e["axis"] for e in header["entries"] if e["kind"] == "quant"} == dict(
      zip(names, axes))
  loaded, cfg = quant.load_packed(path, return_config=True, like=params)
  assert {k: v["w"] for k, v in cfg.items()} == bits
  @jax.jit
  def check(params, loaded, state, xb):
    return (quant.quantize_params(params, bits, layers=model.layers),
            model.apply(loaded, state, xb)[0], qm(params, state, xb)[0])

  want, got, qout = check(params, loaded, state, x[:32])
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got, qout, rtol=1e-5, atol=1e-5)  # the file IS the QAT model
  rebuilt = model.rebuild(loaded, state)
  assert type(rebuilt) is {"equinox": EqxCNN, "nnx": NnxCNN, "apply": tuple}[kind]
  if kind != "apply":
    assert np.array_equal(rebuilt.fc.weight if kind == "equinox" else rebuilt.fc.kernel[...],
                          _paths.flatten(loaded)[model.layers["fc"].param])


def test_fixed_size_and_omega_read_the_layer_table(fmnist):
  images, _ = fmnist
  model, _ = build("equinox", images)
  layers = model.layers
  cfg = {n: 4 for n in layers.names}
  fixed = alloc.fixed_size_bytes(model.params, layers)
  total = alloc.model_size_bytes(model.params, cfg, layers=layers)
  # fixed = all float32 except the layers' weights, plus one float32 scale per OUTPUT
  # channel: shape[0] of Equinox weights (8, 16, 10), not shape[-1] (3, 3, 16)
  all_float = alloc.model_size_bytes(model.params, layers=layers)
  assert fixed == all_float - 4 * (72 + 1152 + 160) + 4 * (8 + 16 + 10)
  assert total == fixed + sum((l.params * 4 + 7) // 8 for l in layers.values())
  err = alloc.quant_errors(model.params, layers, (4,))[:, 0]
  w = model.params.conv2.weight
  assert err[1] == pytest.approx(float(quant.quant_error(w, 4, axis=0)), rel=1e-6)
  assert err[1] != pytest.approx(float(quant.quant_error(w, 4, axis=-1)), rel=1e-3)
  traces = {l.param: 1.0 + i for i, l in enumerate(layers.values())}  # keyed by weight path
  rows, _, om = alloc.omega_table(model.params, layers, (4,), avg_traces=traces)
  assert rows == layers.names and np.allclose(om[:, 0], err * [1.0, 2.0, 3.0])


# ------------------------------------------------------------------ activations and errors

def test_nnx_activation_hooks_calibrate_and_quantize(fmnist):
  images, _ = fmnist
  model, _ = build("nnx", images)
  x = images[:128]
  cfg = quant.uniform_config(model.layers.names, 8, 8)
  ranges = quant.calibrate_model(model, [x[:64], {"image": x[64:]}], cfg)
  assert list(ranges) == model.layers.names
  np.testing.assert_allclose(ranges["conv1"], [float(x.min()), float(x.max())], rtol=1e-6)
  assert ranges["conv2"][0] >= 0.0  # after a ReLU
  cfg2 = quant.BitConfig({n: {"w": 8, "a": 2} for n in model.layers.names})
  q8 = quant.quantize_model(model, cfg, act_ranges=ranges)
  q2 = quant.quantize_model(model, cfg2, act_ranges=ranges)
  ref, out8, out2 = jax.jit(lambda p, s, x: (model.apply(p, s, x)[0], q8(p, s, x)[0],
                                             q2(p, s, x)[0]))(model.params, model.state, x)
  assert rel(out8, ref) < 0.03 and rel(out2, ref) > 5 * rel(out8, ref)
  with pytest.raises(BitsError, match="no activation range"):
    quant.quantize_model(model, cfg)


@pytest.mark.parametrize("kind", ["equinox", "apply"])
def test_weight_only_adapters_say_so(kind, fmnist):
  images, _ = fmnist
  model, to = build(kind, images)
  assert model.act_apply is None
  cfg = {model.layers.names[0]: {"w": 4, "a": 8}}
  with pytest.raises(LayerError, match="activation"):
    quant.quantize_model(model, cfg, act_ranges={model.layers.names[0]: [0.0, 1.0]})
  with pytest.raises(LayerError, match="hook"):
    quant.calibrate_model(model, to(images[:8]), cfg)


def test_unknown_layers_list_the_valid_ones(fmnist):
  images, _ = fmnist
  model, _ = build("equinox", images)
  with pytest.raises(BitsError, match=r"unknown layer paths \['conv3'\].*conv1.*conv2.*fc"):
    quant.quantize_model(model, {"conv3": 4})
  with pytest.raises(BitsError, match="conv3"):
    quant.quantize_params(model.params, {"conv3": 4}, layers=model.layers)
  with pytest.raises(BitsError, match="conv3"):
    alloc.model_size_bytes(model.params, {"conv3": 4}, layers=model.layers)
  # weight paths name layers too
  a = quant.quantize_params(model.params, {"fc/weight": 3}, layers=model.layers)
  b = quant.quantize_params(model.params, {"fc": 3}, layers=model.layers)
  assert bool(jnp.all(a.fc.weight == b.fc.weight)) and not bool(
      jnp.all(a.fc.weight == model.params.fc.weight))


def test_from_apply_with_state_and_given_layers(fmnist):
  images, labels = fmnist

  def apply_fn(p, state, x, train):
    h = x.reshape((x.shape[0], -1)) @ p["w1"]
    mean = jnp.mean(h, 0) if train else state["mean"]
    new = {"mean": 0.9 * state["mean"] + 0.1 * mean} if train else state
    return jax.nn.relu(h - mean) @ p["w2"], new

  params = _mlp_params()
  m = adapters.from_apply(apply_fn, params, images[:2], state={"mean": jnp.zeros(32)})
  assert m.layers.names == ["w1", "w2"]
  out, st = m.apply(m.params, m.state, images[:16], train=True)
  assert out.shape == (16, 10) and not np.allclose(st["mean"], 0.0)
  only = adapters.from_apply(apply_fn, params, images[:2], state={"mean": jnp.zeros(32)},
                             layers=["w2"])
  assert only.layers.names == ["w2"]
  again = adapters.from_apply(mlp, params, images[:2], layers=m.layers)
  assert again.layers is m.layers
  with pytest.raises(LayerError, match="w8"):
    adapters.from_apply(mlp, params, images[:2],
                        layers=adapters.Layers([m.layers["w1"]._replace(param="w8")]))
