"""Hessian traces with respect to each quantized layer's INPUT activation (Linen models).

HAWQ-V2 (Sec. 3.4) chooses activation bits by the same sensitivity as weights, with the
Hessian taken w.r.t. a layer's input activation instead of its kernel. Activations differ
per example, so the Hessian is per example:

    l_n(a) = loss(model(x_n) with layer i's input replaced by a, y_n),
    T_i = (1/B) sum_n Tr( d^2 l_n / d a_{n,i}^2 ),

where ``a_{n,i}`` is the input of layer ``i`` on example ``n`` (``num_params`` = its size,
e.g. H*W*C) and ``l_n`` the loss of that ONE example (not the batch mean). In inference
mode (examples independent) the Hessian of the BATCH-MEAN loss ``(1/B) sum_n l_n`` w.r.t.
the whole batch's activation ``(a_{1,i}, ..., a_{B,i})`` is block diagonal with blocks
``(1/B) d^2 l_n / d a_{n,i}^2``, so its trace is the same ``T_i``.

Mechanics: the Linen adapter's input hook (:func:`amq_jax.adapters.from_linen`, the one
place that intercepts layer calls) adds a perturbation ``eps_i`` to the input of every
quantizable layer whose name (``'stage1_block1/conv1'``, the kernel path without
``/kernel``) is selected; the model is unchanged. The Hessian w.r.t.
``eps`` at ``eps = 0`` is the activation Hessian. Each example is processed with ``vmap``
(a batch of one inside), and Hutchinson probes estimate every layer's trace jointly:
``z_i^T (H_n z)_i``, probe ``j`` of layer ``i`` on example ``n`` drawn from
``fold_in(fold_in(fold_in(key, i), j), n)``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax.errors import NonFiniteError
from amq_jax.hessian import _sharding
from amq_jax.hessian._hvp import loss_and_hvp
from amq_jax.hessian._trace import TraceEstimate

__all__ = ["activation_traces"]


def _adapted(model, variables, example, apply_kwargs):
  """The Linen adapter of ``model`` (its layer table and input hooks) and the ``train``
  value to apply it with."""
  from amq_jax.adapters import from_linen
  kw = dict(apply_kwargs)
  train = bool(kw.pop("train", False))
  m = from_linen(model, variables, example[None], train_kwarg="train" in apply_kwargs,
                 apply_kwargs=kw)
  return m, train


def _input_shapes(m) -> dict[str, tuple]:
  """``{layer name: input shape of one example (no batch dim)}`` in call order."""
  shared = [l.name for l in m.layers.values() if l.calls > 1]
  if shared:
    raise ValueError(f"module(s) {shared} are called more than once per forward pass; "
                     "their input activation is not unique")
  return {l.name: tuple(l.in_shape) for l in m.layers.values()}


def activation_traces(model, variables, batch, *, key: jax.Array,
                      layers: Sequence[str] | None = None, probes: int = 32,
                      probes_per_step: int = 1, loss: str = "xent",
                      apply_kwargs: dict | None = None, mesh=None,
                      return_per_example: bool = False):
  """Per-example Hessian traces w.r.t. each layer's input activation, averaged.

  Args:
    model: Linen module applied as ``model.apply(variables, images, **apply_kwargs)``.
    variables: all its variables (``params``, ``batch_stats``, ...).
    batch: ``{'image': [B, ...], 'label': [B]}``; ``B`` a multiple of the device count.
    key: PRNG key (results are a deterministic function of it).
    layers: module paths (``'stage1_block1/conv1'``; kernel paths ``'.../kernel'`` are
      accepted too); default every Conv/Dense module.
    probes: Rademacher probes per example.
    probes_per_step: probes computed in one jitted step.
    loss: ``'xent'`` (softmax cross-entropy with integer labels) or a callable
      ``(logits [1, C], labels [1]) -> per-example losses [1]``.
    apply_kwargs: keyword arguments of ``apply`` (default ``{'train': False}``).
    mesh: device mesh (default all devices); the batch is sharded over it.
    return_per_example: also return ``{path: np.ndarray [probes, B]}`` of the raw
      per-probe, per-example values (``mean(0)`` estimates each example's trace).

  Returns:
    ``{module path: TraceEstimate}`` where ``trace`` is ``T_i`` (the mean over examples
    and probes), ``stderr`` its standard error over probes (each probe's value being the
    mean over the examples), ``num_params`` the size of ONE example's activation, and
    ``avg_trace = trace / num_params``. With ``return_per_example``, a pair
    ``(estimates, per_example)``.

  Raises:
    NonFiniteError: non-finite loss or Hessian-vector product (the message names the
      example indices and layers).
  """
  apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
  mesh = _sharding.default_mesh() if mesh is None else mesh
  images, labels = batch["image"], batch["label"]
  adapted, train = _adapted(model, variables, jnp.asarray(images[0]), apply_kwargs)
  all_shapes = _input_shapes(adapted)
  if layers is None:
    paths = list(all_shapes)
  else:
    paths = [p[: -len("/kernel")] if p.endswith("/kernel") else p for p in layers]
    unknown = [p for p in paths if p not in all_shapes]
    if unknown:
      raise KeyError(f"unknown layer(s) {unknown}; Conv/Dense modules are {list(all_shapes)}")
  shapes = {p: all_shapes[p] for p in paths}
  if loss == "xent":
    def per_example(logits, y):
      return -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                                  y[:, None].astype(jnp.int32), -1)[:, 0]
  elif callable(loss):
    per_example = loss
  else:
    raise ValueError(f"loss must be 'xent' or a callable, got {loss!r}")

  def example_loss(eps, variables, x, y):
    def add_eps(name, a):
      return a + eps[name].astype(a.dtype) if name in eps else a
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    logits, _ = adapted.act_apply(params, state, x[None], add_eps, train=train)
    return per_example(logits, y[None])[0]

  def one_example(variables, x, y, n, key, j):
    zero = {p: jnp.zeros((1,) + s, jnp.float32) for p, s in shapes.items()}
    z = {p: jax.random.rademacher(
        jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, i), j), n),
        (1,) + s, jnp.float32) for i, (p, s) in enumerate(shapes.items())}
    l, hz = loss_and_hvp(lambda e: example_loss(e, variables, x, y), zero, z)
    vals = jnp.stack([jnp.vdot(z[p], hz[p]) for p in shapes])
    fin = jnp.stack([jnp.all(jnp.isfinite(hz[p])) for p in shapes])
    return vals, fin, l

  def step(variables, x, y, n, key, j0):
    def one_probe(p):
      return jax.vmap(one_example, in_axes=(None, 0, 0, 0, None, None))(
          variables, x, y, n, key, j0 + p)
    if probes_per_step == 1:
      vals, fin, l = one_probe(0)
      return vals[None], fin, l
    vals, fin, l = jax.lax.map(one_probe, jnp.arange(probes_per_step))
    return vals, fin[0], l[0]

  rep = _sharding.replicated(mesh)
  step = _sharding.serial_on_cpu(jax.jit(step, out_shardings=rep))
  sharded = _sharding.shard_batch({"x": images, "y": labels,
                                   "n": np.arange(len(images), dtype=np.int32)
                                   if jax.process_count() == 1 else
                                   np.arange(len(images), dtype=np.int32)
                                   + jax.process_index() * len(images)}, mesh)
  variables = _sharding.replicate(variables, mesh)
  key = _sharding.replicate(key, mesh)
  outs = []
  for j0 in range(0, probes, probes_per_step):
    outs.append(step(variables, sharded["x"], sharded["y"], sharded["n"], key,
                     _sharding.replicate(np.int32(j0), mesh)))
  outs = _sharding.to_host(outs)  # one sync at the end: no host round trip per probe
  vals = np.concatenate([o[0] for o in outs])[:probes]  # [probes, B, L]
  fin = np.asarray(outs[0][1])  # [B, L]; the first step already exposes non-finite values
  losses = np.asarray(outs[0][2])
  bad_ex = np.flatnonzero(~np.isfinite(losses)).tolist()
  bad_lay = [p for i, p in enumerate(shapes) if not fin[:, i].all()]
  if bad_ex or bad_lay or not np.isfinite(vals).all():
    raise NonFiniteError(
        f"non-finite loss on example(s) {bad_ex} and/or non-finite Hessian-vector product "
        f"in layer(s) {bad_lay or [p for i, p in enumerate(shapes) if not np.isfinite(vals[..., i]).all()]}"
        f" on example(s) {np.flatnonzero(~fin.all(1)).tolist()}")
  est, per = {}, {}
  for i, (p, s) in enumerate(shapes.items()):
    per[p] = vals[:, :, i]
    est[p] = TraceEstimate.from_samples(vals[:, :, i].mean(1), int(np.prod(s)))
  return (est, per) if return_per_example else est
