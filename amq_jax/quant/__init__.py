"""Uniform quantizers, bit configurations, applying them to Linen models, packed export.

>>> from amq_jax import quant
>>> cfg = quant.BitConfig({'stem_conv': {'w': 8, 'a': 8}, 'head': 4})
>>> ranges = quant.calibrate(model, variables, batches, cfg)
>>> logits = quant.quantized_apply(model, variables, x, cfg, act_ranges=ranges)

Any framework, through its adapter (``amq_jax.adapters``):

>>> m = adapters.from_equinox(eqx_model, x[:2])
>>> apply = quant.quantize_model(m, {'conv': 4, 'fc': 8})
>>> logits, _ = apply(m.params, m.state, x)
"""
from amq_jax.quant._math import (MAX_BITS, MIN_BITS, QTensor, dequantize, fake_quant,
                                 fake_quant_act, quant_error, quantize)
from amq_jax.quant._config import (BitConfig, as_bit_config, load_bits_file, normalize_path,
                                   parse_bits, resolve_rules, uniform_config, validate)
from amq_jax.quant._pack import (export_packed, load_packed, pack, packed_nbytes, read_header,
                                 unpack)
from amq_jax.quant._interop import qwix_layer_kinds, qwix_unsupported, to_qwix_rules
from amq_jax.quant._apply import (calibrate, calibrate_model, check_config,
                                  make_quantized_apply, quantizable_layers, quantize_model,
                                  quantize_params, quantized_apply)

__all__ = [
    "QTensor", "quantize", "dequantize", "fake_quant", "fake_quant_act", "quant_error",
    "MIN_BITS", "MAX_BITS",
    "BitConfig", "as_bit_config", "normalize_path", "resolve_rules", "uniform_config", "validate",
    "load_bits_file", "parse_bits",
    "pack", "unpack", "packed_nbytes", "export_packed", "load_packed", "read_header",
    "quantize_params", "quantize_model", "calibrate_model", "check_config",
    "quantized_apply", "make_quantized_apply", "calibrate", "quantizable_layers",
    "to_qwix_rules", "qwix_layer_kinds", "qwix_unsupported",
]
