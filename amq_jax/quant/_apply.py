"""Applying a bit configuration to a model of any framework, without editing the model.

The model comes as an :class:`amq_jax.adapters.Model` (Linen, NNX, Equinox, plain JAX);
its layer table says, for each quantizable layer, which params leaf is its weight and on
which axis its output channels lie. Everything here reads that table:

* Weights: each configured layer's weight leaf is replaced in the params tree by
  ``fake_quant(w, w_bits, axis=channel_axis)`` (one scale per output channel) before the
  model runs. A layer called twice sees one quantized weight, and the straight-through
  gradient flows back to the float weight through the tree (QAT).
* Activations: the model's ``act_apply`` passes each configured layer's input through a
  hook; the hook applies ``fake_quant_act(x, a_bits, lo, hi)`` with the layer's calibrated
  range. Adapters without hooks (Equinox, plain JAX) quantize weights only, and asking for
  'a' widths there is a clear error.
* ``grid='qwix'``: the numerics a model deployed with qwix runs (``amq_jax.quant._interop``):
  weights on qwix's integer grid (``fake_quant(..., grid='qwix')``), and each configured
  input quantized as qwix does it, dynamically, one symmetric absmax scale per example
  (``fake_quant(x, a_bits, axis=0, grid='qwix')``): no calibrated ranges are needed. Widths
  must be 2..8 (qwix's int2..int8).

Activation ranges are a plain JSON-able dict ``{layer: [lo, hi]}`` (floats), made by
:func:`calibrate_model` and passed as ``act_ranges=``.

The Linen functions (:func:`make_quantized_apply`, :func:`quantized_apply`,
:func:`calibrate`) take a module and its variables, build the Model with
:func:`amq_jax.adapters.from_linen` and call the same code.

>>> m = adapters.from_nnx(cnn, images[:2])
>>> ranges = quant.calibrate_model(m, [images], {'conv1': {'w': 4, 'a': 8}, 'fc': 4})
>>> apply = quant.quantize_model(m, {'conv1': {'w': 4, 'a': 8}, 'fc': 4}, act_ranges=ranges)
>>> logits, new_state = apply(m.params, m.state, images, train=False)
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from amq_jax import _paths
from amq_jax.errors import BitsError, LayerError
from amq_jax.quant._config import BitConfig, as_bit_config, normalize_path, validate
from amq_jax.quant._math import _check_grid, fake_quant, fake_quant_act

__all__ = ["quantize_params", "quantize_model", "calibrate_model", "quantized_apply",
           "make_quantized_apply", "calibrate", "quantizable_layers", "check_config"]


def quantizable_layers(params) -> list[str]:
  """Layer paths of every leaf named 'kernel' (ndim >= 2) of a params tree, in TREE order.

  A quick look at Linen/NNX params without running the model; for the execution order and
  any framework, use ``adapters.trace_layers`` (``model.layers.names``).
  """
  return [_paths.layer_of(p) for p in _paths.quantizable_paths(params)]


def check_config(config, layers) -> BitConfig:
  """``config`` as a :class:`BitConfig` keyed by layer names, checked against ``layers``.

  Args:
    config: ``BitConfig`` or mapping ``{layer name or weight path: bits | {'w', 'a'}}``.
    layers: an ``adapters.Layers`` table (keys may then be names or weight paths, e.g.
      ``'fc/weight'``) or a list of layer names.

  Raises:
    BitsError: unknown layers or widths outside 1..16; the message lists the valid layers
      (in execution order when ``layers`` is a table).
  """
  try:
    cfg = as_bit_config(config)
  except ValueError as e:
    raise BitsError(f"invalid bit configuration: {e}") from None
  names = list(layers)
  if hasattr(layers, "by_param"):  # a Layers table: accept weight paths as keys too
    by = {}
    for k in cfg.layers:
      try:
        by[layers[k].name] = cfg[k]
      except LayerError:
        by[k] = cfg[k]  # left unknown, reported below
    cfg = BitConfig(by)
  try:
    return validate(cfg, names)
  except ValueError as e:
    raise BitsError(str(e)) from None


def _weight_targets(params, config, layers, symmetric, scale_method) -> dict[str, tuple]:
  """``{weight path: (bits, channel axis)}`` of the configured layers with a 'w' width."""
  if layers is None:
    cfg = check_config(config, quantizable_layers(params))
    return {l + "/kernel": (cfg[l]["w"], -1) for l in cfg.layers if cfg[l]["w"] is not None}
  cfg = check_config(config, layers)
  return {layers[l].param: (cfg[l]["w"], layers[l].channel_axis)
          for l in cfg.layers if cfg[l]["w"] is not None}


def _fake_quant_weights(params, targets, symmetric, scale_method, grid="amq"):
  if not targets:
    return params
  ws = _paths.select(params, list(targets))
  return _paths.merge(params, {
      p: fake_quant(ws[p], b, symmetric=symmetric, axis=axis, scale_method=scale_method,
                    grid=grid)
      for p, (b, axis) in targets.items()})


def _widths(cfg: BitConfig) -> list[tuple[str, str, int]]:
  return [(l, k, cfg[l][k]) for l in cfg.layers for k in ("w", "a") if cfg[l][k] is not None]


def _check_grid_widths(widths, grid: str, symmetric: bool, scale_method: str) -> None:
  """Every ``(layer, 'w' | 'a', bits)`` exists on ``grid``: checked before tracing, so the
  error names the layer. An unknown grid or scale method raises ValueError."""
  _check_grid(grid, 8, True, scale_method)
  if grid == "amq":
    return
  for l, kind, b in widths:
    try:  # activations: qwix's dynamic input quantizer is symmetric
      _check_grid(grid, b, symmetric if kind == "w" else True, scale_method)
    except BitsError as e:
      raise BitsError(f"layer {l!r} ('{kind}' = {b}): {e}") from None


def quantize_params(params, config, *, layers=None, symmetric: bool = True,
                    scale_method: str = "minmax", grid: str = "amq") -> Any:
  """``params`` with each configured layer's weight replaced by its per-channel fake-quant.

  Args:
    params: a params pytree (any structure).
    config: ``BitConfig`` or mapping ``{layer: bits | {'w', 'a'}}`` (only 'w' is used).
    layers: the model's ``adapters.Layers`` (``model.layers``): each layer's weight leaf
      and output-channel axis come from it. Without it: leaves named ``kernel`` with the
      output channel last (Linen, NNX).
    symmetric, scale_method, grid: as in :func:`amq_jax.quant.quantize`.

  Raises:
    BitsError: ``config`` names a layer the model does not have (the valid ones listed),
      or a width the grid lacks.
  """
  targets = _weight_targets(params, config, layers, symmetric, scale_method)
  _check_grid_widths([(p, "w", b) for p, (b, _) in targets.items()], grid, symmetric,
                     scale_method)
  return _fake_quant_weights(params, targets, symmetric, scale_method, grid)


def _keyed_by_name(ranges: Mapping[str, Any] | None, layers) -> dict:
  out = {}
  for k, v in (ranges or {}).items():
    try:
      out[layers[k].name] = v
    except LayerError:
      out[normalize_path(k)] = v
  return out


def quantize_model(model, config, *, act_ranges: Mapping[str, Any] | None = None,
                   symmetric: bool = True, scale_method: str = "minmax",
                   grid: str = "amq") -> Callable:
  """The fake-quantized forward pass of ``model`` under ``config``.

  Args:
    model: an :class:`amq_jax.adapters.Model`.
    config: ``{layer: bits | {'w': bits, 'a': bits}}``; layers not in it stay float.
    act_ranges: ``{layer: (lo, hi)}`` from :func:`calibrate_model`, for every layer with an
      'a' width (floats or arrays; may be traced). Not used with ``grid='qwix'``, whose
      activation scales are computed per example as the model runs.
    symmetric, scale_method: the weight quantizer (per output channel).
    grid: 'amq' or 'qwix' (module docstring): the integer grid of weights and activations.

  Returns:
    ``apply(params, state, x, *, train=False) -> (out, new_state)``: pure, differentiable
    in ``params`` with straight-through gradients (use it as the QAT forward pass), jit it
    as it is.

  Raises:
    BitsError: unknown layers, bad widths (widths the grid lacks), or 'a' widths without
      a range.
    LayerError: 'a' widths on a model without activation hooks.
  """
  layers = model.layers
  cfg = check_config(config, layers)
  _check_grid_widths(_widths(cfg), grid, symmetric, scale_method)
  targets = _weight_targets(model.params, cfg, layers, symmetric, scale_method)
  act_layers = [l for l in cfg.layers if cfg[l]["a"] is not None]
  act: dict[str, tuple] = {}
  hooked = None
  if act_layers:
    hooked = model.require_act_hooks(f"activation quantization (layers {act_layers} have "
                                     "'a' widths)")
    ranges = _keyed_by_name(act_ranges, layers)
    missing = [l for l in act_layers if l not in ranges] if grid == "amq" else []
    if missing:
      raise BitsError(f"no activation range for layers {missing}: run "
                      "amq_jax.quant.calibrate_model(model, batches, config) (Linen: "
                      "quant.calibrate) and pass act_ranges=")
    act = {l: (cfg[l]["a"],) + ((ranges[l][0], ranges[l][1]) if grid == "amq" else ())
           for l in act_layers}

  def hook(name, x):
    if name in act:
      if grid == "qwix":  # dynamic: one symmetric scale per example, as qwix quantizes inputs
        return fake_quant(x, act[name][0], axis=0, grid="qwix")
      bits, lo, hi = act[name]
      return fake_quant_act(x, bits, lo, hi)
    return x

  def apply(params, state, x, *, train: bool = False):
    qparams = _fake_quant_weights(params, targets, symmetric, scale_method, grid)
    if hooked is None:
      return model.apply(qparams, state, x, train=train)
    return hooked(qparams, state, x, hook, train=train)

  return apply


def _inputs(batches, input_key: str) -> Iterable:
  if isinstance(batches, (np.ndarray, jax.Array)) or (
      isinstance(batches, Mapping) and input_key in batches):
    batches = [batches]
  for b in batches:
    yield b[input_key] if isinstance(b, Mapping) else b


def calibrate_model(model, batches, config, *, method: str = "minmax",
                    percentile: float = 99.99, quantize_weights: bool = True,
                    input_key: str = "image", max_batches: int | None = None,
                    symmetric: bool = True, scale_method: str = "minmax",
                    grid: str = "amq") -> dict:
  """Activation ranges of the configured layers' inputs, observed on ``batches``.

  Runs ``model`` in inference mode through its activation hooks (weights fake-quantized per
  ``config`` unless ``quantize_weights=False``; activations float) and records each
  configured layer's input:

  * ``'minmax'``: ``lo = min over batches of min(x)``, ``hi = max of max(x)``;
  * ``'percentile'``: the mean over batches of the ``100 - p`` and ``p`` percentiles of
    ``x`` (robust to a few outliers).

  Args:
    model: an :class:`amq_jax.adapters.Model` with activation hooks.
    batches: an array, a batch dict (``input_key``), or an iterable of either.
    config: the layers to calibrate (all listed layers, whatever their 'a' width, so widths
      can change later). method, percentile: see above. max_batches: stop after this many.
    symmetric, scale_method, grid: the weight quantizer. (``grid='qwix'`` models need no
      ranges for inference; see :func:`quantize_model`.)

  Returns:
    ``{layer: [lo, hi]}`` with Python floats (JSON-able), in ``config``'s order.
  """
  if method not in ("minmax", "percentile"):
    raise ValueError(f"method must be 'minmax' or 'percentile', got {method!r}")
  cfg = check_config(config, model.layers)
  hooked = model.require_act_hooks("activation calibration")
  names = set(cfg.layers)
  targets = (_weight_targets(model.params, cfg, model.layers, symmetric, scale_method)
             if quantize_weights else {})
  _check_grid_widths([(p, "w", b) for p, (b, _) in targets.items()], grid, symmetric,
                     scale_method)

  def observe(params, state, x):
    stats: dict[str, tuple] = {}

    def hook(name, a):
      if name in names:
        a32 = a.astype(jnp.float32)
        if method == "minmax":
          lo, hi = jnp.min(a32), jnp.max(a32)
        else:
          lo, hi = jnp.percentile(a32, jnp.array([100.0 - percentile, percentile]))
        if name in stats:  # a layer called twice: the union of its ranges
          lo, hi = jnp.minimum(lo, stats[name][0]), jnp.maximum(hi, stats[name][1])
        stats[name] = (lo, hi)
      return a

    qparams = _fake_quant_weights(params, targets, symmetric, scale_method, grid)
    hooked(qparams, state, x, hook, train=False)
    return stats

  observe = jax.jit(observe)
  los: dict[str, list] = {}
  his: dict[str, list] = {}
  n = 0
  for x in _inputs(batches, input_key):
    if max_batches is not None and n >= max_batches:
      break
    stats = jax.device_get(observe(model.params, model.state, jnp.asarray(x)))
    for k, (lo, hi) in stats.items():
      los.setdefault(k, []).append(float(lo))
      his.setdefault(k, []).append(float(hi))
    n += 1
  if n == 0:
    raise ValueError("calibration got no batches")
  never = sorted(names - set(los))
  if never:
    raise LayerError(f"layers {never} were never called by the model's forward pass")
  if method == "minmax":
    return {k: [min(los[k]), max(his[k])] for k in cfg.layers}
  return {k: [float(np.mean(los[k])), float(np.mean(his[k]))] for k in cfg.layers}


# ------------------------------------------------------------------------ Flax Linen API

# Linen Models by (module, abstract signature, call options): tracing the layers once per
# shape, not once per eager call.
_LINEN: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()


def _linen_model(module, variables, x, no_train: bool, extra: dict):
  """The Linen adapter's Model of ``module`` (cached when the call options are static)."""
  from amq_jax.adapters import from_linen

  def build():
    return from_linen(module, variables, x, train_kwarg=False if no_train else None,
                      apply_kwargs=extra or None)

  leaves, tree = jax.tree_util.tree_flatten((variables, x))
  try:
    key = (module, tree, tuple((np.shape(l), str(getattr(l, "dtype", type(l)))) for l in leaves),
           no_train, tuple(sorted(extra.items())))
    hash(key)
  except TypeError:  # unhashable module fields or call arguments (e.g. arrays, rngs)
    return build()
  m = _LINEN.get(key)
  if m is None:
    m = _LINEN[key] = build()
    while len(_LINEN) > 16:
      _LINEN.popitem(last=False)
  else:
    _LINEN.move_to_end(key)
  return m


