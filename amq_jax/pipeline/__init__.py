"""The stages of a run, each reading and writing files in a work directory.

>>> from amq_jax import pipeline
>>> ctx = pipeline.Context(cfg, 'runs/default')      # FP32 model (trained if missing)
>>> pipeline.analyze(ctx); pipeline.search(ctx); ...
>>> report = pipeline.run(cfg, 'runs/default')       # everything, cached per stage
"""
from amq_jax.pipeline._analyze import analyze
from amq_jax.pipeline._common import Context, Workdir
from amq_jax.pipeline._finetune import export_model, finetune, load_bits, load_exported, qat_apply_fn
from amq_jax.pipeline._run import run
from amq_jax.pipeline._search import (ALL_METHODS, DEFAULT_METHODS, BudgetError, Problem,
                                      auto_bits, search)

__all__ = ["Context", "Workdir", "analyze", "search", "finetune", "run", "load_bits",
           "export_model", "load_exported", "qat_apply_fn", "Problem", "BudgetError",
           "ALL_METHODS", "DEFAULT_METHODS", "auto_bits"]
