"""Bit allocation: layer costs, Omega tables, the exact cost-vs-Omega Pareto frontier.

Host-side NumPy; only :func:`layer_costs` (reads shapes from a model) and
:func:`quant_errors` (runs the quantizer) touch JAX.

>>> from amq_jax import alloc
>>> layers, bits, omega = alloc.omega_table(params, layers, (2, 4, 8), avg_traces=traces)
>>> costs = alloc.size_cost_table([c.params for c in lc.values()], bits)
>>> front = alloc.pareto_front(costs, omega, pinned={0: 2, len(layers) - 1: 2})
>>> point = front.at_budget(alloc.mb_to_budget(1.0, alloc.fixed_size_bytes(params, layers)))

Budgets and the methods that choose widths (weights or activations, one grammar):

>>> pb = alloc.Problem(layers, counts, (2, 3, 4, 8), errors, avg_traces=traces,
...                    fixed_bytes=fixed, pinned=alloc.pins_first_last(layers, 8))
>>> pb.select('0.08MB')                                  # HAWQ-V2 widths in layer order
>>> alloc.choose(pb, 'avg:3', ('hawq_v2', 'uniform', 'random'))
"""
from amq_jax.errors import BudgetError
from amq_jax.alloc._budget import BUDGET_FORMS, BUDGET_KINDS, Budget, parse_budget
from amq_jax.alloc._costs import (MB, LayerCost, average_bits, avg_bits_to_budget, bops,
                                  bops_cost_table, fixed_size_bytes, layer_costs, mb_to_budget,
                                  model_size_bytes, model_size_mb, size_bits, size_cost_table)
from amq_jax.alloc._omega import omega_from, omega_table, quant_errors
from amq_jax.alloc._frontier import (Frontier, FrontierPoint, monotone_front, pareto_filter,
                                     pareto_front)
from amq_jax.alloc._problem import SENSITIVITIES, Problem
from amq_jax.alloc._baselines import (DEFAULT_METHODS, METHODS, allocate, auto_bits, choose,
                                      high_omega, pins_first_last, random_bits, uniform_around)

__all__ = [
    "LayerCost", "layer_costs", "size_bits", "bops", "model_size_bytes", "model_size_mb",
    "fixed_size_bytes", "size_cost_table", "bops_cost_table", "mb_to_budget",
    "avg_bits_to_budget", "average_bits", "MB",
    "omega_table", "quant_errors", "omega_from",
    "Frontier", "FrontierPoint", "pareto_front", "monotone_front", "pareto_filter",
    "Budget", "parse_budget", "BudgetError", "BUDGET_KINDS", "BUDGET_FORMS",
    "Problem", "SENSITIVITIES", "METHODS", "DEFAULT_METHODS", "choose", "allocate",
    "uniform_around", "high_omega", "random_bits", "pins_first_last", "auto_bits",
]
