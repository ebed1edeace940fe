"""Model zoo: exact parameter counts, layouts, forward passes of the tiny variants, names.

Full ImageNet models are only traced (``jax.eval_shape``: shapes, no FLOPs); forward passes
run on the tiny variants, with weights drawn by NumPy from the traced shapes (real
``model.init`` compiles one random-number program per layer, which is slow on CPU and adds
nothing that tracing ``init`` does not already check).
"""
from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import _paths, models

# Published counts (torchvision, 1000 classes): parameters only, BN running stats excluded.
PUBLISHED = {"resnet18": 11_689_512, "resnet50": 25_557_032, "inception_v3": 23_834_568}
INCEPTION_WITH_AUX = 27_161_264
AUX_HEAD = 3_326_696  # 1x1 conv+BN 98,560 + 5x5 conv+BN 2,459,136 + fc 769,000
# Our own counts for the SqueezeNext layout of the authors' Caffe definitions (no published
# exact figure; the paper reports ~0.72M for 1.0-SqNxt-23). A layout change breaks these.
SQUEEZENEXT = {"squeezenext": 717_280, "squeezenext_v5": 913_632}

FULL = ["resnet18", "resnet50", "inception_v3", "squeezenext", "squeezenext_v5"]
TINY = ["resnet_tiny", "resnet20", "resnet18_tiny", "resnet50_tiny", "inception_v3_tiny",
        "squeezenext_tiny"]
OURS = FULL + TINY
AUTO_NAME = re.compile(r"^(Conv|Dense|BatchNorm|ConvTranspose)_\d+$")


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _traced(name: str, channels: int | None = None, **kw):
  """(model, abstract variables, sample) of a registered model, at its default input shape."""
  if name in FULL:
    kw.setdefault("num_classes", 1000)
  model = models.get_model(name, **kw)
  h, w, c = models.default_input_shape(name)
  sample = jnp.zeros((1, h, w, channels or c), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), sample)
  return model, variables, sample


def _numpy_variables(abstract, seed: int = 0):
  """Concrete variables for traced shapes: He-scaled kernels, unit BN, small biases."""
  rng = np.random.default_rng(seed)

  def fill(path: str, s):
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      v = rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape)
    elif leaf in ("scale", "var"):
      v = np.ones(s.shape)
    elif leaf == "bias":
      v = rng.normal(0.0, 0.1, s.shape)
    else:  # running mean
      v = np.zeros(s.shape)
    return jnp.asarray(v, s.dtype)

  return _paths.map_paths(fill, abstract)


# ---------------------------------------------------------------- parameter counts (ground truth)

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
  _, variables, _ = _traced(name)
  assert _count(variables["params"]) == PUBLISHED[name]


def test_inception_aux_head_adds_published_count():
  _, variables, _ = _traced("inception_v3", aux_logits=True)
  params = variables["params"]
  assert _count(params) == INCEPTION_WITH_AUX
  assert _count(params["AuxLogits"]) == AUX_HEAD == INCEPTION_WITH_AUX - PUBLISHED["inception_v3"]
  assert _count(params["AuxLogits"]["fc"]) == 768 * 1000 + 1000


def test_inception_aux_outputs_in_train_mode_only():
  model, variables, _ = _traced("inception_v3", aux_logits=True)
  x = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
  (logits, aux), _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert logits.shape == aux.shape == (2, 1000)
  assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape == (2, 1000)


@pytest.mark.parametrize("name", sorted(SQUEEZENEXT))
def test_squeezenext_parameter_count(name):
  _, variables, _ = _traced(name)
  n = _count(variables["params"])
  assert n == SQUEEZENEXT[name]
  # 111 convolutions + fc, as in the reference Caffe definitions.
  assert len(_paths.quantizable_paths(variables["params"])) == 112
  if name == "squeezenext":
    assert abs(n - 0.72e6) / 0.72e6 < 0.01  # paper: 0.72M


def test_squeezenext_v5_moves_blocks_to_later_stages():
  _, variables, _ = _traced("squeezenext_v5")
  blocks = {k.split("_")[0] for k in variables["params"] if k.startswith("stage")}
  per_stage = [sum(k.startswith(f"stage{s}_") for k in variables["params"]) for s in (1, 2, 3, 4)]
  assert blocks == {"stage1", "stage2", "stage3", "stage4"} and per_stage == [2, 4, 14, 1]


# ---------------------------------------------------------------- layouts (shapes of intermediates)

def _intermediate_shapes(name: str, hw: int) -> dict[str, tuple]:
  model, variables, _ = _traced(name)
  x = jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32)
  _, state = jax.eval_shape(lambda v, x: model.apply(
      v, x, capture_intermediates=True, mutable=["intermediates"]), variables, x)
  flat = _paths.flatten(state["intermediates"])
  return {k.rsplit("/", 2)[0]: v.shape for k, v in flat.items() if k.endswith("__call__/0")}


def test_resnet50_is_v1_5_stride_on_the_3x3_conv():
  shapes = _intermediate_shapes("resnet50", 224)
  assert shapes["stem_conv"] == (1, 112, 112, 64)
  assert shapes["layer2_block0/conv1"] == (1, 56, 56, 128)   # 1x1: no stride
  assert shapes["layer2_block0/conv2"] == (1, 28, 28, 128)   # 3x3: stride 2
  assert shapes["layer2_block0/downsample_conv"] == (1, 28, 28, 512)
  assert shapes["layer4_block2"] == (1, 7, 7, 2048)
  assert shapes["fc"] == (1, 1000)


