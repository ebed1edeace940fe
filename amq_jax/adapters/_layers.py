"""Layers as data: one description of a model's quantizable layers, traced once.

A model's quantizable layers are the convolutions and matrix products whose weight operand
is a parameter leaf. :func:`trace_layers` finds them in the model's jaxpr, for any
framework: it traces ``apply(params, x)`` abstractly (no FLOPs) and walks the equations in
program order, following each parameter leaf through dtype casts, transposes and nested
calls until it meets ``conv_general_dilated`` or ``dot_general``. What the equation says is
what the quantizer, the cost model and the search need:

* the execution order (the order of the equations; never alphabetical),
* the output-channel axis of the parameter (``rhs_spec[0]`` of a convolution, the free
  axis of a matrix product: ``-1`` for Linen ``[in, out]``, ``0`` for Equinox ``[out, in]``),
* MACs per example (a transposed convolution counts only real products, not the zeros
  inserted by ``lhs_dilation``), the input-activation shape and size per example,
* which layers read the same tensor (``input_id``), so that they can be tied.

The table is plain data (NamedTuples); everything downstream reads it and nothing re-walks
the model.

>>> layers = trace_layers(lambda p, x: model.apply({'params': p}, x), params, sample)
>>> layers.names           # execution order
>>> layers['stem'].channel_axis, layers['stem'].macs
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from amq_jax import _paths
from amq_jax.errors import LayerError

__all__ = ["Layer", "Layers", "trace_layers", "layer_name"]

# Leaf names that are "the weight of the layer" and are dropped from the layer's name:
# 'stage1/conv1/kernel' -> 'stage1/conv1' (Linen, NNX), 'layers/0/weight' -> 'layers/0'
# (Equinox). Any other leaf keeps its full path as its name ({'w1': ...} -> 'w1').
WEIGHT_LEAF_NAMES = ("kernel", "weight", "w")

# Equations that pass a tensor through unchanged in layout.
_SAME = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier"}


class Layer(NamedTuple):
  """One quantizable layer.

  name: the layer's address in bit configurations ('stage1_block1/conv1').
  param: '/'-joined path of its weight leaf in the params tree.
  kind: 'conv', 'conv_transpose' or 'dense'.
  index: position in execution order (0 = first layer the input meets).
  channel_axis: output-channel axis of the weight leaf (>= 0); one scale per channel.
  shape: the weight's shape; params: its element count n_l.
  macs: multiply-accumulates per example, summed over calls.
  in_shape: shape of the layer's input activation per example (first call); in_size: its
    element count (the activation-memory cost unit).
  input_id: layers with equal ids read the same tensor. calls: times the layer runs.
  out_shape: the output's shape per example (first call).
  op: the operation's geometry as plain data, what a per-example weight gradient needs:
    ``('conv', filter_shape, strides, padding, lhs_dilation, rhs_dilation, lhs_spec,
    rhs_spec, out_spec, feature_groups, batch_groups, perm)`` (spatial sizes of the filter,
    then ``lax.conv_general_dilated``'s arguments, specs as in its ``ConvDimensionNumbers``)
    or ``('dense', weight_operand, x_contract, x_batch, w_contract, perm)``
    (``lax.dot_general``: which operand is the weight, 0 or 1, the activation's contracting
    and batch axes, the weight's contracting axes); ``perm``: the operand is
    ``transpose(weight, perm)``; ``()`` if unknown.
  """
  name: str
  param: str
  kind: str
  index: int
  channel_axis: int
  shape: tuple
  params: int
  macs: int
  in_shape: tuple
  in_size: int
  input_id: int
  calls: int = 1
  out_shape: tuple = ()
  op: tuple = ()

  @property
  def channels(self) -> int:
    return int(self.shape[self.channel_axis])


class Layers(Mapping):
  """An ordered, read-only ``{name: Layer}`` table (execution order)."""

  def __init__(self, layers: Sequence[Layer]):
    self._list = list(layers)
    self._by = {l.name: l for l in self._list}
    if len(self._by) != len(self._list):
      dup = sorted({l.name for l in self._list if sum(m.name == l.name for m in self._list) > 1})
      raise LayerError(f"two quantizable layers share the name(s) {dup}")

  def __getitem__(self, name: str) -> Layer:
    try:
      return self._by[_paths_norm(name, self._by)]
    except KeyError:
      raise LayerError(f"unknown layer {name!r}; the model's layers are {self.names}") from None

  def __iter__(self) -> Iterator[str]:
    return iter(l.name for l in self._list)

  def __len__(self) -> int:
    return len(self._list)

  def __repr__(self) -> str:
    kinds = {}
    for l in self._list:
      kinds[l.kind] = kinds.get(l.kind, 0) + 1
    body = ", ".join(f"{v} {k}" for k, v in kinds.items())
    first = self._list[0].name if self._list else "-"
    last = self._list[-1].name if self._list else "-"
    return (f"Layers({len(self)} layers: {body}; {sum(l.params for l in self._list):,} weights;"
            f" first {first!r}, last {last!r})")

  @property
  def names(self) -> list[str]:
    return [l.name for l in self._list]

  @property
  def params_paths(self) -> list[str]:
    return [l.param for l in self._list]

  def counts(self) -> np.ndarray:
    return np.array([l.params for l in self._list], np.float64)

  def macs(self) -> np.ndarray:
    return np.array([l.macs for l in self._list], np.float64)

  def in_sizes(self) -> np.ndarray:
    return np.array([l.in_size for l in self._list], np.float64)

  def by_param(self) -> dict[str, Layer]:
    return {l.param: l for l in self._list}

  def shared_inputs(self) -> list[list[str]]:
    """Groups (>= 2 layers) that read the same tensor, in execution order."""
    groups: dict[int, list[str]] = {}
    for l in self._list:
      groups.setdefault(l.input_id, []).append(l.name)
    return [g for g in groups.values() if len(g) > 1]

  def select(self, names: Sequence[str]) -> "Layers":
    keep = {self[n].name for n in names}
    return Layers([l for l in self._list if l.name in keep])

  def to_json(self) -> list[dict]:
    return [dict(l._asdict(), shape=list(l.shape), in_shape=list(l.in_shape),
                 out_shape=list(l.out_shape)) for l in self._list]

  @classmethod
  def from_json(cls, rows: Sequence[Mapping]) -> "Layers":
    return cls([Layer(**dict(r, shape=tuple(r["shape"]), in_shape=tuple(r["in_shape"]),
                             out_shape=tuple(r.get("out_shape", ())),
                             op=_tuples(r.get("op", ()))))
                for r in rows])


def _tuples(x):
  """JSON lists back to the nested tuples of :attr:`Layer.op`."""
  return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _paths_norm(name: str, known: Mapping[str, Any]) -> str:
  """Accepts a layer name or its weight path ('conv1/kernel' -> 'conv1')."""
  name = str(name).strip("/")
  if name in known:
    return name
  return layer_name(name)


def layer_name(param_path: str) -> str:
  """The layer name of a weight path: drops a trailing 'kernel'/'weight'/'w' component."""
  head, _, leaf = param_path.rpartition("/")
  return head if head and leaf in WEIGHT_LEAF_NAMES else param_path


# ---------------------------------------------------------------------------------------
def _is_var(v) -> bool:
  return hasattr(v, "aval") and not hasattr(v, "val")


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # ClosedJaxpr
      yield v.jaxpr
    elif hasattr(v, "eqns") and hasattr(v, "invars"):  # Jaxpr
      yield v


class _Rec:
  def __init__(self):
    self.order: list[str] = []
    self.info: dict[str, dict] = {}


def _walk(jaxpr, params_of: dict, act_of: dict, rec: _Rec, batch: int, next_id: list):
  """params_of: var -> (param path, axis map used-axis -> param-axis); act_of: var -> id."""

  def act_id(v):
    if not _is_var(v):
      return -1
    if v not in act_of:
      act_of[v] = next_id[0]
      next_id[0] += 1
    return act_of[v]

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = list(eqn.invars)
    if name in ("conv_general_dilated", "dot_general") and len(ins) >= 2:
      owned = [i for i in (0, 1) if _is_var(ins[i]) and ins[i] in params_of]
      if len(owned) == 1:
        k = owned[0]
        _record(eqn, k, params_of[ins[k]], ins[1 - k], act_id(ins[1 - k]), rec, batch)
    elif name in _SAME and ins and _is_var(ins[0]):
      if ins[0] in params_of:
        params_of[eqn.outvars[0]] = params_of[ins[0]]
      act_of[eqn.outvars[0]] = act_id(ins[0])
    elif name == "transpose" and _is_var(ins[0]) and ins[0] in params_of:
      path, amap = params_of[ins[0]]
      perm = eqn.params["permutation"]
      params_of[eqn.outvars[0]] = (path, tuple(amap[p] for p in perm))
    else:
      for sub in _sub_jaxprs(eqn):
        # Calls (pjit, remat, custom_jvp/vjp): the callee's inputs are the call's trailing
        # operands (leading ones may be consts); map them by position from the end.
        n = len(sub.invars)
        if n > len(ins):
          continue
        outer = ins[len(ins) - n:]
        for o, s in zip(outer, sub.invars):
          if _is_var(o):
            if o in params_of:
              params_of[s] = params_of[o]
            act_of[s] = act_id(o)
        _walk(sub, params_of, act_of, rec, batch, next_id)
        if len(sub.outvars) == len(eqn.outvars):
          for so, o in zip(sub.outvars, eqn.outvars):
            if _is_var(so) and so in act_of:
              act_of[o] = act_of[so]


def _record(eqn, k: int, owner, x, input_id: int, rec: _Rec, batch: int):
  path, amap = owner
  w_aval = eqn.invars[k].aval
  x_shape = tuple(x.aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  K = int(np.prod(w_aval.shape))
  if eqn.primitive.name == "conv_general_dilated":
    if k != 1:
      return
    dn = eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    used_axis = rhs_spec[0]
    n = x_shape[lhs_spec[0]]
    dil = eqn.params.get("lhs_dilation") or ()
    if any(d > 1 for d in dil):
      kind = "conv_transpose"
      # Each input element meets every weight of its input channel once; the zeros that
      # lhs_dilation inserts cost nothing.
      macs = int(np.prod(x_shape)) // n * K // int(w_aval.shape[rhs_spec[1]])
    else:
      kind = "conv"
      macs = int(np.prod(out_shape)) // n * K // int(w_aval.shape[used_axis])
    in_shape = tuple(s for i, s in enumerate(x_shape) if i != lhs_spec[0])
    out_ex = tuple(s for i, s in enumerate(out_shape) if i != out_spec[0])
    ep = eqn.params
    nsp = len(lhs_spec) - 2
    op = ("conv", tuple(int(w_aval.shape[i]) for i in rhs_spec[2:]),
          tuple(int(v) for v in ep["window_strides"]),
          tuple((int(a), int(b)) for a, b in ep["padding"]),
          tuple(int(v) for v in (ep.get("lhs_dilation") or (1,) * nsp)),
          tuple(int(v) for v in (ep.get("rhs_dilation") or (1,) * nsp)),
          tuple(int(v) for v in lhs_spec), tuple(int(v) for v in rhs_spec),
          tuple(int(v) for v in out_spec), int(ep.get("feature_group_count", 1)),
          int(ep.get("batch_group_count", 1)), tuple(int(a) for a in amap))
  else:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_contract, w_batch = (rc, rb) if k == 1 else (lc, lb)
    x_contract, x_batch = (lc, lb) if k == 1 else (rc, rb)
    free = [i for i in range(len(w_aval.shape)) if i not in w_contract and i not in w_batch]
    if not free or w_batch:
      return
    used_axis = free[-1]
    kind = "dense"
    csize = int(np.prod([w_aval.shape[i] for i in w_contract]))
    x_free = [x_shape[i] for i in range(len(x_shape)) if i not in x_contract and i not in x_batch]
    n = x_free[0] if x_free else 1
    if n != batch:
      n = batch if int(np.prod(out_shape)) % batch == 0 else n
    macs = int(np.prod(out_shape)) * csize // max(n, 1)
    in_shape = tuple(x_shape[1:]) if x_shape and x_shape[0] == n else tuple(x_shape)
    out_ex = tuple(out_shape[1:]) if out_shape and out_shape[0] == n else tuple(out_shape)
    op = ("dense", int(k), tuple(int(v) for v in x_contract), tuple(int(v) for v in x_batch),
          tuple(int(v) for v in w_contract), tuple(int(a) for a in amap))
  axis = int(amap[used_axis])
  if path in rec.info:
    r = rec.info[path]
    r["macs"] += macs
    r["calls"] += 1
    return
  rec.order.append(path)
  rec.info[path] = dict(kind=kind, axis=axis, shape=tuple(w_aval.shape), macs=macs,
                        in_shape=in_shape, input_id=input_id, calls=1, out_shape=out_ex, op=op)


def trace_layers(apply: Callable[[Any, Any], Any], params: Any, sample: Any, *,
                 names: Mapping[str, str] | Callable[[str], str] | None = None,
                 include: Sequence[str] | None = None) -> Layers:
  """The quantizable layers of ``apply(params, sample)``, in execution order.

  Args:
    apply: ``apply(params, x) -> output``; any framework (a Linen ``model.apply`` wrapped,
      ``nnx.merge(graphdef, params, rest)(x)``, an Equinox model combined with its
      parameters, plain JAX).
    params: the trainable pytree (its leaves' paths become the layers' ``param``).
    sample: an input batch (arrays or ``jax.ShapeDtypeStruct``); its leading axis is the
      batch of examples that MACs and activation sizes are divided by.
    names: optional ``{param path: layer name}`` or a function of the param path
      (default: :func:`layer_name`).
    include: keep only these layers (names or param paths); unknown ones are an error.

  Raises:
    LayerError: no convolution or matrix product of the model reads a parameter.
  """
  flat = _paths.flatten(params)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = list(flat)
  batch = int(jax.tree_util.tree_leaves(sample)[0].shape[0])
  closed = jax.make_jaxpr(lambda p, x: apply(p, x))(params, sample)
  jaxpr = closed.jaxpr
  n_params = len(leaves)
  params_of = {}
  for path, v, var in zip(keys, leaves, jaxpr.invars[:n_params]):
    if getattr(v, "ndim", 0) >= 2:
      params_of[var] = (path, tuple(range(v.ndim)))
  rec = _Rec()
  _walk(jaxpr, params_of, {}, rec, batch, [0])
  if not rec.order:
    raise LayerError("no convolution or matrix product of the model reads a parameter "
                     "with >= 2 dimensions, so there is nothing to quantize; check that "
                     "apply(params, x) uses `params` (not weights closed over)")
  namer = (names if callable(names) else
           (lambda p, m=dict(names or {}): m.get(p, layer_name(p))))
  out = []
  for i, path in enumerate(rec.order):
    r = rec.info[path]
    shape = tuple(np.shape(flat[path]))
    in_shape = r["in_shape"]
    out.append(Layer(name=namer(path), param=path, kind=r["kind"], index=i,
                     channel_axis=r["axis"] % len(shape), shape=shape,
                     params=int(math.prod(shape)), macs=int(r["macs"]), in_shape=in_shape,
                     in_size=int(math.prod(in_shape)), input_id=r["input_id"],
                     calls=r["calls"], out_shape=r["out_shape"], op=r["op"]))
  layers = Layers(out)
  if include is not None:
    layers = layers.select(include)
  return layers
