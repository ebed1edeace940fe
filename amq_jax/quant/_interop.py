"""Interoperability: a bit configuration as qwix ``QuantizationRule``s that qwix can run.

qwix (Google's JAX quantization library) configures quantization with rules that match
module paths by regex, first match wins. :func:`to_qwix_rules` turns an amq-jax
configuration into one rule per layer (an exact-match regex of its module path,
``weight_qtype='int{w}'``, ``act_qtype='int{a}'`` for the layer's INPUT, as amq-jax's ``'a'``),
in layer order.

Not every configuration runs in qwix. What qwix 0.1.x can express, read from its providers
(``qwix/_src/providers/{ptq,qt}.py``) and checked by running them on CPU
(``tests/test_interop.py`` checks these predictions against qwix for both providers, both
layer kinds and both storage types):

* widths: ``int2`` .. ``int8`` (no 1-bit, nothing wider than 8 bits); a layer's input is
  quantized only together with its weights;
* ``provider='ptq'`` (``qwix.PtqProvider``, integer weights for serving): a convolution
  quantizes its input at its weight type, ``act_qtype == weight_qtype`` (no weight-only
  convolutions); a Dense layer may be weight-only or use any activation width;
* ``provider='qt'`` (``qwix.QtProvider``, fake-quant forward with straight-through gradients,
  for QAT or to evaluate the deployed numerics): weight-only everywhere; a convolution with a
  quantized input needs both operands stored in one integer type (qwix stores int2..int4 as
  int4 and int5..int8 as int8: both widths <= 4 or both >= 5);
* XLA on CPU and GPU has no int4 x int4 matmul or convolution (its own error message says
  so for both), so a layer whose weight AND input are both 2..4 bits runs only on TPU
  (``platform=``).

A configuration outside these raises :class:`amq_jax.errors.BitsError` naming each layer,
why, and the activation widths that would run; ``adapt_act=True`` instead moves each such
layer's activation width to the nearest one that runs (stated in a warning).

The weights are calibrated per output channel with qwix's 'absmax' grid, which is
``amq_jax.quant.quantize(..., grid='qwix', axis=-1)``: build the Omega table with
``alloc.omega_table(..., grid='qwix')`` (in the pipeline: ``--config.quant.grid=qwix``) and
the search optimizes the quantizer the deployed model runs. qwix quantizes a layer's input
dynamically, one symmetric absmax scale per example (``quant.fake_quant(x, a, axis=0,
grid='qwix')``, what ``quant.quantize_model(..., grid='qwix')`` does), where amq-jax's
activation quantizer uses calibrated static ranges. In QAT, qwix's QtProvider back-propagates through a convolution exactly as
amq-jax's straight-through fake-quant does, but through a quantized Dense layer with its
FLOAT operands (qwix's ``use_original_residuals``): the forward passes agree, the gradients of
Dense layers and of the layers before them differ slightly.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

from amq_jax import _paths
from amq_jax.errors import BitsError
from amq_jax.quant._config import as_bit_config, normalize_path
from amq_jax.quant._math import QWIX_BITS

__all__ = ["to_qwix_rules", "qwix_layer_kinds", "qwix_unsupported"]

PROVIDERS = ("qt", "ptq")
KINDS = ("conv", "dense")
_INT4_PLATFORMS = ("cpu", "gpu", "cuda", "rocm")
_FLOAT = 32  # distance stand-in for "kept in float" when choosing the nearest act width


def qwix_layer_kinds(params) -> dict[str, str]:
  """``{layer_path: 'conv' | 'dense'}`` from a params tree: 2-D kernels are Dense layers
  (qwix intercepts ``dot_general``), higher-rank kernels convolutions (``conv_general_dilated``).
  ``params`` may be the variables dict (its ``'params'`` is used)."""
  if isinstance(params, Mapping) and "params" in params:
    params = params["params"]
  return {_paths.layer_of(p): ("dense" if v.ndim == 2 else "conv")
          for p, v in _paths.flatten(params).items()
          if p.rsplit("/", 1)[-1] == "kernel" and getattr(v, "ndim", 0) >= 2}


def _storage(bits: int) -> str:
  return "int4" if bits <= 4 else "int8"


def qwix_unsupported(w: int | None, a: int | None, *, kind: str | None, provider: str,
                     platform: str, weight_calibration_method: str = "absmax") -> str | None:
  """Why qwix cannot run a layer at weight width ``w`` and input width ``a``; None if it can.

  ``kind=None`` (unknown) applies the convolution limits, the stricter of the two.
  """
  if w is None:
    return None if a is None else (
        "qwix quantizes a layer's input only together with its weights (w is float)")
  if w not in QWIX_BITS:
    return f"qwix has no int{w} type (weights int2..int8)"
  if weight_calibration_method.split(",")[0] == "minmax" and w not in (4, 8):
    return f"qwix's asymmetric 'minmax' weights exist at 4 and 8 bits only, not {w}"
  if a is not None and a not in QWIX_BITS:
    return f"qwix has no int{a} type (activations int2..int8)"
  conv = kind != "dense"
  if conv and provider == "ptq" and a != w:
    return ("qwix's PtqProvider quantizes a convolution's input at its weight type "
            f"(act_qtype must equal weight_qtype; got int{w} weights, "
            + ("a float input)" if a is None else f"int{a} input)"))
  if a is None:
    return None
  if conv and provider == "qt" and _storage(a) != _storage(w):
    return (f"qwix's QtProvider convolves integer operands of one type: int{w} weights are "
            f"stored as {_storage(w)}, an int{a} input as {_storage(a)} (both widths must be "
            "<= 4 or both >= 5)")
  if a <= 4 and w <= 4 and platform in _INT4_PLATFORMS:
    return (f"XLA on {platform} has no int4 x int4 "
            f"{'convolution' if conv else 'matmul'} (qwix stores int2..int4 as int4); "
            "it runs on TPU")
  return None


def _nearest_act(w, a, **kw) -> tuple[int | None, list]:
  """The activation width closest to ``a`` that runs with weight width ``w`` (ties: wider)."""
  ok = [c for c in [None, *QWIX_BITS] if qwix_unsupported(w, c, **kw) is None]
  key = lambda c: (abs((_FLOAT if c is None else c) - (_FLOAT if a is None else a)),
                   -(_FLOAT if c is None else c))
  return (min(ok, key=key) if ok else None), ok


def _fmt(v) -> str:
  return "float" if v is None else str(v)


def to_qwix_rules(config, *, provider: str = "qt", params=None,
                  kinds: Mapping[str, str] | None = None, adapt_act: bool = False,
                  platform: str | None = None, as_objects: bool = True,
                  weight_calibration_method: str = "absmax") -> list[Any]:
  """One qwix rule per configured layer, checked to run in qwix.

  Args:
    config: a ``BitConfig`` or mapping ``{layer_path: {'w': bits, 'a': bits}}``; layer or
      kernel paths ('stage1_block1/conv1', 'stage1_block1/conv1/kernel').
    provider: the qwix provider the rules are for: 'qt' (``qwix.QtProvider``: fake-quant
      forward, for QAT and for evaluating the deployed numerics; weight-only works for every
      layer) or 'ptq' (``qwix.PtqProvider``: integer weights for serving).
    params: the model's params (or variables), to tell convolutions from Dense layers.
    kinds: ``{layer_path: 'conv' | 'dense'}`` instead of ``params``. Layers of unknown kind
      are checked against the convolution limits (the stricter).
    adapt_act: False raises :class:`BitsError` for layers qwix cannot run; True moves each
      such layer's activation width to the nearest width that runs (a float input counts as
      wider than 8 bits, so weight-only PTQ convolutions get ``a = w``), with a warning that
      lists the changes. Weight widths are never changed.
    platform: 'cpu', 'gpu' or 'tpu' (default: ``jax.default_backend()``); int4 x int4
      products exist on TPU only.
    as_objects: return ``qwix.QuantizationRule`` objects (needs ``pip install qwix``);
      False returns JSON-able dicts with the rules' keyword arguments.
    weight_calibration_method: qwix's weight calibration; 'absmax' (symmetric) is
      ``quant.quantize(..., grid='qwix', axis=-1)``.

  Returns:
    A list of rules, in the configuration's layer order (float layers get a rule with no
    types, so that a catch-all rule appended later does not quantize them).

  Raises:
    BitsError: layers qwix cannot run as configured (each named, with the reason and the
      activation widths that would run).

  >>> to_qwix_rules({'stem_conv': {'w': 8, 'a': 8}}, provider='ptq', as_objects=False)
  [{'module_path': '^stem_conv$', 'weight_qtype': 'int8', 'act_qtype': 'int8', 'weight_calibration_method': 'absmax'}]
  """
  if provider not in PROVIDERS:
    raise BitsError(f"provider must be one of {PROVIDERS} (qwix.QtProvider, qwix.PtqProvider), "
                    f"got {provider!r}")
  cfg = as_bit_config(config)
  if kinds is None and params is not None:
    kinds = qwix_layer_kinds(params)
  kinds = {normalize_path(k): v for k, v in (kinds or {}).items()}
  bad_kinds = {k: v for k, v in kinds.items() if v not in KINDS}
  if bad_kinds:
    raise BitsError(f"layer kinds must be 'conv' or 'dense', got {bad_kinds}")
  if platform is None:
    import jax
    platform = jax.default_backend()
  kw = dict(provider=provider, platform=platform,
            weight_calibration_method=weight_calibration_method)

  rules, problems, changes = [], [], []
  for layer in cfg.layers:
    w, a = cfg[layer]["w"], cfg[layer]["a"]
    kind = kinds.get(layer)
    why = qwix_unsupported(w, a, kind=kind, **kw)
    if why is not None:
      best, ok = _nearest_act(w, a, kind=kind, **kw)
      if adapt_act and ok:
        changes.append(f"{layer}: a {_fmt(a)} -> {_fmt(best)} ({why})")
        a = best
      else:
        runs = ", ".join(_fmt(c) for c in ok) or "none: change w"
        problems.append(f"{layer} ({kind or 'kind unknown'}, w={_fmt(w)}, a={_fmt(a)}): {why}; "
                        f"activation widths that run with w={_fmt(w)}: {runs}")
    rules.append({"module_path": f"^{re.escape(layer)}$",
                  "weight_qtype": None if w is None else f"int{w}",
                  "act_qtype": None if a is None else f"int{a}",
                  "weight_calibration_method": weight_calibration_method})
  if problems:
    hint = ("" if kinds or params is not None else
            " Pass params= so Dense layers are not held to the convolution limits.")
    raise BitsError(
        f"qwix ({provider!r} provider, platform {platform!r}) cannot run {len(problems)} "
        "layer(s) as configured:\n  " + "\n  ".join(problems) + "\nFixes: adapt_act=True sets "
        "each listed layer's activation width to the nearest one that runs (weights unchanged); "
        "provider='qt' runs weight-only layers at any width 2..8; weights of 5..8 bits avoid "
        "the int4 limits on cpu/gpu; widths outside 2..8 need another bit search "
        "(bit choices 2..8)." + hint)
  if changes:
    warnings.warn("to_qwix_rules(adapt_act=True) changed activation widths so qwix can run "
                  "them:\n  " + "\n  ".join(changes), UserWarning, stacklevel=2)
  if not as_objects:
    return rules
  try:
    import qwix
  except ImportError as e:
    raise ImportError("qwix is not installed: pip install 'amq-jax[interop]' (or "
                      "to_qwix_rules(..., as_objects=False) for the JSON form)") from e
  return [qwix.QuantizationRule(**r) for r in rules]
