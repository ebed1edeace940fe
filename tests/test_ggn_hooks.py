"""The exact GGN through layer hooks (per-example gradients as matrix products) gives the
same traces as the generic per-example backward passes, on every geometry it claims.

Ground truth here is ``exact_ggn_traces`` without ``model`` (vmap over examples), itself
checked against the full Jacobian in test_curvature.py and on several devices in
test_sharded_estimators.py. Tiny models, a few examples, one device unless stated.
"""
from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from amq_jax import _sharding, adapters, hessian
from amq_jax.hessian import _ggn

MESH = Mesh(np.asarray(jax.devices()[:1]), ("data",))


class Geometries(nn.Module):
  """Stride, VALID padding, groups, kernel dilation, a transposed conv, a token Dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), padding="VALID", name="strided")(x))
    x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2, name="grouped")(x))
    x = nn.relu(nn.Conv(4, (2, 2), kernel_dilation=(2, 2), padding=((1, 0), (2, 1)),
                        name="dilated")(x))
    x = nn.relu(nn.ConvTranspose(3, (3, 3), strides=(2, 2), name="up")(x))
    x = x.reshape((x.shape[0], -1, 3))  # tokens [N, T, 3]
    x = nn.relu(nn.Dense(5, name="tokens")(x))
    return nn.Dense(4, name="head")(x.reshape((x.shape[0], -1)))


class ActInside(nn.Module):
  """A layer whose module applies its nonlinearity inside: its hooked output is not the
  weight's operation plus a bias, so the hooks must not be trusted."""

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 5))
    return jnp.tanh(x @ k)


class WithActInside(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name="head")(ActInside(name="inner")(x))


def _batch(shape, n=6, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(n,) + shape).astype(np.float32)),
          "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def _both(model, variables, batch, **kw):
  logits_fn = hessian.linen_logits_fn(model, variables)
  m = adapters.from_linen(model, variables, batch["image"][:1])
  ref = hessian.exact_ggn_traces(logits_fn, variables["params"], batch, mesh=MESH, **kw)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = hessian.exact_ggn_traces(logits_fn, variables["params"], batch, mesh=MESH,
                                   model=m, **kw)
  return ref, got, [str(w.message) for w in caught]


@pytest.mark.parametrize("output_loss", ["xent", "mse"])
def test_hooked_exact_ggn_matches_vmap_on_every_geometry(output_loss):
  model = Geometries()
  batch = _batch((9, 9, 2))
  if output_loss == "mse":
    batch = dict(batch, label=jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)),
                                          jnp.float32))
  variables = model.init(jax.random.key(0), batch["image"][:1])
  ref, got, warned = _both(model, variables, batch, output_loss=output_loss)
  assert not warned, warned  # every layer went through the hooks
  assert list(got) == list(ref)
  for p in ref:
    assert ref[p].trace > 0
    np.testing.assert_allclose(got[p].trace, ref[p].trace, rtol=1e-4, err_msg=p)


def test_hooked_exact_ggn_on_nnx():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 3, (3, 3), strides=(2, 2), rngs=rngs)
      self.head = nnx.Linear(3 * 4 * 4, 4, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.conv(x))
      return self.head(x.reshape((x.shape[0], -1)))

  batch = _batch((8, 8, 2))
  m = adapters.from_nnx(Net(nnx.Rngs(0)), batch["image"][:1])
  logits_fn = lambda p, b: m.apply(p, m.state, b["image"])[0]
  ref = hessian.exact_ggn_traces(logits_fn, m.params, batch, mesh=MESH)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a fallback would fail the test
    got = hessian.exact_ggn_traces(logits_fn, m.params, batch, mesh=MESH, model=m)
  for p in ref:
    np.testing.assert_allclose(got[p].trace, ref[p].trace, rtol=1e-4, err_msg=p)


def test_a_module_that_transforms_around_its_weight_falls_back_with_a_warning():
  model = WithActInside()
  batch = _batch((7,))
  variables = model.init(jax.random.key(0), batch["image"][:1])
  ref, got, warned = _both(model, variables, batch)
  assert len(warned) == 1 and "inner" in warned[0] and "vmap" in warned[0], warned
  for p in ref:  # the fallback's numbers, not the hooks' wrong ones
    np.testing.assert_allclose(got[p].trace, ref[p].trace, rtol=1e-6, err_msg=p)


def test_misfit_flags_a_transformed_output_and_accepts_a_bias():
  from amq_jax.hessian import _pex
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 6, 6, 2)), jnp.float32)
  model = nn.Conv(4, (3, 3), strides=(2, 2))
  v = model.init(jax.random.key(0), x)
  m = adapters.from_linen(model, v, x[:1])
  op, w = m.layers[m.layers.names[0]].op, v["params"]["kernel"]
  y = model.apply(v, x)
  assert float(_pex.misfit(op, x, w, y + 3.0)) < 1e-5  # a bias is allowed
  assert float(_pex.misfit(op, x, w, jnp.tanh(y))) > 1e-2
  assert float(_pex.misfit(op, 2 * x, w, y)) > 1e-2