def _params_of(variables):
  return variables["params"] if "params" in variables else variables


def make_quantized_apply(model, config, *, symmetric: bool = True,
                         scale_method: str = "minmax", grid: str = "amq") -> Callable:
  """Returns ``apply(variables, x, *, train=False, act_ranges=None, mutable=False, **kw)``
  for a Flax Linen module: ``model.apply`` with ``config``'s weights and input activations
  fake-quantized (:func:`quantize_model` on ``adapters.from_linen``).

  ``train`` is passed as ``train=`` if the module's ``__call__`` takes it (None: never
  passed); ``mutable`` (e.g. ``['batch_stats']``) returns ``(out, updates)`` as
  ``model.apply`` does; ``rngs`` and other keywords go to every ``model.apply``. The
  configuration is checked on the first call, against the layers the model calls.
  """
  cfg = as_bit_config(config)

  def apply(variables, x, *, train: bool | None = False, act_ranges=None, mutable=False,
            rngs=None, **kw):
    extra = dict(kw)
    if rngs is not None:
      extra["rngs"] = rngs
    m = _linen_model(model, variables, x, train is None, extra)
    fn = quantize_model(m, cfg, act_ranges=act_ranges, symmetric=symmetric,
                        scale_method=scale_method, grid=grid)
    state = {k: v for k, v in variables.items() if k != "params"}
    # train=None: no train= argument; the state is still updated when it is mutable.
    out, new_state = fn(_params_of(variables), state, x,
                        train=bool(mutable) if train is None else bool(train))
    if not mutable:
      return out
    if mutable is True:
      return out, new_state
    keep = [mutable] if isinstance(mutable, str) else list(mutable)
    return out, {k: new_state[k] for k in keep if k in new_state}

  return apply


