"""amq_jax.hessian against ground truth: exact jax.hessian blocks and numpy eigvalsh.

Tiny float32 models (an MLP and a CNN with BatchNorm) whose full Hessian over the kernels
is small enough to build exactly. Hutchinson estimates must agree with the exact block
traces within 3 standard errors (fixed keys: deterministic).
"""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats
from jax.sharding import Mesh

from amq_jax import _paths, hessian
from amq_jax.hessian import _progress, _trace


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
  """No progress bars in these tests (tests/test_curvature.py checks that they show)."""
  monkeypatch.setattr(_progress, "bar", lambda enabled, **kw: None)


class TinyMLP(nn.Module):
  """5 -> 6 -> 6 -> 6 -> 3, tanh. d2 and d3 kernels have equal shapes.

  ``eps`` (test only) adds a perturbation to a layer's input, by module name: the ground
  truth for activation traces, independent of the library's method interception.
  """

  @nn.compact
  def __call__(self, x, train: bool = False, eps=None):
    eps = eps or {}
    x = x.reshape(x.shape[0], -1)
    for name in ("d1", "d2", "d3"):
      x = nn.tanh(nn.Dense(6, name=name)(x + eps.get(name, 0.0)))
    return nn.Dense(3, name="head")(x + eps.get("head", 0.0))


class TinyCNN(nn.Module):
  """6x6x1 -> conv3x3(2) -> BN -> softplus -> conv3x3(3) -> mean -> dense(3)."""

  @nn.compact
  def __call__(self, x, train: bool = False, eps=None):
    eps = eps or {}
    x = nn.Conv(2, (3, 3), padding="SAME", name="conv1")(x + eps.get("conv1", 0.0))
    x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    x = nn.softplus(x)
    x = nn.Conv(3, (3, 3), padding="SAME", name="conv2")(x + eps.get("conv2", 0.0))
    x = jnp.mean(jnp.tanh(x), axis=(1, 2))
    return nn.Dense(3, name="head")(x + eps.get("head", 0.0))


def _mesh(n: int) -> Mesh:
  return Mesh(np.asarray(jax.devices()[:n]), ("data",))


# Exactness tests run on one device (fast on 2 cores); the sharded test compares 1/4/8.
ONE = {"mesh": _mesh(1)}


def _setup(kind: str, batch_size: int = 16, seed: int = 0):
  if kind == "mlp":
    model, shape = TinyMLP(), (batch_size, 5)
  else:
    model, shape = TinyCNN(), (batch_size, 6, 6, 1)
  kx, kp = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, jnp.float32)
  y = jnp.arange(batch_size, dtype=jnp.int32) % 3
  variables = dict(model.init(kp, x))
  if "batch_stats" in variables:  # non-trivial running statistics
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda a: a + 0.3, variables["batch_stats"])
  return model, variables, {"image": x, "label": y}


@functools.lru_cache(maxsize=None)
def _problem(kind: str):
  """(model, variables, batch, loss_fn, exact full Hessian over kernels, block slices)."""
  model, variables, batch = _setup(kind)
  loss_fn = hessian.linen_loss_fn(model, variables)
  params = variables["params"]
  wrt = _paths.quantizable_paths(params)
  w = _paths.select(params, wrt)
  flat, unravel = ravel_pytree(w)
  H = np.asarray(jax.hessian(lambda f: loss_fn(_paths.merge(params, unravel(f)), batch))(flat),
                 np.float64)
  # Block of each path in the ravelled order (ravel_pytree sorts dict keys).
  idx = unravel(jnp.arange(flat.size, dtype=jnp.float32))
  blocks = {p: np.asarray(idx[p]).reshape(-1).astype(int) for p in wrt}
  return model, variables, batch, loss_fn, H, blocks


def _exact_block(H, blocks, p):
  b = blocks[p]
  return H[np.ix_(b, b)]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("estimator", ["joint", "per_layer", "adaptive"])
