"""One training loop for FP32 training, quantization-aware fine-tuning and detection.

:func:`fit` trains any ``loss_fn(params, state, batch, *, train=True)`` on a batch source as
an optimization section of the config says (``config.train`` or ``config.finetune``; the
field list is in :data:`OPTIM_FIELDS` and ``amq_jax/train/_loop.py``), data parallel over
every device, resumable from Orbax checkpoints, with JSON-lines metrics and a NaN guard.
:func:`train_fp32` is the classification FP32 stage built on it.
"""
from amq_jax._io import write_json
from amq_jax._sharding import data_mesh, replicate, shard_batch
from amq_jax.train._checkpoint import CheckpointFallbackWarning, Checkpointer
from amq_jax.train._fp32 import (build_model, input_shape, load_data, load_fp32,
                                 restore_variables, save_variables, shipped_checkpoint,
                                 train_fp32)
from amq_jax.train._loop import (ApplyFn, LossFn, NonFiniteLossError, TrainState,
                                 classification_loss, create_state, evaluate, fit, init_state,
                                 init_variables, linen_apply_fn, make_eval_step, make_step,
                                 make_train_step)
from amq_jax.train._optim import (OPTIM_DEFAULTS, OPTIM_FIELDS, lr_schedule, make_optimizer,
                                  num_train_steps, read_section)

__all__ = ["ApplyFn", "CheckpointFallbackWarning", "Checkpointer", "LossFn",
           "NonFiniteLossError", "OPTIM_DEFAULTS", "OPTIM_FIELDS", "TrainState", "build_model",
           "classification_loss", "create_state", "data_mesh", "evaluate", "fit", "init_state",
           "init_variables", "input_shape", "linen_apply_fn", "load_data", "load_fp32",
           "lr_schedule", "make_eval_step", "make_optimizer", "make_step", "make_train_step",
           "num_train_steps", "read_section", "replicate", "restore_variables",
           "save_variables", "shard_batch", "shipped_checkpoint", "train_fp32", "write_json"]
