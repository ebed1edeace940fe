"""Interoperability: a bit configuration as qwix ``QuantizationRule``s.

qwix (Google's JAX quantization library) configures quantization with rules that match
module paths by regex. :func:`to_qwix_rules` turns an amq-jax configuration into one rule
per layer (an exact-match regex of its module path, ``weight_qtype='int{w}'``,
``act_qtype='int{a}'``), in layer order, so qwix's first-match semantics apply each layer's
own widths. The JSON form (``as_objects=False``) holds the same fields, for users who build
the rules themselves or for another tool.
"""
from __future__ import annotations

import re
from typing import Any

from amq_jax.quant._config import as_bit_config

__all__ = ["to_qwix_rules"]


def to_qwix_rules(config, *, as_objects: bool = True,
                  weight_calibration_method: str = "absmax") -> list[Any]:
  """One qwix rule per configured layer.

  Args:
    config: a ``BitConfig`` or mapping ``{layer_path: {'w': bits, 'a': bits}}``.
    as_objects: return ``qwix.QuantizationRule`` objects (needs ``pip install qwix``);
      False returns JSON-able dicts with the rules' keyword arguments.
    weight_calibration_method: qwix's weight calibration ('absmax' is symmetric, as the
      amq-jax default quantizer).

  Returns:
    A list of rules, in the configuration's layer order.

  >>> to_qwix_rules({'stem_conv': {'w': 8, 'a': 8}}, as_objects=False)
  [{'module_path': '^stem_conv$', 'weight_qtype': 'int8', 'act_qtype': 'int8', 'weight_calibration_method': 'absmax'}]
  """
  cfg = as_bit_config(config)
  rules = []
  for layer in cfg.layers:
    w, a = cfg[layer]["w"], cfg[layer]["a"]
    rules.append({"module_path": f"^{re.escape(layer)}$",
                  "weight_qtype": None if w is None else f"int{w}",
                  "act_qtype": None if a is None else f"int{a}",
                  "weight_calibration_method": weight_calibration_method})
  if not as_objects:
    return rules
  try:
    import qwix
  except ImportError as e:
    raise ImportError("qwix is not installed: pip install 'amq-jax[interop]' (or "
                      "to_qwix_rules(..., as_objects=False) for the JSON form)") from e
  return [qwix.QuantizationRule(**r) for r in rules]
