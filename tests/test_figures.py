"""Figures return a Figure, save only when given a path, read well, and leave the backend
alone (issue 11)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from amq_jax import report

LAYERS = ["stem_conv", "stage1_block1/conv1", "stage1_block1/conv2", "head"]
FRONT = {"size_mb": [0.010, 0.012, 0.015, 0.020], "omega": [9.0, 3.0, 1.0, 0.2],
         "num_points": 4, "uniform": {"4": {"size_mb": 0.012, "omega": 4.0},
                                      "8": {"size_mb": 0.020, "omega": 0.01}},
         "methods": {"hawq_v2": {"size_mb": 0.012, "omega": 3.0},
                     "uniform": {"size_mb": 0.012, "omega": 4.0}},
         "budget": {"size_mb": 0.012}}
RECORDS = {"hawq_v2": {"bits": {"stem_conv": 8, "stage1_block1/conv1": 2,
                                "stage1_block1/conv2": {"w": 3, "a": 8}, "head": 4}},
           "uniform": {"bits": {l: 4 for l in LAYERS}}}
RESULTS = {"hawq_v2_seed0": {"size_mb": 0.00303, "test_accuracy": 0.91},
           "uniform_seed0": {"size_mb": 0.00307, "test_accuracy": 0.89}}
SPECTRA = {"stem_conv/kernel": {"values": [12.0, 5.0, 2.5, 1.0]},
           "head/kernel": {"values": [3.0, 1.5, 0.4, 0.1]}}
TOP1 = {f"{l}/kernel": {"value": v} for l, v in zip(LAYERS, [10.0, 2.0, 0.5, 4.0])}

CALLS = {
    "eigenvalues": lambda p: report.plot_spectra(SPECTRA, p),
    "frontier": lambda p: report.plot_frontier(FRONT, p, accuracies={"hawq_v2": 0.9}),
    "bits": lambda p: report.plot_bits(LAYERS, RECORDS, p),
    "accuracy_vs_size": lambda p: report.plot_accuracy(RESULTS, p, fp32=0.92),
    "top_eigenvalues": lambda p: report.plot_top_eigs(TOP1, p),
}


def _drawn(fig):
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return canvas.get_renderer()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_returns_a_labelled_figure_and_saves_only_when_asked(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  fig = CALLS[name](None)
  assert isinstance(fig, Figure)
  assert list(tmp_path.iterdir()) == []  # nothing written without a path
  ax = fig.axes[0]
  assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
  _drawn(fig)
  labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
  assert labels, "no tick labels"
  out = tmp_path / "sub" / f"{name}.png"
  assert isinstance(CALLS[name](str(out)), Figure)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(out.parent)) == [out.name]  # no temporary file left
  svg = tmp_path / f"{name}.svg"
  CALLS[name](svg)
  assert b"<svg" in svg.read_bytes()[:400]


def test_bits_legend_sits_outside_the_bars():
  fig = report.plot_bits(LAYERS, RECORDS)
  r = _drawn(fig)
  ax = fig.axes[0]
  legend = ax.get_legend()
  assert [t.get_text() for t in legend.get_texts()] == ["hawq_v2", "uniform"]
  assert legend.get_window_extent(r).x0 >= ax.get_window_extent(r).x1
  heights = sorted({p.get_height() for p in ax.patches if np.isfinite(p.get_height())})
  assert heights == [2, 3, 4, 8]  # {'w': 3, 'a': 8} is drawn at its weight width
  ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
  assert all(float(t).is_integer() for t in ticks)


def test_accuracy_vs_size_spans_a_readable_range():
  fig = report.plot_accuracy(RESULTS)
  _drawn(fig)
  ax = fig.axes[0]
  lo, hi = ax.get_xlim()
  center = 0.00305
  assert lo <= 0.00303 - 0.09 * center and hi >= 0.00307 + 0.09 * center
  assert ax.xaxis.get_major_formatter().get_offset() == ""  # plain labels, no '+3.05e-3'
  texts = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
  assert all("e" not in t for t in texts), texts


def test_eigenvalue_index_ticks_are_integers():
  fig = report.plot_spectra({"a": {"values": [5.0, 3.0, 1.0]}})
  _drawn(fig)
  ax = fig.axes[0]
  lo, hi = ax.get_xlim()
  ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
  assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_importing_amq_jax_report_leaves_the_backend_alone():
  code = textwrap.dedent("""
      import sys
      import matplotlib
      matplotlib.use("svg")
      before = matplotlib.get_backend()
      import amq_jax.report as report
      fig = report.plot_spectra({"a": {"values": [2.0, 1.0]}})
      assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())
      assert "matplotlib.pyplot" not in sys.modules
      print(before)
  """)
  env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "svg"


def test_frontier_draws_a_search_result_as_it_is():
  """``plot_frontier(pipeline.search_bits(...))`` works (what a notebook has in hand); the
  uniform point is named by the width of its free layers, not by the pinned 8 bits."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections

  from amq_jax import adapters, hessian, pipeline

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for n in (32, 32, 32):
        x = nn.relu(nn.Dense(n)(x))
      return nn.Dense(10)(x)

  x = jnp.ones((2, 16))
  module = MLP()
  model = adapters.from_linen(module, module.init(jax.random.key(0), x), x)
  traces = {l.param: hessian.TraceEstimate.from_samples([1.0 + i, 1.2 + i, 0.9 + i], l.params)
            for i, l in enumerate(model.layers.values())}
  sc = ml_collections.ConfigDict(dict(bit_choices=(2, 3, 4, 8), pin_first_last=8))
  res = pipeline.search_bits(model, traces, None, None, sc, budget="uniform:3",
                             methods=("hawq_v2", "uniform"))
  view = report.frontier_view(res)
  assert list(view["uniform"]) == ["3"]
  assert view["num_points"] == len(view["size_mb"]) >= 2
  fig = report.plot_frontier(res)
  ax = fig.axes[0]
  assert "3-bit" in [t.get_text() for t in ax.texts]
  lo, hi = ax.get_xlim()
  assert lo < view["methods"]["hawq_v2"]["size_mb"] < hi
  assert lo < view["budget"]["size_mb"] < hi


def test_figures_display_inline_without_pyplot():
  """A notebook shows the returned Figure through its PNG repr (no pyplot, no %matplotlib)."""
  from amq_jax.report import plot_spectra
  fig = plot_spectra({"layer": {"values": [3.0, 2.0, 1.0]}}, None)
  assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
