"""Hessian-vector products of a loss over a subset of parameters, averaged over batches.

For a loss ``L(theta) = sum_b (n_b / N) * loss_fn(theta, batch_b)`` (``loss_fn`` returns the
MEAN over its batch of ``n_b`` examples, ``N = sum_b n_b``) and a set ``W`` of parameter
leaves (the others held fixed), the Hessian-vector product is

    H v = d/dt grad_W L(theta + t v) |_{t=0},

computed forward-over-reverse, ``jax.jvp(jax.grad(f), (w,), (v,))[1]``: one forward-mode
pass through the reverse-mode gradient, about twice the cost of a gradient and no more
memory than one (Pearlmutter 1994; the JAX autodiff cookbook).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from amq_jax import _paths
from amq_jax.hessian import _sharding

__all__ = ["make_hvp", "linen_loss_fn", "linen_logits_fn"]

LossFn = Callable[[Any, Any], jax.Array]


def linen_loss_fn(model, variables, *, loss: str | Callable = "xent") -> LossFn:
  """``loss_fn(params, batch)`` for a Flax Linen classifier in inference mode.

  The other collections of ``variables`` (e.g. BatchNorm's ``batch_stats``) are held fixed
  and the model is applied with ``train=False``, so BatchNorm uses its running statistics
  and examples do not interact: the Hessian is the one of the deployed function.

  Args:
    model: a Linen module called as ``model.apply(variables, images, train=False)``.
    variables: ``{'params': ..., **other_collections}``; only the non-params
      collections are used (the params come as the first argument of ``loss_fn``).
    loss: ``'xent'`` (softmax cross-entropy with integer labels) or a callable
      ``(logits, labels) -> per-example losses [B]``.

  Returns:
    ``loss_fn(params, batch) -> scalar``, the MEAN loss over ``batch['image']`` /
    ``batch['label']``.
  """
  others = {k: v for k, v in variables.items() if k != "params"}
  if loss == "xent":
    def per_example(logits, labels):
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  elif callable(loss):
    per_example = loss
  else:
    raise ValueError(f"loss must be 'xent' or a callable, got {loss!r}")

  def loss_fn(params, batch):
    logits = model.apply({"params": params, **others}, batch["image"], train=False)
    return jnp.mean(per_example(logits, batch["label"]))

  return loss_fn


def linen_logits_fn(model, variables) -> Callable[[Any, Any], jax.Array]:
  """``logits_fn(params, batch) -> [N, C]`` for a Flax Linen classifier in inference mode.

  The companion of :func:`linen_loss_fn` for the Gauss-Newton and Fisher traces
  (``layer_traces(..., curvature='ggn', logits_fn=...)``): the same model call, the
  non-params collections held fixed, ``train=False``, ``batch['image']`` as input.
  """
  others = {k: v for k, v in variables.items() if k != "params"}

  def logits_fn(params, batch):
    return model.apply({"params": params, **others}, batch["image"], train=False)

  return logits_fn


def loss_and_hvp(f: Callable, w: Any, v: Any):
  """``(f(w), H_f(w) v)`` by forward-over-reverse; ``w`` and ``v`` share a structure."""
  (loss, _), (_, hv) = jax.jvp(jax.value_and_grad(f), (w,), (v,))
  return loss, hv


_JIT_CACHE: "collections.OrderedDict[tuple, Callable]" = collections.OrderedDict()
# One entry per estimator kind and, for the restricted (one-layer) HVPs, per layer: a
# ResNet-50 has ~54 layers, so the cache must hold a few hundred functions to avoid
# recompiling every round.
_JIT_CACHE_SIZE = 512


def cached_jit(kind: str, pb: "Problem", sig: tuple, build: Callable[[], Callable]):
  """``jax.jit(build(), out_shardings=replicated)``, reused across calls.

  Callers run these many times in a row (probes, layers, batches): on several CPU devices
  each call waits for its result (``_sharding.serial_on_cpu``).

  Estimators are often called repeatedly with the same ``loss_fn`` (several estimators,
  layers, batches): compiling a forward-over-reverse HVP takes seconds on CPU, so the
  jitted function is kept per (kind, loss_fn, static signature, mesh) in a small LRU.
  ``build`` must close over static things only, never over arrays.
  """
  key = (kind, pb.loss_fn, sig, pb.mesh)
  fn = _JIT_CACHE.get(key)
  if fn is None:
    fn = _sharding.serial_on_cpu(jax.jit(build(), out_shardings=pb.replicated))
    _JIT_CACHE[key] = fn
    while len(_JIT_CACHE) > _JIT_CACHE_SIZE:
      _JIT_CACHE.popitem(last=False)
  else:
    _JIT_CACHE.move_to_end(key)
  return fn


class Problem:
  """The pieces every estimator shares: placed params, batches and their weights.

  Not public. ``w`` is ``{path: leaf}`` for the ``wrt`` paths (replicated on the mesh);
  ``batches`` are sharded along the example axis; ``weights`` are ``n_b / N``.
  """

  def __init__(self, loss_fn: LossFn, params: Any, batches: Any, *,
               wrt: Sequence[str] | None, mesh):
    self.mesh = _sharding.default_mesh() if mesh is None else mesh
    self.wrt = list(_paths.quantizable_paths(params) if wrt is None else wrt)
    if not self.wrt:
      raise ValueError("no parameters to differentiate: `wrt` is empty (and the params "
                       "have no Conv/Dense kernel)")
    if len(set(self.wrt)) != len(self.wrt):
      raise ValueError(f"duplicate paths in wrt: {self.wrt}")
    self.params = _sharding.replicate(params, self.mesh)
    self.w = _paths.select(self.params, self.wrt)
    self.shapes = {p: tuple(x.shape) for p, x in self.w.items()}
    self.dtypes = {p: x.dtype for p, x in self.w.items()}
    self.num_params = {p: int(np.prod(s)) for p, s in self.shapes.items()}
    blist = _sharding.as_batch_list(batches)
    self.batches = [_sharding.shard_batch(b, self.mesh, index=i) for i, b in enumerate(blist)]
    sizes = [_sharding.batch_size(b) for b in self.batches]
    total = float(sum(sizes))
    self.weights = [_sharding.replicate(np.float32(s / total), self.mesh) for s in sizes]
    self.loss_fn = loss_fn
    self.replicated = _sharding.replicated(self.mesh)

  def replicate(self, x):
    return _sharding.replicate(x, self.mesh)

  def check_tree(self, v, what="v"):
    if set(v) != set(self.wrt):
      raise KeyError(f"{what} must have exactly the keys {self.wrt}; got {sorted(v)}")
    out = {}
    for p in self.wrt:
      x = v[p]
      if tuple(np.shape(x)) != self.shapes[p]:
        raise ValueError(f"{what}[{p!r}] has shape {np.shape(x)}, expected {self.shapes[p]}")
      out[p] = jnp.asarray(x, self.dtypes[p]) if not isinstance(x, jax.Array) else x
    return self.replicate(out)


class HVP:
  """``hvp(v) -> H v`` over the ``wrt`` leaves; built by :func:`make_hvp`.

  Attributes:
    wrt: the parameter paths the Hessian is taken over (keys of ``v`` and ``H v``).
    num_params: ``{path: number of entries}``.
    mesh: the device mesh used.
  """

  def __init__(self, problem: Problem):
    self._problem = pb = problem
    self.wrt = pb.wrt
    self.num_params = pb.num_params
    self.mesh = pb.mesh
    flat, self._unravel = ravel_pytree({p: jnp.zeros(s, pb.dtypes[p])
                                        for p, s in pb.shapes.items()})
    self.size = int(flat.size)

    loss_fn, unravel = pb.loss_fn, self._unravel
    sig = (tuple(pb.wrt), tuple(pb.shapes[p] for p in pb.wrt),
           tuple(str(pb.dtypes[p]) for p in pb.wrt))

    def build_tree():
      def acc_tree(acc, params, w, v, batch, weight):
        f = lambda w_: loss_fn(_paths.merge(params, w_), batch)
        loss, hv = loss_and_hvp(f, w, v)
        return jax.tree_util.tree_map(lambda a, h: a + weight * h, acc, hv), loss
      return acc_tree

    def build_flat():
      def acc_flat(acc, params, w, x, batch, weight):
        f = lambda w_: loss_fn(_paths.merge(params, w_), batch)
        loss, hv = loss_and_hvp(f, w, unravel(x))
        return acc + weight * ravel_pytree(hv)[0], loss
      return acc_flat

    self._acc_tree = cached_jit("hvp_tree", pb, sig, build_tree)
    self._acc_flat = cached_jit("hvp_flat", pb, sig, build_flat)

  def __call__(self, v: dict) -> dict:
    """``H v`` as ``{path: array}``; ``v`` is ``{path: array}`` over exactly ``wrt``."""
    pb = self._problem
    v = pb.check_tree(v)
    acc = jax.tree_util.tree_map(jnp.zeros_like, v)
    for batch, weight in zip(pb.batches, pb.weights):
      acc, _ = self._acc_tree(acc, pb.params, pb.w, v, batch, weight)
    return acc

  def flat(self, x: jax.Array) -> jax.Array:
    """``H x`` for ``x`` the ravelled (``jax.flatten_util.ravel_pytree``) vector."""
    pb = self._problem
    acc = pb.replicate(jnp.zeros((self.size,), x.dtype))
    for batch, weight in zip(pb.batches, pb.weights):
      acc, _ = self._acc_flat(acc, pb.params, pb.w, x, batch, weight)
    return acc

  def unravel(self, x) -> dict:
    return self._unravel(x)

  def cache_size(self) -> int:
    """Number of compiled variants of the per-batch HVP (1 per distinct batch shape)."""
    return self._acc_tree._cache_size()


def make_hvp(loss_fn: LossFn, params: Any, batches: Any, *,
             wrt: Sequence[str] | None = None, mesh=None) -> HVP:
  """Builds ``hvp(v) -> H v`` for the loss averaged over ``batches``.

  .. math::  H v = \\sum_b \\frac{n_b}{N} \\nabla^2_W \\mathrm{loss\\_fn}(\\theta, b)\\, v

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the MEAN loss over the batch (for Linen
      classifiers, see :func:`linen_loss_fn`). Any framework works (Linen, NNX after
      ``nnx.split``, Equinox after ``eqx.partition``) as long as the params are a pytree of
      dicts whose '/'-joined key paths name the leaves.
    params: the parameter pytree (held fixed except the ``wrt`` leaves).
    batches: one batch (a pytree of arrays with a leading batch dimension) or an iterable
      of batches; batch ``b`` gets weight ``n_b / N``. Each batch size must be a multiple
      of the mesh's device count.
    wrt: parameter paths the Hessian is taken over (default: every Conv/Dense kernel,
      ``amq_jax._paths.quantizable_paths(params)``).
    mesh: a ``jax.sharding.Mesh``; default a 1-D mesh over all devices. Batches are
      sharded along their leading axis, params replicated.

  Returns:
    a callable ``hvp(v)``, ``v`` and ``H v`` being ``{path: array}`` over ``wrt``. It is
    compiled once per distinct batch shape; repeated calls do not retrace.

  Example:
    >>> hvp = make_hvp(loss_fn, params, batch)
    >>> hv = hvp({p: jnp.ones_like(x) for p, x in _paths.select(params, hvp.wrt).items()})
  """
  return HVP(Problem(loss_fn, params, batches, wrt=wrt, mesh=mesh))
