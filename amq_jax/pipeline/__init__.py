"""One pipeline for every task and model framework.

Commands (config + work directory; each stage cached by a fingerprint of what it reads)::

    from amq_jax import pipeline
    pipeline.run(cfg, 'runs/default')          # FP32 -> analyze -> search -> finetune -> report
    pipeline.analyze(cfg, wd); pipeline.search(cfg, wd, budget='avg:3'); ...

Stages as functions of data (any :class:`amq_jax.adapters.Model` and :class:`Task`)::

    traces = pipeline.analyze_traces(model, task, cfg.hessian)
    res = pipeline.search_bits(model, traces, None, None, cfg.search, budget='avg:3',
                               methods=('hawq_v2', 'uniform'))
    result = pipeline.finetune_bits(model, task, bits, cfg.finetune, 'runs/x', seed=0)
"""
from amq_jax.pipeline._commands import (Experiment, analyze, build, finetune,
                                        format_bits_table, report, run, search, train)
from amq_jax.pipeline._stages import (ALL_METHODS, DEFAULT_METHODS, analyze_activations,
                                      analyze_eigenvalues, analyze_traces, auto_bits, export_model,
                                      finetune_bits, load_exported, search_bits,
                                      weight_problem)
from amq_jax.pipeline._task import Task, classification_task, xent_train_loss
from amq_jax.pipeline._workdir import Workdir, fingerprint

__all__ = ["train", "analyze", "search", "finetune", "run", "report", "build", "Experiment",
           "Task", "classification_task", "xent_train_loss", "Workdir", "fingerprint",
           "analyze_traces", "analyze_eigenvalues", "analyze_activations", "search_bits",
           "finetune_bits", "export_model", "load_exported", "weight_problem",
           "format_bits_table", "auto_bits", "ALL_METHODS", "DEFAULT_METHODS"]
