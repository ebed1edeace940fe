"""FP32 training, quantization-aware fine-tuning and evaluation (optax, Orbax)."""
from amq_jax.train._checkpoint import Checkpointer
from amq_jax.train._fp32 import (build_model, input_shape, load_data, load_fp32,
                                 restore_variables, save_variables, shipped_checkpoint,
                                 train_fp32, write_json)
from amq_jax.train._loop import (NonFiniteLossError, TrainState, create_state, evaluate,
                                 fit, init_variables, linen_apply_fn, make_eval_step,
                                 make_optimizer, make_train_step)
from amq_jax.train._sharding import data_mesh, replicate, shard_batch

__all__ = ["Checkpointer", "NonFiniteLossError", "TrainState", "build_model", "create_state",
           "data_mesh", "evaluate", "fit", "init_variables", "input_shape", "linen_apply_fn",
           "load_data", "load_fp32", "make_eval_step", "make_optimizer", "make_train_step",
           "replicate", "restore_variables", "save_variables", "shard_batch",
           "shipped_checkpoint", "train_fp32", "write_json"]
