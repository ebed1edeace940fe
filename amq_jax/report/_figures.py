"""Matplotlib figures of a run; each function returns a ``matplotlib.figure.Figure``.

The backend is left alone: figures are built with ``matplotlib.figure.Figure`` (no pyplot,
no ``matplotlib.use``), so importing amq-jax changes nothing for a notebook user's own
``plt.show()``. In a notebook the returned figure shows when it is a cell's value (or with
``display(fig)``); given a ``path``, a function also writes the figure there (PNG, PDF or
SVG by the extension), atomically through :mod:`amq_jax._io`.

>>> fig = plot_spectra({'conv1/kernel': {'values': [9.1, 4.0, 2.2]}})
>>> fig.axes[0].get_title()
'Top Hessian eigenvalues per layer'
"""
from __future__ import annotations

import io
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from amq_jax._io import write_bytes

__all__ = ["frontier_view", "plot_spectra", "plot_frontier", "plot_bits", "plot_accuracy", "plot_top_eigs"]

_MARKERS = {"hawq_v2": ("*", "C3"), "uniform": ("s", "C0"), "uniform_above": ("s", "C9"),
            "weight_norm": ("^", "C2"), "hawq_v1": ("D", "C1"), "high_omega": ("v", "C4")}
# Legend to the right of the axes, outside the data.
_OUTSIDE = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)


def _png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  return buf.getvalue()


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
  # A Figure made without pyplot has no rich display; give it one, so that a notebook
  # shows the returned figure inline without %matplotlib or pyplot.
  fig._repr_png_ = lambda: _png(fig)
  if path is not None:
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120, bbox_inches="tight")
    write_bytes(path, buf.getvalue())
  return fig


def _plain_ticks(axis) -> None:
  """Tick labels as plain numbers (no '1e-3' or '+3.05e-3' offset text above the axis)."""
  fmt = ScalarFormatter(useOffset=False)
  fmt.set_scientific(False)
  axis.set_major_formatter(fmt)


def _readable_limits(values, *, rel: float = 0.1) -> tuple[float, float] | None:
  """Axis limits around ``values`` at least ``rel`` of their magnitude wide on each side, so
  points of nearly equal size (0.00303 and 0.00307 MB) are not spread across the whole axis."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return None
  lo, hi = float(v.min()), float(v.max())
  pad = max(0.1 * (hi - lo), rel * max(abs(lo), abs(hi)), 1e-12)
  return lo - pad, hi + pad


def _log_if_positive(ax, values) -> None:
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size and np.all(v > 0):
    ax.set_yscale("log")


def plot_spectra(spectra: dict, path: str | os.PathLike | None = None) -> Figure:
  """Top-k Hessian eigenvalues of chosen layers against their index (the seed's Fig. 1).

  Args:
    spectra: ``{layer: {'values': [lambda_1, lambda_2, ...]}}`` (as ``analyze`` writes).
    path: also write the figure there.
  """
  fig = Figure(figsize=(6, 3.5))
  ax = fig.add_subplot()
  for name, s in spectra.items():
    v = np.asarray(s["values"], np.float64)
    ax.plot(np.arange(1, len(v) + 1), v, "o-", ms=3, label=name.removesuffix("/kernel"))
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # eigenvalue 1, 2, 3: no 2.5
  ax.set_xlabel("eigenvalue index (largest first)")
  ax.set_ylabel("Hessian eigenvalue")
  ax.set_title("Top Hessian eigenvalues per layer")
  if spectra:
    ax.legend(**_OUTSIDE)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def frontier_view(search: dict) -> dict:
  """What :func:`plot_frontier` draws of a search result (``pipeline.search_bits``' value or
  ``search/frontier.json``): frontier sizes in MB, the uniform point labelled by the width
  of its free (unpinned) layers, every method's size and Omega, the budget."""
  w = search["weights"]
  fixed = w.get("fixed_bytes", 0.0)
  axis = w["budget"]["axis"]
  to_mb = (lambda c: (fixed + c / 8) / 1e6) if axis == "size" else (lambda c: c)
  pinned = w.get("pinned") or {}
  uni = {}
  for name, rec in search["methods"].items():
    if name == "uniform":
      free = [b for l, b in rec["bits"].items() if l not in pinned] or list(rec["bits"].values())
      uni[str(max(free))] = {"size_mb": rec["size_mb"], "omega": rec["omega"].get("hawq_v2")}
  return {"layers": w["layers"], "bit_choices": w["bit_choices"],
          "budget": {"spec": w["budget"]["spec"], "description": w["budget"]["description"],
                     "size_mb": to_mb(w["budget"]["cost"])},
          "size_mb": [to_mb(c) for c in w["frontier"]["cost"]], "omega": w["frontier"]["omega"],
          "num_points": w["frontier"]["points"], "uniform": uni,
          "methods": {k: {"size_mb": v["size_mb"], "omega": v["omega"].get("hawq_v2")}
                      for k, v in search["methods"].items()}}


def plot_frontier(front: dict, path: str | os.PathLike | None = None,
                  accuracies: dict | None = None) -> Figure:
  """Size vs total Omega: the exact frontier, uniform widths and every method's point.

  Args:
    front: a search result (``pipeline.search_bits``' value, ``search/frontier.json``) or
      its :func:`frontier_view`: ``{'size_mb': [...], 'omega': [...], 'num_points': n,
      'uniform': {bits: {size_mb, omega}}, 'methods': {name: {size_mb, omega}},
      'budget': {'size_mb': ...}}``.
    path: also write the figure there.
    accuracies: ``{method: accuracy in [0, 1]}``, shown in the legend.
  """
  if "weights" in front:
    front = frontier_view(front)
  fig = Figure(figsize=(7, 4))
  ax = fig.add_subplot()
  xs = list(front.get("size_mb", []))
  ys = list(front.get("omega", []))
  ax.plot(xs, ys, "-", color="0.5", lw=1,
          label=f"HAWQ-V2 frontier ({front.get('num_points', len(xs))} points)")
  for b, p in front.get("uniform", {}).items():
    if p.get("omega") is not None:
      ax.plot(p["size_mb"], p["omega"], "o", color="0.2", ms=4)
      ax.annotate(f"{b}-bit", (p["size_mb"], p["omega"]), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
      xs.append(p["size_mb"])
      ys.append(p["omega"])
  for name, p in front.get("methods", {}).items():
    if p.get("omega") is None:
      continue
    mk, col = _MARKERS.get(name, ("x", "0.4"))
    label = name if not accuracies or name not in accuracies else \
        f"{name} ({100 * accuracies[name]:.2f}%)"
    ax.plot(p["size_mb"], p["omega"], mk, color=col, ms=9 if mk == "*" else 6, label=label)
    xs.append(p["size_mb"])
    ys.append(p["omega"])
  budget = (front.get("budget") or {}).get("size_mb")
  if budget is not None:
    ax.axvline(budget, color="C3", ls=":", lw=1, label="budget")
    xs.append(budget)
  lim = _readable_limits(xs, rel=0.02)
  if lim:
    ax.set_xlim(*lim)
  _plain_ticks(ax.xaxis)
  _log_if_positive(ax, ys)
  ax.set_xlabel("model size (MB)")
  ax.set_ylabel("total perturbation Omega")
  ax.set_title("Size vs Omega: frontier and methods")
  ax.legend(**_OUTSIDE)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_bits(layers, records: dict, path: str | os.PathLike | None = None) -> Figure:
  """Weight bits per layer for each method (grouped bars, legend outside the bars).

  Args:
    layers: layer names, in the order of the bars.
    records: ``{method: {'bits': {layer: bits}}}``; a layer a method keeps in float is left
      without a bar.
    path: also write the figure there.
  """
  layers = list(layers)
  names = list(records)
  fig = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2.0), 3.8))
  ax = fig.add_subplot()
  w = 0.8 / max(1, len(names))
  x = np.arange(len(layers))
  top = 0
  for k, n in enumerate(names):
    bits = records[n]["bits"]
    h = [np.nan if bits.get(l) is None else _w_bits(bits[l]) for l in layers]
    top = max([top] + [b for b in h if b == b])
    ax.bar(x + k * w, h, w, label=n, color=_MARKERS.get(n, (None, None))[1])
  ax.set_xticks(x + 0.4 - w / 2)
  ax.set_xticklabels([l.removesuffix("/kernel") for l in layers], rotation=90,
                     fontsize=6 if len(layers) > 20 else 8)
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylim(0, top + 0.5)
  ax.set_xlabel("layer")
  ax.set_ylabel("weight bits")
  ax.set_title("Weight bits per layer")
  if names:
    ax.legend(title="method", **_OUTSIDE)
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def _w_bits(v) -> float:
  """A width from ``8`` or ``{'w': 8, 'a': ...}`` (the two forms of a bit configuration)."""
  return float(v["w"] if isinstance(v, dict) else v)


