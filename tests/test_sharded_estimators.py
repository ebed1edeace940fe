"""Every curvature estimator gives the same numbers on a 1-device and a multi-device mesh.

The batch is sharded along its example axis; the result must not depend on how many
devices share it (up to float32 rounding of the sums). This caught a real bug: left to
GSPMD, the vmapped per-example convolution gradients of ``exact_ggn_traces`` came out 5-8%
off on a 2-device mesh (XLA:CPU, jax 0.10), with nothing but a conv net needed to see it.
Tiny CNN, 16 examples, fixed keys; meshes taken from the 8 simulated CPU devices of
conftest.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amq_jax import _paths, _sharding, hessian

RTOL = 2e-4  # float32 sums in another order; the bug this guards against was 5e-2


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), name="conv2")(x))
    return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def problem():
  model = CNN()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(rng.integers(0, 3, 16), jnp.int32)}
  variables = model.init(jax.random.key(0), batch["image"][:1])
  return model, variables, batch


def _meshes(counts=(1, 2, 4)):
  if len(jax.devices()) < max(counts):
    pytest.skip(f"needs {max(counts)} devices (conftest.py simulates 8)")
  return {n: _sharding.data_mesh(jax.devices()[:n]) for n in counts}


def params_at(params, path):
  return _paths.select(params, [path])[path]


def _same(a: dict, b: dict, what: str):
  assert list(a) == list(b)
  for p in a:
    np.testing.assert_allclose(a[p], b[p], rtol=RTOL, atol=1e-7, err_msg=f"{what}: {p}")


def test_exact_ggn_does_not_depend_on_the_device_count(problem):
  model, variables, batch = problem
  logits_fn = hessian.linen_logits_fn(model, variables)
  got = {n: {p: e.trace for p, e in hessian.exact_ggn_traces(
      logits_fn, variables["params"], batch, mesh=m).items()} for n, m in _meshes().items()}
  # A per-example loop without vmap or sharding is the reference.
  for n in (1, 2, 4):
    _same(got[n], _loop_reference(model, variables, batch), f"exact GGN on {n} devices")


def _loop_reference(model, variables, batch):
  from amq_jax.hessian._ggn import _factor_matrix
  params = variables["params"]
  wrt = _paths.quantizable_paths(params)
  w0 = _paths.select(params, wrt)
  logits_fn = hessian.linen_logits_fn(model, variables)
  tot = dict.fromkeys(wrt, 0.0)
  for i in range(16):
    ex = jax.tree.map(lambda a: a[i:i + 1], batch)
    logits, vjp = jax.vjp(lambda w: logits_fn(_paths.merge(params, w), ex)[0], w0)
    S = _factor_matrix(logits, "xent")
    for c in range(S.shape[1]):
      (g,) = vjp(S[:, c])
      for p in wrt:
        tot[p] += float(jnp.sum(g[p] ** 2)) / 16
  return tot


@pytest.mark.parametrize("curvature,estimator", [("ggn", None), ("fisher", None),
                                                 ("hessian", "per_layer"),
                                                 ("hessian", "hutchpp")])
def test_sampled_traces_do_not_depend_on_the_device_count(problem, curvature, estimator):
  model, variables, batch = problem
  kw = dict(key=jax.random.key(3), curvature=curvature, min_probes=4, max_probes=4,
            progress=False, logits_fn=hessian.linen_logits_fn(model, variables))
  if estimator:
    kw["estimator"] = estimator
    if estimator == "hutchpp":
      kw.update(sketch_size=2, min_probes=2, max_probes=2)
  loss_fn = hessian.linen_loss_fn(model, variables)
  got = {n: {p: e.trace for p, e in hessian.layer_traces(
      loss_fn, variables["params"], batch, mesh=m, **kw).items()}
      for n, m in _meshes((1, 2)).items()}  # each mesh compiles anew: two keep it short
  _same(got[2], got[1], f"{curvature}/{estimator} on 2 devices")


def test_hvp_eigenvalues_and_activation_traces_do_not_depend_on_the_device_count(problem):
  model, variables, batch = problem
  params = variables["params"]
  loss_fn = hessian.linen_loss_fn(model, variables)
  out = {}
  for n, m in _meshes((1, 2)).items():
    hvp = hessian.make_hvp(loss_fn, params, batch, mesh=m)
    v = {p: jnp.cos(jnp.arange(hvp.num_params[p], dtype=jnp.float32)).reshape(
        params_at(params, p).shape) for p in hvp.wrt}
    ev = hessian.top_eigenvalues(loss_fn, params, batch, key=jax.random.key(1), k=2,
                                 layer="conv1/kernel", mesh=m)
    act = hessian.activation_traces(model, variables, batch, key=jax.random.key(2), probes=4,
                                    mesh=m)
    out[n] = {"eig": dict(enumerate(np.asarray(ev.values))),
              "act": {p: e.trace for p, e in act.items()},
              "hvp": {p: float(jnp.vdot(v[p], x)) for p, x in hvp(v).items()}}
  for what in ("eig", "act", "hvp"):
    _same(out[2][what], out[1][what], f"{what} on 2 devices")
