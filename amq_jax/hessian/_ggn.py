"""Generalized Gauss-Newton and Fisher traces per layer, all layers from one backward pass.

For a batch-mean loss on model outputs, ``L(theta) = (1/N) sum_n l(f_n(theta), y_n)`` with
``f_n`` the ``C`` logits of example ``n`` and ``J_n = df_n / dtheta``, the Hessian is

    H = (1/N) sum_n J_n^T H_n J_n  +  (1/N) sum_n sum_c (dl/df_nc) d^2 f_nc / dtheta^2,

with ``H_n = d^2 l / df_n^2``. The first term is the generalized Gauss-Newton ``G``
(Schraudolph 2002; Martens 2020): PSD whenever ``l`` is convex in the logits, and equal to
``H`` up to the residual term, which vanishes for a model linear in ``theta`` and is small
near a trained minimum. Its diagonal block for layer ``l`` is
``G_l = (1/N) sum_n J_{n,l}^T S_n S_n^T J_{n,l}`` for any factor ``S_n S_n^T = H_n``:

* ``output_loss='xent'`` (softmax cross-entropy, ``p = softmax(f)``):
  ``H_n = diag(p) - p p^T`` and ``S_n = diag(sqrt p) - p sqrt(p)^T`` (check:
  ``S S^T = diag(p) - 2 p p^T + p (sqrt(p)^T sqrt(p)) p^T`` and ``sum p = 1``);
* ``output_loss='mse'``: ``l_n = (1/C) ||f_n - y_n||^2`` (so ``L = mean((f - y)^2)`` over
  examples and outputs, ``jnp.mean`` of the squared error): ``H_n = (2/C) I``,
  ``S_n = sqrt(2/C) I``.

**Output-space probe** (``curvature='ggn'``). Draw ``u_n`` in ``{-1, +1}^C`` per example
(``E[u u^T] = I``) and take ONE vector-Jacobian product of the logits with cotangent
``S_n u_n``: ``g = sum_n J_n^T S_n u_n``, every layer's block ``g_l`` at once. Then

    E ||g_l||^2 = sum_{n,m} E[u_n^T S_n^T J_{n,l} J_{m,l}^T S_m u_m] = N Tr(G_l),

the terms ``n != m`` vanishing because different examples' probes are independent with
mean zero. So ``||g_l||^2 / N`` is an unbiased estimate of ``Tr(G_l)`` for EVERY layer
from one backward pass, and ``g_l`` involves layer ``l``'s Jacobian only: no cross-layer
variance (the joint Hessian probe has it). The variance is ``(2/N^2) (||A^T A||_F^2 -
sum diag)`` with ``A = [J_{n,l}^T S_n]_n``, at most ``2 ||G_l||_F^2``: that of a Hutchinson
probe of ``G_l`` itself. With several batches, the sample is ``sum_b ||g_{b,l}||^2 / N``
(cross-batch terms, of mean zero, are left out: still unbiased, lower variance).

**Per example** (``layer_traces(..., model=)``, a model with layer hooks). The same probes,
but each example's gradient squared on its own: ``(1/N) sum_n ||J_{n,l}^T S_n u_n||^2``,
also unbiased for ``Tr(G_l)`` (``E[S u u^T S^T] = H_n``) and without the terms ``n != m``
above, whose only effect is variance. Per-example gradients come from each layer's input
and output gradient as matrix products (:mod:`amq_jax.hessian._pex`).

**Monte-Carlo Fisher** (``curvature='fisher'``). ``F = (1/N) sum_n E_{y ~ p_n}[grad l_n(y)
grad l_n(y)^T]`` with labels SAMPLED from the model (not the data: that "empirical
Fisher" is a different, biased quantity). The gradient w.r.t. the logits is
``r_n = p_n - e_y`` and ``E[r r^T] = diag(p) - p p^T = H_n``, so for softmax
cross-entropy ``F = G``. One VJP of the sampled-label summed loss gives
``g = sum_n J_n^T r_n`` and, as above (``E[r_n] = 0``, independent across examples),
``||g_l||^2 / N`` is unbiased for ``Tr(F_l)``. Same cost per probe as the GGN probe; the
variance differs (one-hot residuals instead of +-1 mixtures). For 'mse' the Fisher of the
Gaussian model ``y ~ N(f, (C/2) I)`` (whose negative log-likelihood is ``l`` up to a
constant) is ``G`` and its sampled residual is ``sqrt(2/C) eps``, eps standard normal: the
GGN probe with Gaussian ``u``.

**Exact** (:func:`exact_ggn_traces`): ``Tr(G_l) = (1/N) sum_n sum_c ||J_{n,l}^T S_n e_c||^2``,
one backward pass of per-example gradients per column of ``S_n``, their squared norms summed
per layer (as BackPACK's exact diagonal GGN does). For softmax cross-entropy ``C - 1``
columns suffice: ``S_n sqrt(p_n) = 0`` (``H_n`` has the null vector ``1``), so with the
Householder reflection ``Q_n`` that maps ``e_m`` to ``-sqrt(p_n)`` (``m`` the most likely
class), ``S_n Q_n`` is another factor (``S Q Q^T S^T = S S^T``) whose column ``m`` is zero.
Given a model with layer hooks (``model=``), each per-example gradient is a matrix product
of the layer's input patches and its output gradient (:mod:`amq_jax.hessian._pex`);
otherwise ``vmap`` over examples of the backward pass. The ground truth for tests, and the
cheapest GGN trace for classifiers with few classes.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from amq_jax import _paths
from amq_jax.errors import ConfigError, NonFiniteError
from amq_jax.hessian import _pex, _progress, _sharding, _stats
from amq_jax.hessian._hvp import Problem, cached_jit
from amq_jax.hessian._trace import TraceEstimate, _map_probes, _Sampler

__all__ = ["exact_ggn_traces", "OUTPUT_LOSSES", "output_loss_value"]

OUTPUT_LOSSES = ("xent", "mse")
LogitsFn = Callable[[Any, Any], jax.Array]


def output_loss_value(logits, batch, output_loss: str) -> jax.Array:
  """The batch-mean loss the GGN/Fisher factors belong to (module docstring)."""
  logits = logits.astype(jnp.float32)
  if output_loss == "xent":
    logp = jax.nn.log_softmax(logits, axis=-1)
    y = batch["label"].astype(jnp.int32)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
  return jnp.mean((logits - batch["label"].astype(jnp.float32)) ** 2)


def _factor_times(logits, u, output_loss: str):
  """``S u`` per example (``logits, u: [..., C]``)."""
  C = logits.shape[-1]
  if output_loss == "mse":
    return math.sqrt(2.0 / C) * u
  p = jax.nn.softmax(logits, axis=-1)
  sp = jnp.sqrt(p)
  return sp * u - p * jnp.sum(sp * u, axis=-1, keepdims=True)


def _factor_matrix(logits, output_loss: str):
  """``S`` for one example (``logits [C]`` -> ``[C, C]``, columns are the factors)."""
  C = logits.shape[-1]
  if output_loss == "mse":
    return math.sqrt(2.0 / C) * jnp.eye(C, dtype=jnp.float32)
  p = jax.nn.softmax(logits)
  sp = jnp.sqrt(p)
  return jnp.diag(sp) - p[:, None] * sp[None, :]


def _factor_columns(logits, output_loss: str):
  """The columns one exact pass needs: ``S`` (``[C, C]``) for 'mse', ``S Q`` without its
  zero column (``[C, C - 1]``) for 'xent' (module docstring)."""
  S = _factor_matrix(logits, output_loss)
  if output_loss == "mse":
    return S
  C = S.shape[0]
  sp = jnp.sqrt(jax.nn.softmax(logits))
  m = jnp.argmax(sp)
  v = sp + jax.nn.one_hot(m, C, dtype=sp.dtype)  # |v|^2 = 2 + 2 sqrt(p_m) >= 2: stable
  SQ = S - (2.0 / jnp.dot(v, v)) * jnp.outer(S @ v, v)
  return SQ[:, (m + 1 + jnp.arange(C - 1)) % C]


def _cotangent(curvature: str, output_loss: str, logits, key):
  """The output-space cotangent of one probe (``logits [N, C]`` float32)."""
  if curvature == "ggn":
    return _factor_times(logits, jax.random.rademacher(key, logits.shape, logits.dtype),
                         output_loss)
  if output_loss == "mse":  # Gaussian-model Fisher: the GGN probe with Gaussian u
    return _factor_times(logits, jax.random.normal(key, logits.shape, logits.dtype), "mse")
  y = jax.random.categorical(key, logits, axis=-1)
  return jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(y, logits.shape[-1],
                                                          dtype=logits.dtype)


def _output_step(pb: Problem, curvature: str, output_loss: str, probes_per_step: int):
  """Jitted ``step(params, w, batch, weight, key, b, j0) -> (vals [P, L], fin [L], ok)``.

  ``vals[p, l] = weight / n_b * ||g_l||^2`` (``weight = n_b / N``), ``g`` the VJP of the
  logits with probe ``j0 + p``'s cotangent on batch ``b``.
  """
  sig = (tuple(pb.wrt), tuple(pb.shapes[p] for p in pb.wrt),
         tuple(str(pb.dtypes[p]) for p in pb.wrt), curvature, output_loss, probes_per_step)

  def build():
    logits_fn, wrt = pb.loss_fn, list(pb.wrt)

    def step(params, w, batch, weight, key, b, j0):
      logits, vjp = jax.vjp(lambda w_: logits_fn(_paths.merge(params, w_), batch), w)
      lg = logits.astype(jnp.float32)

      def one(p):
        k = jax.random.fold_in(jax.random.fold_in(key, j0 + p), b)
        (g,) = vjp(_cotangent(curvature, output_loss, lg, k).astype(logits.dtype))
        vals = jnp.stack([jnp.sum(jnp.square(g[q].astype(jnp.float32))) for q in wrt])
        fin = jnp.stack([jnp.all(jnp.isfinite(g[q])) for q in wrt])
        return vals, fin

      vals, fin = _map_probes(one, probes_per_step)
      return (weight / logits.shape[0]) * vals, jnp.all(fin, axis=0), jnp.all(jnp.isfinite(lg))
    return step

  return cached_jit("output_step", pb, sig, build)


def _raise_nonfinite(pb: Problem, fins, oks, what: str):
  fins, oks = np.asarray(fins), np.asarray(oks)
  bad_b = [b for b in range(len(oks)) if not oks[b]]
  bad = sorted({pb.wrt[i] for b in range(fins.shape[0]) for i in range(fins.shape[1])
                if not fins[b, i]}, key=pb.wrt.index)
  if bad_b or bad:
    raise NonFiniteError(
        f"non-finite logits on batch(es) {bad_b} and/or non-finite {what} in layer(s) {bad} "
        "(check the checkpoint and inputs; BatchNorm statistics must be finite)")


class _OutputSampler(_Sampler):
  """'ggn' / 'fisher': one VJP per probe gives a sample for every layer."""
  unit = "vjps"

  def __init__(self, pb: Problem, key, curvature: str, output_loss: str, probes_per_step: int):
    super().__init__()
    self.pb, self.key, self.P = pb, key, probes_per_step
    self.step = _output_step(pb, curvature, output_loss, probes_per_step)
    self.what = "GGN probe gradient" if curvature == "ggn" else "Fisher probe gradient"

  def round(self, active, count):
    pb = self.pb
    j0 = pb.replicate(np.int32(count.max()))  # every layer shares the probe index
    total, fins, oks = None, [], []
    for b, (batch, weight) in enumerate(zip(pb.batches, pb.weights)):
      vals, fin, ok = self._batch(b, batch, weight, j0)
      total = vals if total is None else total + vals
      fins.append(fin)
      oks.append(ok)
    vals, fins, oks = _sharding.to_host((total, fins, oks))
    self.cost += self.P
    _raise_nonfinite(pb, fins, oks, self.what)
    return {i: np.asarray(vals[:, i], np.float64) for i in np.flatnonzero(active)}

  def _batch(self, b, batch, weight, j0):
    pb = self.pb
    return self.step(pb.params, pb.w, batch, weight, self.key, pb.replicate(np.int32(b)), j0)


class _HookedOutputSampler(_OutputSampler):
  """'ggn' / 'fisher' through layer hooks: each probe's sample is the mean over examples of
  PER-EXAMPLE squared gradient norms, ``(1/N) sum_n ||J_{n,l}^T c_n||^2`` (``c_n`` the
  example's cotangent). Unbiased like the summed probe (``E[c c^T] = H_n``) but without its
  cross-example terms ``c_n^T J_n J_m^T c_m``, which add variance and nothing else."""
  unit = "vjps"

  def __init__(self, pb: Problem, key, curvature: str, output_loss: str, probes_per_step: int,
               model, input_fn, layers, input_key=None):
    _Sampler.__init__(self)
    self.pb, self.key, self.P, self.layers = pb, key, probes_per_step, layers
    self.state = pb.replicate(model.state)
    self.checks = {c: pb.replicate(np.bool_(c)) for c in (False, True)}
    self.what = "GGN probe gradient" if curvature == "ggn" else "Fisher probe gradient"
    names = [l.name for l in layers]
    f = _pex.tapped_forward(model, input_fn)
    axes = tuple(pb.mesh.axis_names)
    P_ = probes_per_step

    def local(params, w, state, batch, key, b, j0, check):
      logits, vjp, xy = _hooked_vjp(model, input_fn, names, f, params, w, state, batch)
      lg = logits.astype(jnp.float32)
      # Example i of the global batch draws from fold_in(key_{probe, batch}, i): the same
      # probes for any device count.
      n = lg.shape[0]
      idx = jax.lax.axis_index(axes) * n + jnp.arange(n)

      def probe(p):
        kb = jax.random.fold_in(jax.random.fold_in(key, j0 + p), b)
        return jax.vmap(lambda i, l: _cotangent(curvature, output_loss, l[None],
                                                jax.random.fold_in(kb, i))[0])(idx, lg)
      cots = jnp.stack([probe(p) for p in range(P_)])
      (g,) = jax.vmap(vjp)(cots.astype(logits.dtype))
      vals = jnp.stack([_pex.sq_norms(l.op, xy[l.name][0], g[l.name]) for l in layers], 1)
      fin = jnp.all(jnp.isfinite(vals), axis=0)
      fit = _misfits(layers, xy, w, check)
      return (jax.lax.psum(vals, axes), jax.lax.pmin(fin.astype(jnp.int32), axes),
              jax.lax.pmin(jnp.all(jnp.isfinite(lg)).astype(jnp.int32), axes),
              jax.lax.pmax(fit, axes))

    sharded = jax.shard_map(local, mesh=pb.mesh,
                            in_specs=(P(), P(), P(), P(axes), P(), P(), P(), P()),
                            out_specs=(P(), P(), P(), P()), check_vma=False)

    def build():
      def step(params, w, state, batch, weight, key, b, j0, check):
        vals, fin, ok, fit = sharded(params, w, state, batch, key, b, j0, check)
        return (weight / _sharding.batch_size(batch)) * vals, fin > 0, ok > 0, fit
      return step

    sig = (tuple(pb.wrt), tuple(pb.shapes[p] for p in pb.wrt), curvature, output_loss,
           probes_per_step, id(model), input_key)
    self.step = cached_jit("output_step_hooked", pb, sig, build)
    self.checked = False

  def _batch(self, b, batch, weight, j0):
    pb, first = self.pb, not self.checked and b == 0
    vals, fin, ok, fit = self.step(pb.params, pb.w, self.state, batch, weight, self.key,
                                   pb.replicate(np.int32(b)), j0, self.checks[first])
    if first:  # the first batch vouches for the hooks (one host sync)
      why = _misfit_message(self.layers, fit)
      if why:
        raise _HookMisfit(why)
      self.checked = True
    return vals, fin, ok


class _HookMisfit(Exception):
  """The first batch showed that the layer hooks cannot be trusted (internal)."""


def _check_loss(loss_fn, logits_fn, pb: Problem, output_loss: str) -> None:
  """The GGN belongs to ``output_loss``; ``loss_fn`` (if given) must be that loss."""
  f = jax.jit(lambda p, b: (loss_fn(p, b), output_loss_value(logits_fn(p, b), b, output_loss)))
  a, b = (float(x) for x in _sharding.to_host(f(pb.params, pb.batches[0])))
  if not (math.isfinite(a) and math.isfinite(b)):
    raise NonFiniteError(f"non-finite loss on batch 0: loss_fn gives {a}, "
                         f"output_loss={output_loss!r} on logits_fn gives {b}")
  if not np.isclose(a, b, rtol=1e-3, atol=1e-6):
    raise ConfigError(
        f"loss_fn gives {a:.6g} on batch 0 but output_loss={output_loss!r} applied to "
        f"logits_fn gives {b:.6g}: the GGN/Fisher would belong to another loss. Pass the "
        "matching output_loss ('xent': softmax cross-entropy on batch['label'], 'mse': "
        "mean squared error), or loss_fn=None to skip this check")


def sampler(loss_fn, logits_fn: LogitsFn | None, params, batches, *, key, wrt, curvature: str,
            output_loss: str, probes_per_step: int, mesh, model=None, model_input=None):
  """``(problem, sampler)`` for :func:`amq_jax.hessian.layer_traces`' GGN/Fisher path: per
  example through ``model``'s layer hooks where they serve, else the summed probe."""
  if logits_fn is None:
    raise ValueError(f"curvature={curvature!r} needs logits_fn(params, batch) -> [N, C] "
                     "(hessian.linen_logits_fn(model, variables) for Linen classifiers)")
  if output_loss not in OUTPUT_LOSSES:
    raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {output_loss!r}")
  pb = Problem(logits_fn, params, batches, wrt=wrt, mesh=mesh)
  if loss_fn is not None:
    _check_loss(loss_fn, logits_fn, pb, output_loss)
  if model is not None:
    input_fn = model_input or (lambda b: b["image"])
    layers, why = _tapped_layers(pb, model, input_fn)
    if layers:
      return pb, _HookedOutputSampler(pb, pb.replicate(key), curvature, output_loss,
                                      probes_per_step, model, input_fn, layers, model_input)
    warnings.warn(f"{curvature} traces: summed output-space probes, not per-example ones "
                  f"through the layer hooks: {why}", stacklevel=3)
  return pb, _OutputSampler(pb, pb.replicate(key), curvature, output_loss, probes_per_step)


def _vmap_runner(pb: Problem, output_loss: str):
  """``local(params, w, state, batch, check) -> ([L] sums, [L] zeros)``: per-example backward
  passes (vmap over examples)."""
  logits_fn, wrt_ = pb.loss_fn, list(pb.wrt)

  def per_example(params, w, ex):
    exb = jax.tree_util.tree_map(lambda a: a[None], ex)
    logits, vjp = jax.vjp(lambda w_: logits_fn(_paths.merge(params, w_), exb)[0], w)
    S = _factor_columns(logits.astype(jnp.float32), output_loss).astype(logits.dtype)

    def col(c):
      (g,) = vjp(S[:, c])
      return jnp.stack([jnp.sum(jnp.square(g[q].astype(jnp.float32))) for q in wrt_])

    return jnp.sum(_map_probes(col, S.shape[1]), axis=0)

  def local(params, w, state, batch, check):
    del state, check
    vals = jax.vmap(per_example, in_axes=(None, None, 0))(params, w, batch)  # [n, L]
    return jnp.sum(vals, axis=0), jnp.zeros(len(wrt_), jnp.float32)
  return local


def _tapped_runner(pb: Problem, output_loss: str, model, input_fn, layers):
  """``local(params, w, state, batch, check) -> ([L] sums, [L] misfits)``: one forward pass records
  every layer's input and output, one VJP per factor column gives every layer's output
  gradient, and per-example gradient norms are matrix products of the two
  (:mod:`amq_jax.hessian._pex`). The misfits check that the hooks saw each operation's own
  input and output (:func:`amq_jax.hessian._pex.misfit`)."""
  names = [l.name for l in layers]
  f = _pex.tapped_forward(model, input_fn)

  def local(params, w, state, batch, check):
    logits, vjp, xy = _hooked_vjp(model, input_fn, names, f, params, w, state, batch)
    S = jax.vmap(_factor_columns, in_axes=(0, None))(logits.astype(jnp.float32),
                                                     output_loss)  # [n, C, K]
    cots = jnp.moveaxis(S, 2, 0).astype(logits.dtype)  # [K, n, C]
    # Output gradients of every layer for `chunk` columns at a time (one vmapped backward
    # pass each): as many as fit in HOOKED_BYTES.
    per_col = 4 * sum(math.prod(xy[n][1].shape) for n in names)
    chunk = int(min(cots.shape[0], max(1, HOOKED_BYTES // max(per_col, 1))))
    vals = 0.0
    for c0 in range(0, cots.shape[0], chunk):
      (g,) = jax.vmap(vjp)(cots[c0:c0 + chunk])
      vals = vals + jnp.stack([_pex.sum_sq_norms(l.op, xy[l.name][0], g[l.name])
                               for l in layers])
    return vals, _misfits(layers, xy, w, check)
  return local


def _hooked_vjp(model, input_fn, names, f, params, w, state, batch):
  """``(logits, vjp, {name: (input, output)})``: the hooked forward pass with a zero
  perturbation on each named layer's output, linearized in those perturbations."""
  full = _paths.merge(params, w)
  _, outs = _pex.io_shapes(model, input_fn, full, state, batch, names)
  eps = {n: jnp.zeros(o.shape, o.dtype) for n, o in outs.items()}
  return jax.vjp(lambda e: f(full, state, batch, e), eps, has_aux=True)


def _misfits(layers, xy, w, check):
  """``[L]`` :func:`amq_jax.hessian._pex.misfit` per layer when ``check`` (a traced bool),
  zeros otherwise: one more forward's worth of products, on the first batch only."""
  return jax.lax.cond(
      check, lambda: jnp.stack([_pex.misfit(l.op, xy[l.name][0], w[l.param], xy[l.name][1])
                                for l in layers]),
      lambda: jnp.zeros(len(layers), jnp.float32))


def _misfit_message(layers, fit) -> str | None:
  """What the first batch's misfits say against the hooks (None: they can be trusted)."""
  fit = np.asarray(_sharding.to_host(fit), np.float64)
  bad = [l.name for l, m in zip(layers, fit) if not m <= MISFIT_TOL]
  if not bad:
    return None
  return (f"in layer(s) {bad} the hooked output is not the weight's operation on the hooked "
          "input plus a bias (the module transforms its input or output around it; relative "
          f"misfit {float(np.max(fit)):.2g})")


def _tapped_layers(pb: Problem, model, input_fn) -> tuple[list, str | None]:
  """The layers of ``pb.wrt`` in ``model``'s table, or ``([], why not)``."""
  if getattr(model, "act_apply", None) is None:
    return [], f"the {getattr(model, 'framework', '?')!r} adapter has no layer hooks"
  by_param = model.layers.by_param()
  missing = [p for p in pb.wrt if p not in by_param]
  if missing:
    return [], f"{missing} are not layers of the model's table"
  layers = [by_param[p] for p in pb.wrt]
  for l in layers:
    why = _pex.unsupported(l)
    if why:
      return [], why
  ins, outs = _pex.io_shapes(model, input_fn, pb.params, model.state, pb.batches[0],
                             [l.name for l in layers])
  for l in layers:
    if l.name not in ins or l.name not in outs:
      return [], f"layer {l.name!r} was not called through its hook"
    if tuple(ins[l.name][1:]) != tuple(l.in_shape) or (
        l.out_shape and tuple(outs[l.name].shape[1:]) != tuple(l.out_shape)):
      return [], (f"layer {l.name!r}: the hooked input/output {ins[l.name]} / "
                  f"{outs[l.name].shape} are not what its operation reads and writes "
                  f"({l.in_shape} / {l.out_shape}): the module transforms them")
  return layers, None


MISFIT_TOL = 1e-3
HOOKED_BYTES = 1 << 30  # output gradients held at once by the hooked exact GGN, per device


def _run_exact(pb: Problem, output_loss: str, progress: bool, model=None, input_fn=None,
               layers=(), input_key=None):
  """``(summed traces [L] on device, None)``; with ``layers`` (the hooked way) ``(None, why)``
  as soon as a batch shows a misfit."""
  tapped = bool(layers)
  sig = (tuple(pb.wrt), tuple(pb.shapes[p] for p in pb.wrt),
         tuple(str(pb.dtypes[p]) for p in pb.wrt), output_loss,
         (id(model), input_key) if tapped else None)

  def build():
    local = (_tapped_runner(pb, output_loss, model, input_fn, layers) if tapped
             else _vmap_runner(pb, output_loss))
    # Each device sums the squared norms of ITS examples, then one psum. Left to GSPMD, the
    # vmapped per-example convolution gradients (batch-grouped convolutions) come out wrong
    # when the batch is sharded (XLA:CPU, jax 0.10: conv traces off by 5-8% on 2 devices);
    # under shard_map nothing per-example is partitioned.
    axes = tuple(pb.mesh.axis_names)

    def reduced(*a):
      vals, fit = local(*a)
      return jax.lax.psum(vals, axes), jax.lax.pmax(fit, axes)
    summed = jax.shard_map(reduced, mesh=pb.mesh, in_specs=(P(), P(), P(), P(axes), P()),
                           out_specs=(P(), P()), check_vma=False)

    def run(params, w, state, batch, weight, check):
      n = _sharding.batch_size(batch)  # the global batch (static shape)
      vals, fit = summed(params, w, state, batch, check)
      return (weight / n) * vals, fit
    return run

  fn = cached_jit("ggn_exact", pb, sig, build)
  state = pb.replicate(model.state if tapped else {})
  checks = {c: pb.replicate(np.bool_(c)) for c in (False, True)}
  bar = _progress.bar(progress, total=len(pb.batches), desc="exact GGN traces", unit="batch")
  total = None
  try:
    for b, (batch, weight) in enumerate(zip(pb.batches, pb.weights)):
      v, fit = fn(pb.params, pb.w, state, batch, weight, checks[b == 0])
      if tapped and b == 0:  # the first batch vouches for the hooks (one host sync)
        why = _misfit_message(layers, fit)
        if why:
          return None, why
      total = v if total is None else total + v
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  return total, None


def exact_ggn_traces(logits_fn: LogitsFn, params: Any, batches: Any, *,
                     wrt: Sequence[str] | None = None, output_loss: str = "xent", mesh=None,
                     progress: bool = False, model=None,
                     model_input: Callable[[Any], Any] | None = None
                     ) -> dict[str, TraceEstimate]:
  """Exact ``Tr(G_l)`` per layer: one per-example backward pass per factor column
  (``C - 1`` for softmax cross-entropy, ``C`` for MSE; module docstring).

  Two ways to the same numbers. With ``model`` (an :class:`amq_jax.adapters.Model` with
  layer hooks: Linen, NNX), each layer's per-example gradients are matrix products of its
  input patches and output gradients, all examples and columns at once. On the first batch
  each hooked output must be the layer's own operation on the hooked input plus a bias
  (relative misfit <= ``MISFIT_TOL``); a layer the hooks cannot serve, or a misfit, falls
  back with a warning to the generic way: ``vmap`` over examples of the backward pass of
  ``logits_fn``.

  Memory: the generic way holds one per-example gradient per example of a batch
  (``batch_size x num_params`` floats); the hooked way ``C`` output gradients of every layer
  and every layer's input patches. Use small batches for large models.

  Args:
    logits_fn: ``logits_fn(params, batch) -> [N, C]``; examples must not interact
      (inference mode).
    params, batches, wrt, mesh: as in :func:`amq_jax.hessian.make_hvp`.
    output_loss: ``'xent'`` or ``'mse'`` (the factor ``S`` of the module docstring).
    progress: a bar over batches.
    model: optional adapted model whose ``apply(params, model.state, model_input(batch))``
      gives ``logits_fn(params, batch)``.
    model_input: ``batch -> model input`` (default ``batch['image']``).

  Returns:
    ``{path: TraceEstimate}`` with ``stderr = 0``, ``probes = 1`` (one exact evaluation),
    status ``'converged'`` (``'near_zero'`` for an exactly zero block).
  """
  if output_loss not in OUTPUT_LOSSES:
    raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {output_loss!r}")
  pb = Problem(logits_fn, params, batches, wrt=wrt, mesh=mesh)
  input_fn = model_input or (lambda b: b["image"])
  layers, why = ([], None) if model is None else _tapped_layers(pb, model, input_fn)
  total = None
  if layers:
    total, why = _run_exact(pb, output_loss, progress, model, input_fn, layers, model_input)
  if why:
    warnings.warn(f"exact GGN: per-example gradients by vmap, not through the layer hooks: "
                  f"{why}", stacklevel=2)
  if total is None:
    total, _ = _run_exact(pb, output_loss, progress)
  total = np.asarray(_sharding.to_host(total), np.float64)
  if not np.all(np.isfinite(total)):
    bad = [p for p, t in zip(pb.wrt, total) if not np.isfinite(t)]
    raise NonFiniteError(f"non-finite exact GGN trace in layer(s) {bad}")
  out = {}
  for i, p in enumerate(pb.wrt):
    t, n = float(total[i]), pb.num_params[p]
    out[p] = TraceEstimate(t, 0.0, 1, n, t / n, np.array([t]), True,
                           _stats.classify(t, 0.0, 1, met=True))
  return out