def plot_accuracy(results: dict, path: str | os.PathLike | None = None,
                  fp32: float | None = None) -> Figure:
  """Top-1 accuracy vs size for every fine-tuned configuration.

  Args:
    results: ``{name: {'size_mb': ..., 'test_accuracy': in [0, 1]}}``; ``name_seedN`` takes
      the marker of ``name``.
    path: also write the figure there.
    fp32: the FP32 accuracy (a dashed line).
  """
  fig = Figure(figsize=(6, 3.8))
  ax = fig.add_subplot()
  for name, r in results.items():
    mk, col = _MARKERS.get(name.split("_seed")[0], ("x", "0.4"))
    ax.plot(r["size_mb"], 100 * r["test_accuracy"], mk, color=col, label=name,
            ms=10 if mk == "*" else 7)
  if fp32 is not None:
    ax.axhline(100 * fp32, color="k", ls="--", lw=1, label="FP32")
  lim = _readable_limits([r["size_mb"] for r in results.values()])
  if lim:
    ax.set_xlim(*lim)
  _plain_ticks(ax.xaxis)
  ax.set_xlabel("model size (MB)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Accuracy vs model size")
  if results or fp32 is not None:
    ax.legend(**_OUTSIDE)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_top_eigs(top1: dict, path: str | os.PathLike | None = None) -> Figure:
  """The top Hessian eigenvalue of each layer (bars; log scale when all are positive).

  Args:
    top1: ``{layer: {'value': lambda_max}}`` (as ``analyze`` writes).
    path: also write the figure there.
  """
  names = [k.removesuffix("/kernel") for k in top1]
  vals = [v["value"] for v in top1.values()]
  fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 1.0), 3.8))
  ax = fig.add_subplot()
  ax.bar(np.arange(len(names)), vals, color="C1")
  _log_if_positive(ax, vals)
  ax.set_xticks(np.arange(len(names)))
  ax.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 20 else 8)
  ax.set_xlabel("layer")
  ax.set_ylabel("top Hessian eigenvalue")
  ax.set_title("Top Hessian eigenvalue per layer")
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)