def test_traces_match_exact_blocks(kind, estimator):
  _, variables, batch, loss_fn, H, blocks = _problem(kind)
  est = hessian.layer_traces(loss_fn, variables["params"], batch, key=jax.random.key(1),
                             estimator=estimator, rtol=0.05, min_probes=100,
                             max_probes=500, probes_per_step=50, **ONE)
  assert list(est) == list(blocks)
  for p, e in est.items():
    exact = np.trace(_exact_block(H, blocks, p))
    assert e.num_params == len(blocks[p])
    assert e.probes == len(e.samples) and e.probes >= 100
    assert np.isclose(e.trace, np.mean(e.samples)) and np.isclose(e.avg_trace, e.trace / e.num_params)
    assert abs(e.trace - exact) <= 3 * e.stderr, (p, e.trace, e.stderr, exact)


def test_stopping_rule_and_adaptive_saves_work():
  _, variables, batch, loss_fn, H, blocks = _problem("mlp")
  params = variables["params"]
  res = {est: hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(2),
                                   estimator=est, rtol=0.2, min_probes=10, max_probes=5000,
                                   probes_per_step=50, **ONE)
         for est in ("joint", "adaptive")}
  for est, r in res.items():
    for p, e in r.items():
      assert e.converged and e.probes >= 10 and e.status == "converged"
      # The rule: the 95% Student-t half-width is within rtol of the mean.
      t = stats.t.ppf(0.975, e.probes - 1)
      assert t * e.stderr <= 0.2 * abs(e.trace)
      # One step fewer would not have stopped (the rule fires at the first chance).
      s = e.samples[:-50]
      if len(s) >= 10:
        half = stats.t.ppf(0.975, len(s) - 1) * np.std(s, ddof=1) / np.sqrt(len(s))
        assert half > 0.2 * abs(np.mean(s))
  # Layers that converge early stop adding cross-term variance in 'adaptive'.
  assert (max(e.probes for e in res["adaptive"].values())
          <= max(e.probes for e in res["joint"].values()) * 1.5)


def test_stderr_shrinks_as_inverse_sqrt_probes():
  _, variables, batch, loss_fn, _, _ = _problem("mlp")
  kw = dict(key=jax.random.key(3), estimator="per_layer", probes_per_step=64)
  a = hessian.layer_traces(loss_fn, variables["params"], batch, min_probes=256,
                           max_probes=256, **kw, **ONE)
  b = hessian.layer_traces(loss_fn, variables["params"], batch, min_probes=1024,
                           max_probes=1024, **kw, **ONE)
  for p in a:
    # Same key schedule: the short run is a prefix of the long one.
    np.testing.assert_array_equal(a[p].samples, b[p].samples[:256])
    assert 0.38 <= b[p].stderr / a[p].stderr <= 0.62, (p, b[p].stderr / a[p].stderr)


def test_atol_floor_and_zero_block():
  """A block that is exactly zero stops at min_probes (stderr 0 <= atol = 0)."""
  def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["a"]["kernel"]) ** 2) + 0.0 * jnp.sum(params["b"]["kernel"])
  params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
  batch = {"x": jax.random.normal(jax.random.key(0), (8, 3))}
  est = hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(0), min_probes=40,
                             estimator="per_layer", **ONE)
  assert est["b/kernel"].trace == 0 and est["b/kernel"].probes == 40 and est["b/kernel"].converged
  assert est["b/kernel"].status == "near_zero"
  # Exact: the loss is (1 / (N n_out)) sum_{n,o} (x_n . A_o)^2, whose Hessian is n_out copies
  # of (2 / (N n_out)) sum_n x_n x_n^T: trace 2 mean_n ||x_n||^2.
  exact = 2 * float(jnp.mean(jnp.sum(batch["x"] ** 2, 1)))
  assert abs(est["a/kernel"].trace - exact) <= 3 * est["a/kernel"].stderr + 1e-5