def quantized_apply(model, variables, x, config, *, train: bool | None = False,
                    act_ranges: Mapping[str, Any] | None = None, mutable=False,
                    symmetric: bool = True, scale_method: str = "minmax", grid: str = "amq",
                    rngs=None, **call_kwargs):
  """``model.apply`` of a Linen module with ``config``'s layers fake-quantized.

  Args:
    model: any Linen module. variables: ``{'params': ..., 'batch_stats': ...}``.
    x: the model input. config: ``BitConfig`` or mapping layer -> {'w', 'a'}.
    train: passed as ``train=`` if the model's ``__call__`` accepts it (None: not passed).
    act_ranges: ``{layer_path: (lo, hi)}`` from :func:`calibrate`; required for every layer
      with an 'a' width.
    mutable: as in ``model.apply`` (e.g. ``['batch_stats']`` when training).
    symmetric, scale_method: weight quantizer (per output channel).
    grid: 'amq' or 'qwix' (see :func:`quantize_model`).
    rngs, call_kwargs: forwarded to ``model.apply``.

  Returns:
    What ``model.apply`` returns (``(out, updates)`` when ``mutable``).

  Differentiable w.r.t. ``variables['params']`` with straight-through gradients; jit it
  with ``config`` static (it is Python data) and ``act_ranges`` as an argument or constant.
  """
  fn = make_quantized_apply(model, config, symmetric=symmetric, scale_method=scale_method,
                            grid=grid)
  return fn(variables, x, train=train, act_ranges=act_ranges, mutable=mutable, rngs=rngs,
            **call_kwargs)


def calibrate(model, variables, batches, config, *, method: str = "minmax",
              percentile: float = 99.99, quantize_weights: bool = True,
              input_key: str = "image", max_batches: int | None = None,
              grid: str = "amq") -> dict:
  """:func:`calibrate_model` for a Linen module and its variables.

  Returns ``{layer_path: [lo, hi]}`` (floats) for every layer of ``config``.
  """
  xs = _inputs(batches, input_key)
  try:
    first = jnp.asarray(next(xs))
  except StopIteration:
    raise ValueError("calibration got no batches") from None
  sample = jax.ShapeDtypeStruct(first.shape, first.dtype)
  m = _linen_model(model, variables, sample, False, {})
  m = m.replace(params=_params_of(variables),
                state={k: v for k, v in variables.items() if k != "params"})
  return calibrate_model(m, itertools.chain([first], xs), config, method=method,
                         percentile=percentile, quantize_weights=quantize_weights,
                         max_batches=max_batches, grid=grid)