def test_factor_columns_drop_one_column_and_keep_the_output_hessian():
  logits = jnp.asarray([2.0, -1.0, 0.5, 7.0, 0.0])
  p = jax.nn.softmax(logits)
  S = _ggn._factor_columns(logits, "xent")
  assert S.shape == (5, 4)
  np.testing.assert_allclose(S @ S.T, jnp.diag(p) - jnp.outer(p, p), atol=1e-6)
  assert _ggn._factor_columns(logits, "mse").shape == (5, 5)


def test_hooked_exact_ggn_does_not_depend_on_the_device_count():
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (conftest.py simulates 8)")
  model = Geometries()
  batch = _batch((9, 9, 2), n=8)
  variables = model.init(jax.random.key(0), batch["image"][:1])
  logits_fn = hessian.linen_logits_fn(model, variables)
  m = adapters.from_linen(model, variables, batch["image"][:1])
  got = [hessian.exact_ggn_traces(logits_fn, variables["params"], batch, model=m,
                                  mesh=_sharding.data_mesh(jax.devices()[:k]))
         for k in (1, 2)]
  for p in got[0]:
    np.testing.assert_allclose(got[1][p].trace, got[0][p].trace, rtol=2e-4, err_msg=p)


def test_hooked_exact_ggn_when_the_module_is_the_layer():
  """An NNX model that is one nnx.Linear: its output hook is the model's output."""
  batch = _batch((5,))
  m = adapters.from_nnx(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), batch["image"][:1])
  logits_fn = lambda p, b: m.apply(p, m.state, b["image"])[0]
  ref = hessian.exact_ggn_traces(logits_fn, m.params, batch, mesh=MESH)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = hessian.exact_ggn_traces(logits_fn, m.params, batch, mesh=MESH, model=m)
  for p in ref:
    np.testing.assert_allclose(got[p].trace, ref[p].trace, rtol=1e-4, err_msg=p)


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_per_example_probes_are_unbiased_and_need_fewer_samples(curvature):
  """Through the hooks each probe's sample averages per-example squared norms: its mean is
  the exact GGN trace (Fisher = GGN for softmax cross-entropy) and its spread is below the
  summed probe's, which carries cross-example terms."""
  model = Geometries()
  batch = _batch((9, 9, 2), n=16)
  variables = model.init(jax.random.key(0), batch["image"][:1])
  logits_fn = hessian.linen_logits_fn(model, variables)
  m = adapters.from_linen(model, variables, batch["image"][:1])
  exact = hessian.exact_ggn_traces(logits_fn, variables["params"], batch, mesh=MESH, model=m)
  kw = dict(key=jax.random.key(3), curvature=curvature, logits_fn=logits_fn, mesh=MESH,
            rtol=1e-9, min_probes=200, max_probes=200, probes_per_step=8, progress=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    per_ex = hessian.layer_traces(None, variables["params"], batch, model=m, **kw)
  summed = hessian.layer_traces(None, variables["params"], batch, **kw)
  wider = 0
  for p, e in exact.items():
    est = per_ex[p]
    assert abs(est.trace - e.trace) <= 4 * est.stderr + 1e-6 * e.trace, (p, est, e)
    wider += summed[p].stderr > est.stderr
  assert wider >= len(exact) - 1, {p: (summed[p].stderr, per_ex[p].stderr) for p in exact}


def test_per_example_probes_fall_back_on_a_misfit_and_do_not_depend_on_devices():
  model = WithActInside()
  batch = _batch((7,), n=8)
  variables = model.init(jax.random.key(0), batch["image"][:1])
  logits_fn = hessian.linen_logits_fn(model, variables)
  m = adapters.from_linen(model, variables, batch["image"][:1])
  kw = dict(key=jax.random.key(3), curvature="ggn", logits_fn=logits_fn, mesh=MESH,
            min_probes=4, max_probes=4, progress=False)
  with pytest.warns(UserWarning, match="inner"):
    got = hessian.layer_traces(None, variables["params"], batch, model=m, **kw)
  want = hessian.layer_traces(None, variables["params"], batch, **kw)
  for p in want:
    np.testing.assert_allclose(got[p].samples, want[p].samples, rtol=1e-6)
  if len(jax.devices()) < 2:
    return
  model = Geometries()
  batch = _batch((9, 9, 2), n=8)
  variables = model.init(jax.random.key(0), batch["image"][:1])
  m = adapters.from_linen(model, variables, batch["image"][:1])
  kw.update(logits_fn=hessian.linen_logits_fn(model, variables))
  kw.pop("mesh")
  one, two = (hessian.layer_traces(None, variables["params"], batch, model=m,
                                   mesh=_sharding.data_mesh(jax.devices()[:k]), **kw)
              for k in (1, 2))
  for p in one:
    np.testing.assert_allclose(two[p].samples, one[p].samples, rtol=2e-4, err_msg=p)