def test_independent_probes_for_equal_shaped_layers():
  """Two layers with IDENTICAL Hessian blocks must still get different samples."""
  def loss_fn(params, batch):
    f = lambda k: jnp.mean(jnp.tanh(batch["x"] @ k) ** 2)
    return f(params["l1"]["kernel"]) + f(params["l2"]["kernel"])
  k = jax.random.normal(jax.random.key(0), (4, 3))
  params = {"l1": {"kernel": k}, "l2": {"kernel": k}}
  batch = {"x": jax.random.normal(jax.random.key(1), (8, 4))}
  for est in ("joint", "per_layer"):
    r = hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(0), estimator=est,
                             min_probes=20, max_probes=20, **ONE)
    assert not np.allclose(r["l1/kernel"].samples, r["l2/kernel"].samples)
  # Both estimators draw the same probe for layer i, probe j.
  a = _trace.probe(jax.random.key(0), 0, 0, (4, 3), jnp.float32)
  b = _trace.probe(jax.random.key(0), 1, 0, (4, 3), jnp.float32)
  assert not np.array_equal(a, b)


def test_deterministic_for_a_key():
  _, variables, batch, loss_fn, _, _ = _problem("cnn")
  run = lambda s: hessian.layer_traces(loss_fn, variables["params"], batch,
                                       key=jax.random.key(s), min_probes=8, max_probes=8, **ONE)
  a, b, c = run(5), run(5), run(6)
  for p in a:
    np.testing.assert_array_equal(a[p].samples, b[p].samples)
    assert not np.array_equal(a[p].samples, c[p].samples)


def test_no_recompilation():
  model, variables, batch = _setup("mlp")
  traces = []
  inner = hessian.linen_loss_fn(model, variables)

  def loss_fn(params, batch):
    traces.append(1)  # runs once per trace, never per call of the compiled function
    return inner(params, batch)

  params = variables["params"]
  hvp = hessian.make_hvp(loss_fn, params, batch, **ONE)
  for s in range(3):
    v = {p: jax.random.normal(jax.random.key(s), x.shape) for p, x in
         _paths.select(params, hvp.wrt).items()}
    hvp(v)
  assert len(traces) == 1 and hvp.cache_size() == 1
  traces.clear()
  for est in ("joint", "adaptive"):
    hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(0), estimator=est,
                         min_probes=4, max_probes=12, **ONE)
  # One trace: the full-HVP probe step is shared by 'joint' and 'adaptive' and every probe
  # step (mask and probe counters are arguments, not constants).
  assert len(traces) == 1
  traces.clear()
  hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(0), estimator="per_layer",
                       min_probes=4, max_probes=12, **ONE)
  # 'per_layer' differentiates one layer at a time: one restricted function per layer, its
  # DEFAULT_BLOCK products unrolled (each traces the loss once).
  assert len(traces) == len(hvp.wrt) * hessian._trace.DEFAULT_BLOCK
  traces.clear()
  # Hutch++'s sketch and probes go through those same per-layer programs.
  for est in ("joint", "per_layer", "adaptive", "hutchpp"):
    hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(1), estimator=est,
                         min_probes=4, max_probes=12, **ONE)
  assert len(traces) == 0  # all reused


