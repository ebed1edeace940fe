"""Reports of a run: Markdown + JSON, and Matplotlib figures."""
from amq_jax.report._figures import (frontier_view, plot_accuracy, plot_bits, plot_frontier,
                                     plot_spectra, plot_top_eigs)
from amq_jax.report._report import write_report

__all__ = ["frontier_view", "plot_accuracy", "plot_bits", "plot_frontier", "plot_spectra",
           "plot_top_eigs", "write_report"]
