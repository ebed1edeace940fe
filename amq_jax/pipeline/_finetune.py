"""Stage 'finetune': quantization-aware fine-tuning of one bit configuration, and export.

Weights are fake-quantized per output channel with straight-through gradients; input
activations of layers with an 'a' width use ranges calibrated on a few training batches
before fine-tuning (kept fixed). The fine-tuned model is exported as packed integers +
scales (``model.amq``) and the exported file is evaluated again to check it.
"""
from __future__ import annotations

import os
import time

import flax.serialization
import jax
import ml_collections

from amq_jax import alloc, quant, train
from amq_jax.pipeline._common import Context, read_json, write_json


def qat_apply_fn(model, bits: quant.BitConfig, act_ranges, *, symmetric=True):
  """``apply_fn(variables, images, train)`` of the training loop, fake-quantized."""
  qapply = quant.make_quantized_apply(model, bits, symmetric=symmetric)

  def apply_fn(variables, images, is_train):
    if is_train and "batch_stats" in variables:
      logits, upd = qapply(variables, images, train=True, act_ranges=act_ranges,
                           mutable=["batch_stats"])
      return logits, upd["batch_stats"]
    return qapply(variables, images, train=is_train, act_ranges=act_ranges), None
  return apply_fn


def load_bits(ctx: Context, path: str) -> quant.BitConfig:
  """Reads a bits file and checks it against the model's layers (clear error if not)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"bits file {path} does not exist; run amq-jax search first "
                            "or pass --bits FILE")
  try:
    raw = read_json(path)
  except ValueError as e:
    raise ValueError(f"bits file {path} is not valid JSON: {e}") from None
  if isinstance(raw, dict) and "config" in raw and "method" in raw:
    raw = raw["config"]
  cfg = quant.BitConfig(raw) if isinstance(raw, dict) else quant.resolve_rules(raw, ctx.layers)
  return quant.validate(cfg, ctx.layers)


def export_model(path: str, params, batch_stats, bits: quant.BitConfig, act_ranges, *,
                 symmetric=True) -> dict:
  """Packed weights (``path``) + float32 inference state (``path + '.state'``).

  Returns the file sizes next to the computed size: the packed payload must equal
  ``alloc.model_size_bytes(params, bits)`` (the size the search used).
  """
  info = quant.export_packed(params, bits, path, symmetric=symmetric)
  state = flax.serialization.msgpack_serialize(
      {"batch_stats": jax.device_get(batch_stats),
       "act_ranges": {k: [float(x) for x in v] for k, v in (act_ranges or {}).items()},
       "bits": bits.to_dict()})
  with open(path + ".state", "wb") as f:
    f.write(state)
  computed = alloc.model_size_bytes(params, bits.to_dict(), symmetric=symmetric)
  return {"file_bytes": os.path.getsize(path), "payload_bytes": info["payload_bytes"],
          "header_bytes": info["header_bytes"], "computed_bytes": computed,
          "sizes_agree": info["payload_bytes"] == computed,
          "inference_state_bytes": os.path.getsize(path + ".state")}


def load_exported(path: str):
  """``(variables, bits, act_ranges)`` from :func:`export_model`'s files."""
  params, _ = quant.load_packed(path, return_config=True)
  with open(path + ".state", "rb") as f:
    st = flax.serialization.msgpack_restore(f.read())
  variables = {"params": params}
  if st.get("batch_stats"):
    variables["batch_stats"] = st["batch_stats"]
  ranges = {k: tuple(float(x) for x in (v.values() if isinstance(v, dict) else v))
            for k, v in (st.get("act_ranges") or {}).items()}
  return variables, quant.BitConfig(st["bits"]), ranges


def finetune(ctx: Context, bits: quant.BitConfig, name: str, *, seed: int | None = None,
             force: bool = False) -> dict:
  """Fine-tunes ``bits`` from the FP32 model into ``finetune/<name>/``; returns its result.

  Resumes from the stage's checkpoints if interrupted; skipped if ``result.json`` exists.
  """
  fc = ctx.cfg.finetune
  out = ctx.wd.finetune_dir(name)
  result_path = os.path.join(out, "result.json")
  if not force and os.path.isfile(result_path):
    return read_json(result_path)
  os.makedirs(out, exist_ok=True)
  symmetric = bool(ctx.cfg.search.symmetric)
  train_ds, test_ds = ctx.data()
  t0 = time.time()
  ranges_path = os.path.join(out, "act_ranges.json")
  if any(bits[l]["a"] is not None for l in bits.layers):
    if os.path.isfile(ranges_path):
      ranges = {k: tuple(v) for k, v in read_json(ranges_path).items()}
    else:
      calib = ctx.analysis_batches(fc.calib_examples, min(fc.calib_examples, 128))
      ranges = quant.calibrate(ctx.model, ctx.variables, calib, bits, method=fc.calib_method)
      write_json(ranges_path, ranges)
  else:
    ranges = {}
  apply_fn = qat_apply_fn(ctx.model, bits, ranges, symmetric=symmetric)
  before = ctx.evaluate(apply_fn, ctx.variables)
  ft_cfg = ml_collections.ConfigDict(ctx.cfg.to_dict())
  ft_cfg.seed = ctx.cfg.seed if seed is None else seed
  ft_cfg.learning_rate = fc.learning_rate
  ft_cfg.warmup_steps = fc.warmup_steps
  ft_cfg.weight_decay = fc.weight_decay
  ft_cfg.batch_size = fc.batch_size
  state, res = train.fit(ft_cfg, out, apply_fn=apply_fn, variables=ctx.variables,
                         train_ds=train_ds, test_ds=test_ds, num_epochs=fc.num_epochs,
                         desc=f"finetune {name}", progress=ctx.progress)
  export = export_model(os.path.join(out, "model.amq"), state.params, state.batch_stats, bits,
                        ranges, symmetric=symmetric)
  exp_vars, exp_bits, exp_ranges = load_exported(os.path.join(out, "model.amq"))
  # The exported weights are already on the quantization grid; evaluating them through the
  # same fake-quantized apply must give the fine-tuned accuracy.
  exp_eval = ctx.evaluate(qat_apply_fn(ctx.model, exp_bits, exp_ranges, symmetric=symmetric),
                          exp_vars)
  result = {"method": name, "bits": {l: bits[l]["w"] for l in bits.layers},
            "act_bits": {l: bits[l]["a"] for l in bits.layers},
            "ptq_accuracy": before["accuracy"], "test_accuracy": res["test_accuracy"],
            "test_loss": res["test_loss"], "exported_accuracy": exp_eval["accuracy"],
            "size_mb": export["computed_bytes"] / alloc.MB, "export": export,
            "epochs": fc.num_epochs, "seed": ft_cfg.seed, "seconds": time.time() - t0}
  write_json(result_path, result)
  return result
