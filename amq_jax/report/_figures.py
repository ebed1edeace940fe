"""Matplotlib figures of a run (Agg backend; each written atomically)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_MARKERS = {"hawq_v2": ("*", "C3"), "uniform": ("s", "C0"), "uniform_above": ("s", "C9"),
            "weight_norm": ("^", "C2"), "hawq_v1": ("D", "C1"), "high_omega": ("v", "C4")}


def _save(fig, path):
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def plot_spectra(spectra: dict, path: str) -> None:
  """Top-k Hessian eigenvalues of chosen layers (the seed's Fig. 1)."""
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, s in spectra.items():
    v = np.asarray(s["values"])
    ax.plot(np.arange(1, len(v) + 1), v, "o-", ms=3, label=name.removesuffix("/kernel"))
  ax.set_xlabel("eigenvalue index")
  ax.set_ylabel("Hessian eigenvalue")
  ax.set_title("Top Hessian eigenvalues per layer")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  _save(fig, path)


def plot_frontier(front: dict, path: str, accuracies: dict | None = None) -> None:
  """Size vs total Omega: the exact frontier, uniform widths and every method's point."""
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(front["size_mb"], front["omega"], "-", color="0.5", lw=1,
          label=f"HAWQ-V2 frontier ({front['num_points']} points)")
  for b, p in front["uniform"].items():
    if p["omega"] is not None:
      ax.plot(p["size_mb"], p["omega"], "o", color="0.2", ms=4)
      ax.annotate(f"{b}-bit", (p["size_mb"], p["omega"]), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
  for name, p in front["methods"].items():
    if p["omega"] is None:
      continue
    mk, col = _MARKERS.get(name, ("x", "0.4"))
    label = name if not accuracies or name not in accuracies else \
        f"{name} ({100 * accuracies[name]:.2f}%)"
    ax.plot(p["size_mb"], p["omega"], mk, color=col, ms=9 if mk == "*" else 6, label=label)
  ax.axvline(front["budget"]["size_mb"], color="C3", ls=":", lw=1, label="budget")
  ax.set_yscale("log")
  ax.set_xlabel("model size (MB)")
  ax.set_ylabel("total perturbation Omega")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  _save(fig, path)


def plot_bits(layers, records: dict, path: str) -> None:
  """Weight bits per layer for each method (grouped bars)."""
  names = list(records)
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 3.5))
  w = 0.8 / max(1, len(names))
  x = np.arange(len(layers))
  for k, n in enumerate(names):
    ax.bar(x + k * w, [records[n]["bits"][l] for l in layers], w, label=n,
           color=_MARKERS.get(n, (None, None))[1])
  ax.set_xticks(x + 0.4 - w / 2)
  ax.set_xticklabels(layers, rotation=90, fontsize=6)
  ax.set_ylabel("weight bits")
  ax.legend(fontsize=7)
  _save(fig, path)


def plot_accuracy(results: dict, path: str, fp32: float | None = None) -> None:
  """Top-1 accuracy vs size for every fine-tuned configuration."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, r in results.items():
    mk, col = _MARKERS.get(name.split("_seed")[0], ("x", "0.4"))
    ax.plot(r["size_mb"], 100 * r["test_accuracy"], mk, color=col, label=name)
  if fp32 is not None:
    ax.axhline(100 * fp32, color="k", ls="--", lw=1, label="FP32")
  ax.set_xlabel("model size (MB)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  _save(fig, path)


def plot_top_eigs(top1: dict, path: str) -> None:
  """Top Hessian eigenvalue and average trace of each layer."""
  names = [k.removesuffix("/kernel") for k in top1]
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
  ax.bar(np.arange(len(names)), [v["value"] for v in top1.values()], color="C1")
  ax.set_yscale("log")
  ax.set_xticks(np.arange(len(names)))
  ax.set_xticklabels(names, rotation=90, fontsize=6)
  ax.set_ylabel("top Hessian eigenvalue")
  _save(fig, path)