def test_inception_grid_sizes_at_299():
  shapes = _intermediate_shapes("inception_v3", 299)
  assert shapes["Conv2d_1a_3x3"] == (1, 149, 149, 32)
  assert shapes["Mixed_5d"] == (1, 35, 35, 288)
  assert shapes["Mixed_6e"] == (1, 17, 17, 768)
  assert shapes["Mixed_7c"] == (1, 8, 8, 2048)


def test_squeezenext_grid_sizes_at_224():
  shapes = _intermediate_shapes("squeezenext", 224)
  assert shapes["stage1_block0"] == (1, 54, 54, 32)
  assert shapes["stage4_block0"] == (1, 7, 7, 256)
  assert shapes["final_conv"] == (1, 7, 7, 128)


# ---------------------------------------------------------------- forward passes of tiny variants

@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_train_and_eval(name):
  num_classes = 7  # not the registered default: the head width is configurable
  model, abstract, sample = _traced(name, num_classes=num_classes)
  variables = _numpy_variables(abstract)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3,) + sample.shape[1:]), jnp.float32)

  @jax.jit
  def both(v, x):
    logits_eval = model.apply(v, x, train=False)
    logits_train, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    return logits_eval, logits_train, updates

  logits_eval, logits_train, updates = both(variables, x)
  for logits in (logits_eval, logits_train):
    assert logits.shape == (3, num_classes)
    assert bool(jnp.all(jnp.isfinite(logits)))
  # Train mode normalizes with batch statistics and moves the running averages.
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)),
                                       updates["batch_stats"], variables["batch_stats"]))
  assert max(float(m) for m in moved) > 0
  assert not np.allclose(logits_eval, logits_train)


@pytest.mark.parametrize("name", TINY)
def test_one_channel_inputs(name):
  model, abstract, sample = _traced(name, channels=1)
  assert sample.shape[-1] == 1
  first = models.layer_order(model, abstract, sample)[0]
  assert _paths.select(abstract["params"], [first])[first].shape[-2] == 1
  out = jax.eval_shape(lambda v, x: model.apply(v, x), abstract, sample)
  assert out.shape == (1, 10)


def test_one_channel_forward_fashion_mnist_size():
  model, abstract, _ = _traced("resnet18_tiny", channels=1)
  x = jnp.ones((2, 28, 28, 1), jnp.float32)
  logits = jax.jit(lambda v, x: model.apply(v, x))(_numpy_variables(abstract), x)
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


# ---------------------------------------------------------------- names and layer order

@pytest.mark.parametrize("name", OURS + ["inception_v3+aux"])
def test_layer_names_are_explicit_and_ordered(name):
  if name == "inception_v3+aux":
    model, variables, sample = _traced("inception_v3", aux_logits=True)
  else:
    model, variables, sample = _traced(name)
  for collection in ("params", "batch_stats"):
    for path in _paths.flatten(variables[collection]):
      auto = [seg for seg in path.split("/") if AUTO_NAME.match(seg)]
      assert not auto, f"{name}: auto-generated module name in {path}"
  kernels = _paths.quantizable_paths(variables["params"])
  order = models.layer_order(model, variables, sample)
  assert len(order) == len(set(order)) == len(kernels)
  assert set(order) == set(kernels)
  assert order[-1].split("/")[0] in ("fc", "head")


def test_readable_paths_exist():
  expected = {
      "resnet18": ["stem_conv/kernel", "layer1_block0/conv1/kernel",
                   "layer2_block0/downsample_conv/kernel", "layer4_block1/conv2/kernel",
                   "fc/kernel", "fc/bias"],
      "resnet50": ["layer1_block0/conv3/kernel", "layer1_block0/downsample_conv/kernel",
                   "layer3_block5/conv3/kernel"],
      "inception_v3": ["Conv2d_1a_3x3/conv/kernel", "Conv2d_1a_3x3/bn/scale",
                       "Mixed_5b/branch1x1/conv/kernel", "Mixed_6e/branch7x7dbl_5/conv/kernel",
                       "Mixed_7c/branch3x3dbl_3b/conv/kernel", "fc/kernel"],
      "squeezenext": ["stem_conv/kernel", "stage1_block0/shortcut_conv/kernel",
                      "stage3_block7/conv4/kernel", "final_conv/kernel", "fc/kernel"],
  }
  for name, paths in expected.items():
    flat = _paths.flatten(_traced(name)[1]["params"])
    missing = [p for p in paths if p not in flat]
    assert not missing, f"{name}: missing {missing}"
  flat = _paths.flatten(_traced("inception_v3")[1]["params"])
  assert flat["Mixed_6b/branch7x7_2/conv/kernel"].shape == (1, 7, 128, 128)
  assert "Conv2d_1a_3x3/conv/bias" not in flat  # BasicConv2d: conv without bias
  sq = _paths.flatten(_traced("squeezenext")[1]["params"])
  assert sq["stage1_block0/conv3/kernel"].shape == (3, 1, 8, 16)  # 3x1 first in even blocks
  assert sq["stage1_block1/conv3/kernel"].shape == (1, 3, 8, 16)
  assert "fc/bias" not in sq


def test_inception_bn_epsilon_is_1e_3():
  model, _, _ = _traced("inception_v3_tiny")
  eps = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      eps.add(context.module.epsilon)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  assert eps == {1e-3}


def test_unknown_model_lists_registered_names():
  with pytest.raises(KeyError) as err:
    models.get_model("nope")
  message = str(err.value)
  for name in OURS:
    assert repr(name) in message
  with pytest.raises(KeyError):
    models.default_input_shape("nope")