def test_make_hvp_matches_exact_and_weights_batches():
  _, variables, batch, loss_fn, H, blocks = _problem("cnn")
  params = variables["params"]
  hvp = hessian.make_hvp(loss_fn, params, batch, **ONE)
  w = _paths.select(params, hvp.wrt)
  flat, unravel = ravel_pytree(w)
  v = unravel(jax.random.normal(jax.random.key(0), flat.shape))
  got = ravel_pytree(hvp(v))[0]
  np.testing.assert_allclose(got, H @ np.asarray(ravel_pytree(v)[0], np.float64),
                             rtol=1e-4, atol=1e-6)
  # Batches of unequal sizes (8 + 16 on 8 devices) are weighted by size.
  parts = [jax.tree_util.tree_map(lambda a: a[:8], batch),
           jax.tree_util.tree_map(lambda a: a[8:], batch)]
  parts[1] = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), parts[1])
  whole = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), *parts)
  split = hessian.make_hvp(loss_fn, params, parts, **ONE)(v)
  ref = hessian.make_hvp(loss_fn, params, whole, **ONE)(v)
  for p in v:
    np.testing.assert_allclose(split[p], ref[p], rtol=1e-5, atol=1e-6)
  # wrt: one layer only, the others held fixed.
  one = hessian.make_hvp(loss_fn, params, batch, wrt=["head/kernel"], **ONE)
  b = blocks["head/kernel"]
  vh = jnp.ones_like(params["head"]["kernel"])
  np.testing.assert_allclose(np.asarray(one({"head/kernel": vh})["head/kernel"]).reshape(-1),
                             _exact_block(H, blocks, "head/kernel") @ np.ones(len(b)),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer", [None, "d2/kernel"])
def test_top_eigenvalues_lanczos(layer):
  _, variables, batch, loss_fn, H, blocks = _problem("mlp")
  M = H if layer is None else _exact_block(H, blocks, layer)
  exact = np.sort(np.linalg.eigvalsh(M))[::-1]
  k = 5
  r = hessian.top_eigenvalues(loss_fn, variables["params"], batch, key=jax.random.key(0),
                              k=k, layer=layer, tol=1e-5, progress=False, **ONE)
  assert r.converged and r.values.shape == (k,)
  np.testing.assert_allclose(r.values, exact[:k], rtol=1e-3, atol=1e-6)
  # Vectors: unit eigenvectors, H u = lambda u.
  for val, vec in zip(r.values, r.vectors):
    u = np.asarray(ravel_pytree(vec)[0] if layer is None else np.ravel(vec), np.float64)
    assert abs(np.linalg.norm(u) - 1) < 1e-4
    assert np.linalg.norm(M @ u - val * u) <= 2e-3 * max(abs(exact[0]), 1e-6)


@pytest.mark.parametrize("layer,which", [(None, "LM"), ("conv2/kernel", "LM"),
                                         ("conv2/kernel", "LA")])
def test_top_eigenvalues_power(layer, which):
  _, variables, batch, loss_fn, H, blocks = _problem("cnn")
  M = H if layer is None else _exact_block(H, blocks, layer)
  ev = np.linalg.eigvalsh(M)
  k = 2
  if which == "LM":
    exact = np.sort(ev[np.argsort(-np.abs(ev))[:k]])[::-1]  # largest magnitude, descending
  else:
    exact = np.sort(ev)[::-1][:k]
  r = hessian.top_eigenvalues(loss_fn, variables["params"], batch, key=jax.random.key(0),
                              k=k, layer=layer, method="power", tol=1e-5, max_iters=3000,
                              which=which, progress=False, **ONE)
  assert r.converged
  np.testing.assert_allclose(r.values, exact, rtol=1e-3)


def test_spectral_density_quadrature():
  _, variables, batch, loss_fn, H, blocks = _problem("mlp")
  M = _exact_block(H, blocks, "head/kernel")
  n = M.shape[0]
  sd = hessian.spectral_density(loss_fn, variables["params"], batch, key=jax.random.key(0),
                                layer="head/kernel", num_iters=n, num_runs=3, **ONE)
  np.testing.assert_allclose(sd.weights.sum(1), 1.0, rtol=1e-5)
  ev = np.linalg.eigvalsh(M)
  # Gauss quadrature nodes are Ritz values, inside the spectrum; the extreme ones are exact.
  assert sd.nodes.max() <= ev.max() * (1 + 1e-3) + 1e-6
  np.testing.assert_allclose(sd.nodes.max(1), ev.max(), rtol=1e-3)
  dx = sd.grid[1] - sd.grid[0]
  assert abs(sd.density.sum() * dx - 1.0) < 1e-2


def _exact_activation_traces(model, variables, batch):
  """{layer: [B] exact per-example trace of d^2 loss_n / d a_n^2}, via the ``eps`` hook."""
  x, y = batch["image"], batch["label"]
  def loss_n(eps, xn, yn):
    logits = model.apply(variables, xn[None], eps={k: v[None] for k, v in eps.items()})
    return -jax.nn.log_softmax(logits)[0, yn]

  rec = {}  # module name -> input shape of one example

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
      rec["/".join(context.module.path)] = args[0].shape[1:]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.apply(variables, x[:1]))
  out = {}
  for nm, s in rec.items():
    def tr(xn, yn, nm=nm, s=s):
      e0 = {nm: jnp.zeros(s)}
      h = jax.hessian(lambda e: loss_n({nm: e}, xn, yn))(e0[nm])
      n = int(np.prod(s))
      return jnp.trace(h.reshape(n, n))
    out[nm] = np.asarray(jax.vmap(tr)(x, y), np.float64)
  return out, rec


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_activation_traces_match_exact(kind):
  model, variables, batch, _, _, _ = _problem(kind)
  exact, exact_shapes = _exact_activation_traces(model, variables, batch)
  est, per = hessian.activation_traces(model, variables, batch, key=jax.random.key(0),
                                       probes=200, probes_per_step=50, return_per_example=True, **ONE)
  assert set(est) == set(exact)
  for p, e in est.items():
    assert e.num_params == int(np.prod(exact_shapes[p]))
    assert abs(e.trace - exact[p].mean()) <= 3 * e.stderr + 1e-6, (p, e.trace, e.stderr, exact[p].mean())
    v = per[p]  # [probes, B]
    se = v.std(0, ddof=1) / np.sqrt(v.shape[0])
    assert np.all(np.abs(v.mean(0) - exact[p]) <= 4 * se + 1e-6), p
  # Kernel paths are accepted and mapped to module paths.
  sub = hessian.activation_traces(model, variables, batch, key=jax.random.key(0), probes=4,
                                  layers=["head/kernel"], **ONE)
  assert list(sub) == ["head"] and sub["head"].probes == 4


