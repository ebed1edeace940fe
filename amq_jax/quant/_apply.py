"""Applying a bit configuration to any Flax Linen model, without editing the model.

Weights: the configured kernels are replaced in the params tree by
``fake_quant(kernel, w_bits, axis=-1)`` (per output channel) before ``model.apply``. This is
exactly "intercept the layer and quantize its kernel", but done once per step on the data
(a module called twice sees one quantized kernel), and the straight-through gradient flows
back to the float kernel through the tree.

Activations: ``flax.linen.intercept_methods`` catches ``__call__`` of every module whose path
is configured with an ``'a'`` width (any Conv/Dense-like module whose first argument is its
input) and passes ``fake_quant_act(x, a_bits, lo, hi)`` instead of ``x``.

Activation ranges are a plain JSON-able dict ``{layer_path: [lo, hi]}`` (floats), made by
:func:`calibrate` and passed as ``act_ranges=``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amq_jax import _paths
from amq_jax.quant._config import BitConfig, as_bit_config, normalize_path, validate
from amq_jax.quant._math import fake_quant, fake_quant_act

__all__ = ["quantize_params", "quantized_apply", "make_quantized_apply", "calibrate",
           "quantizable_layers"]


def quantizable_layers(params) -> list[str]:
  """Layer (module) paths of every Conv/Dense kernel in a params tree, in tree order."""
  return [_paths.layer_of(p) for p in _paths.quantizable_paths(params)]


def _params_of(variables):
  return variables["params"] if "params" in variables else variables


def quantize_params(params, config, *, symmetric: bool = True,
                    scale_method: str = "minmax") -> Any:
  """``params`` with each configured kernel replaced by its per-channel fake-quant.

  Args:
    params: a 'params' pytree. config: ``BitConfig`` or mapping (validated against the
      tree's kernels). symmetric, scale_method: as in :func:`amq_jax.quant.quantize`.
  """
  cfg = validate(config, quantizable_layers(params))
  updates = {}
  for layer in cfg.layers:
    wb = cfg[layer]["w"]
    if wb is None:
      continue
    kp = layer + "/kernel"
    k = _paths.select(params, [kp])[kp]
    updates[kp] = fake_quant(k, wb, symmetric=symmetric, axis=-1, scale_method=scale_method)
  return _paths.merge(params, updates) if updates else params


def _call_kwargs(model: nn.Module, train) -> dict:
  """``{'train': train}`` if the model's ``__call__`` takes it (user models may not)."""
  if train is None:
    return {}
  try:
    sig = inspect.signature(type(model).__call__)
  except (TypeError, ValueError):
    return {"train": train}
  ok = "train" in sig.parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
  return {"train": train} if ok else {}


def _act_interceptor(act: Mapping[str, tuple[int, Any, Any]]):
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and args:
      path = "/".join(context.module.path)
      if path in act:
        bits, lo, hi = act[path]
        args = (fake_quant_act(args[0], bits, lo, hi),) + tuple(args[1:])
    return next_fun(*args, **kwargs)
  return interceptor


def quantized_apply(model: nn.Module, variables, x, config, *, train: bool | None = False,
                    act_ranges: Mapping[str, Any] | None = None, mutable=False,
                    symmetric: bool = True, scale_method: str = "minmax", rngs=None,
                    **call_kwargs):
  """``model.apply`` with the weights and input activations of ``config``'s layers fake-quantized.

  Args:
    model: any Linen module. variables: ``{'params': ..., 'batch_stats': ...}``.
    x: the model input. config: ``BitConfig`` or mapping layer -> {'w', 'a'}.
    train: passed as ``train=`` if the model's ``__call__`` accepts it (None: not passed).
    act_ranges: ``{layer_path: (lo, hi)}`` from :func:`calibrate`; required for every layer
      with an 'a' width.
    mutable: as in ``model.apply`` (e.g. ``['batch_stats']`` when training).
    symmetric, scale_method: weight quantizer (per output channel).
    rngs, call_kwargs: forwarded to ``model.apply``.

  Returns:
    What ``model.apply`` returns (``(out, updates)`` when ``mutable``).

  Differentiable w.r.t. ``variables['params']`` with straight-through gradients; jit it
  with ``config`` static (it is Python data) and ``act_ranges`` as an argument or constant.
  """
  fn = make_quantized_apply(model, config, symmetric=symmetric, scale_method=scale_method)
  return fn(variables, x, train=train, act_ranges=act_ranges, mutable=mutable, rngs=rngs,
            **call_kwargs)


def make_quantized_apply(model: nn.Module, config, *, symmetric: bool = True,
                         scale_method: str = "minmax") -> Callable:
  """Returns ``apply(variables, x, *, train=False, act_ranges=None, mutable=False, **kw)``.

  The configuration is checked once, on the first call, against the params' kernels.
  """
  cfg = as_bit_config(config)
  act_layers = [l for l in cfg.layers if cfg[l]["a"] is not None]

  def apply(variables, x, *, train: bool | None = False, act_ranges=None, mutable=False,
            rngs=None, **kw):
    params = _params_of(variables)
    qparams = quantize_params(params, cfg, symmetric=symmetric, scale_method=scale_method)
    ranges = {normalize_path(k): v for k, v in (act_ranges or {}).items()}
    missing = [l for l in act_layers if l not in ranges]
    if missing:
      raise ValueError(f"no activation range for layers {missing}: run "
                       "amq_jax.quant.calibrate(...) and pass act_ranges=")
    act = {l: (cfg[l]["a"], ranges[l][0], ranges[l][1]) for l in act_layers}
    new_vars = dict(variables)
    new_vars["params"] = qparams
    kwargs = dict(_call_kwargs(model, train), **kw)
    if rngs is not None:
      kwargs["rngs"] = rngs
    if act:
      with nn.intercept_methods(_act_interceptor(act)):
        return model.apply(new_vars, x, mutable=mutable, **kwargs)
    return model.apply(new_vars, x, mutable=mutable, **kwargs)

  return apply


def calibrate(model: nn.Module, variables, batches, config, *, method: str = "minmax",
              percentile: float = 99.99, quantize_weights: bool = True,
              input_key: str = "image", max_batches: int | None = None) -> dict:
  """Activation ranges of the configured layers' inputs, observed on ``batches``.

  Runs the model in inference mode (weights fake-quantized per ``config`` unless
  ``quantize_weights=False``; activations float) and records each layer's input:

  * ``'minmax'``: ``lo = min over batches of min(x)``, ``hi = max of max(x)``;
  * ``'percentile'``: the mean over batches of the ``100 - p`` and ``p`` percentiles of
    ``x`` (robust to a few outliers).

  Args:
    model, variables, config: as in :func:`quantized_apply`. Layers without an 'a' width
      are calibrated too if listed (cheap), so widths can be changed later.
    batches: an array, a batch dict (``input_key``), or an iterable of either.
    method, percentile: see above. max_batches: stop after this many.

  Returns:
    ``{layer_path: [lo, hi]}`` with Python floats (JSON-able).
  """
  if method not in ("minmax", "percentile"):
    raise ValueError(f"method must be 'minmax' or 'percentile', got {method!r}")
  cfg = as_bit_config(config)
  validate(cfg, quantizable_layers(_params_of(variables)))
  layers = set(cfg.layers)
  wcfg = BitConfig({l: {"w": cfg[l]["w"], "a": None} for l in cfg.layers}
                   if quantize_weights else {})

  def observe(v, x):
    stats: dict[str, tuple] = {}

    def rec(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and args:
        path = "/".join(context.module.path)
        if path in layers:
          a = args[0].astype(jnp.float32)
          if method == "minmax":
            lo, hi = jnp.min(a), jnp.max(a)
          else:
            lo, hi = jnp.percentile(a, jnp.array([100.0 - percentile, percentile]))
          if path in stats:  # a module called twice: take the union of ranges
            lo, hi = jnp.minimum(lo, stats[path][0]), jnp.maximum(hi, stats[path][1])
          stats[path] = (lo, hi)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(rec):
      make_quantized_apply(model, wcfg)(v, x, train=False)
    return stats

  observe = jax.jit(observe)
  if isinstance(batches, (np.ndarray, jax.Array)) or (
      isinstance(batches, Mapping) and input_key in batches):
    batches = [batches]
  los: dict[str, list] = {}
  his: dict[str, list] = {}
  n = 0
  for batch in batches:
    if max_batches is not None and n >= max_batches:
      break
    x = batch[input_key] if isinstance(batch, Mapping) else batch
    stats = jax.device_get(observe(variables, jnp.asarray(x)))
    for k, (lo, hi) in stats.items():
      los.setdefault(k, []).append(float(lo))
      his.setdefault(k, []).append(float(hi))
    n += 1
  if n == 0:
    raise ValueError("calibrate got no batches")
  never = sorted(layers - set(los))
  if never:
    raise ValueError(f"layers {never} were never called by the model's forward pass")
  if method == "minmax":
    return {k: [min(los[k]), max(his[k])] for k in cfg.layers}
  return {k: [float(np.mean(los[k])), float(np.mean(his[k]))] for k in cfg.layers}