def test_nonfinite_raises_naming_batch_and_layers():
  _, variables, batch, loss_fn, _, _ = _problem("mlp")
  bad = dict(batch)
  bad["image"] = bad["image"].at[3, 0].set(jnp.nan)
  with pytest.raises(FloatingPointError, match=r"batch\(es\) \[1\].*d1/kernel"):
    hessian.layer_traces(loss_fn, variables["params"], [batch, bad], key=jax.random.key(0),
                         min_probes=2, max_probes=4, **ONE)
  with pytest.raises(FloatingPointError, match=r"layer\(s\) \['d2/kernel'\]"):
    hessian.layer_traces(loss_fn, variables["params"], [bad], key=jax.random.key(0),
                         wrt=["d2/kernel"], estimator="per_layer", min_probes=2, max_probes=4,
                         **ONE)


def test_json_roundtrip():
  _, variables, batch, loss_fn, _, _ = _problem("mlp")
  est = hessian.layer_traces(loss_fn, variables["params"], batch, key=jax.random.key(0),
                             min_probes=4, max_probes=4, **ONE)
  back = hessian.estimates_from_json(json.dumps(hessian.estimates_to_json(est)))
  assert list(back) == list(est)
  for p in est:
    assert back[p].trace == est[p].trace and back[p].probes == est[p].probes
    np.testing.assert_array_equal(back[p].samples, est[p].samples)


def test_batch_not_divisible_by_devices():
  _, variables, batch, loss_fn, _, _ = _problem("mlp")
  odd = jax.tree_util.tree_map(lambda a: a[:12], batch)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  with pytest.raises(ValueError, match="divisible"):
    hessian.make_hvp(loss_fn, variables["params"], odd, mesh=mesh)


def test_sharded_equals_single_device():
  assert len(jax.devices()) >= 8, "conftest should give 8 CPU devices"
  _, variables, batch, loss_fn, _, _ = _problem("cnn")
  params = variables["params"]
  out = {}
  for n in (1, 4, 8):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    tr = hessian.layer_traces(loss_fn, params, batch, key=jax.random.key(7), min_probes=6,
                              max_probes=6, estimator="adaptive", mesh=mesh)
    hv = hessian.make_hvp(loss_fn, params, batch, mesh=mesh)
    v = jax.tree_util.tree_map(jnp.ones_like, _paths.select(params, hv.wrt))
    out[n] = (tr, hv(v))
  for n in (4, 8):
    tr, hv = out[n]
    for p in tr:
      np.testing.assert_allclose(tr[p].samples, out[1][0][p].samples, rtol=2e-5, atol=1e-6)
      np.testing.assert_allclose(hv[p], out[1][1][p], rtol=2e-5, atol=1e-6)
