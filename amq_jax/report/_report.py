"""``report.md`` + ``report.json`` of a run, written atomically, with figures beside them."""
from __future__ import annotations

import json
import os

from amq_jax.report._figures import plot_accuracy, plot_bits, plot_frontier, plot_top_eigs


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.4g}"


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_report(root: str, *, config_name: str, fp32: dict, frontier: dict, records: dict,
                 results: dict, eigen: dict | None, traces: dict | None, timings: dict) -> dict:
  """Writes ``root/report.{md,json}`` and ``root/figures/*.png``; returns the JSON object.

  Args:
    fp32: ``{'test_accuracy', 'size_mb', 'source'}`` of the float model.
    frontier: ``search/frontier.json``. records: method -> ``search/methods/<m>.json``.
    results: method -> fine-tuning result (``finetune/<m>/result.json``).
    eigen, traces: the analysis files (or None). timings: stage -> seconds.
  """
  figs = os.path.join(root, "figures")
  os.makedirs(figs, exist_ok=True)
  acc = {m: r["test_accuracy"] for m, r in results.items()}
  plot_frontier(frontier, os.path.join(figs, "frontier.png"), accuracies=acc)
  plot_bits(frontier["layers"], records, os.path.join(figs, "bits.png"))
  if results:
    plot_accuracy(results, os.path.join(figs, "accuracy_vs_size.png"), fp32.get("test_accuracy"))
  if eigen:
    plot_top_eigs(eigen["top1"], os.path.join(figs, "top_eigenvalues.png"))

  rows = []
  for m, rec in records.items():
    r = results.get(m)
    rows.append({"method": m, "size_mb": rec["size_mb"], "avg_bits": rec["avg_bits"],
                 "omega": rec["omega_hawq_v2"],
                 "ptq_accuracy": r["ptq_accuracy"] if r else None,
                 "accuracy": r["test_accuracy"] if r else None,
                 "exported_accuracy": r["exported_accuracy"] if r else None,
                 "file_bytes": r["export"]["file_bytes"] if r else None,
                 "computed_bytes": r["export"]["computed_bytes"] if r else None,
                 "payload_bytes": r["export"]["payload_bytes"] if r else None})
  report = {"config": config_name, "fp32": fp32, "budget": frontier["budget"],
            "frontier_points": frontier["num_points"], "methods": rows, "timings_s": timings,
            "bits": {m: rec["bits"] for m, rec in records.items()}}
  pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
  md = [f"# amq-jax report: {config_name}", "",
        f"FP32 model: top-1 {pct(fp32.get('test_accuracy'))}%, {fp32.get('size_mb', 0):.4f} MB "
        f"({fp32.get('source')}).",
        f"Budget: {frontier['budget']['description']} = {frontier['budget']['size_mb']:.4f} MB. "
        f"Exact frontier: {frontier['num_points']} configurations, found in "
        f"{1e3 * frontier['frontier_seconds']:.1f} ms.", "",
        "| method | size (MB) | avg bits | Omega | PTQ top-1 (%) | QAT top-1 (%) | exported top-1 (%) | file bytes (payload = computed) |",
        "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    fb = "-" if r["file_bytes"] is None else f"{r['file_bytes']} ({'yes' if r['computed_bytes'] == r['payload_bytes'] else 'NO'})"
    md.append(f"| {r['method']} | {r['size_mb']:.4f} | {r['avg_bits']:.3f} | "
              f"{_fmt(r['omega'])} | "
              f"{pct(r['ptq_accuracy'])} | {pct(r['accuracy'])} | {pct(r['exported_accuracy'])} | {fb} |")
  md += ["", "Omega is HAWQ-V2's total perturbation sum_l Tr(H_l)/n_l ||Q(W_l)-W_l||^2 of each "
         "configuration (lower is better). PTQ: quantized without fine-tuning.", "",
         "## Bits per layer", "", "![bits](figures/bits.png)", "",
         "| layer | " + " | ".join(records) + " |", "|---|" + "---|" * len(records)]
  for l in frontier["layers"]:
    md.append(f"| {l} | " + " | ".join(str(records[m]["bits"][l]) for m in records) + " |")
  md += ["", "## Frontier", "", "![frontier](figures/frontier.png)", ""]
  if results:
    md += ["![accuracy](figures/accuracy_vs_size.png)", ""]
  if traces:
    md += ["## Hessian traces", "",
           f"Estimator {traces['estimator']}, {traces['num_examples']} examples, relative "
           f"standard error target {traces['rtol']}.", "",
           "| layer | Tr(H) | std. error | probes | Tr(H)/n |", "|---|---|---|---|---|"]
    for p, e in traces["layers"].items():
      md.append(f"| {p.removesuffix('/kernel')} | {e['trace']:.4g} | {e['stderr']:.2g} | "
                f"{e['probes']} | {e['avg_trace']:.4g} |")
    md.append("")
  if eigen:
    md += ["## Top eigenvalues", "", "![top](figures/top_eigenvalues.png)", ""]
    for p, s in eigen["spectra"].items():
      v = s["values"]
      md.append(f"- {p.removesuffix('/kernel')}: top {len(v)} = "
                + ", ".join(f"{x:.3g}" for x in v[:20])
                + (f" (top/second = {s['top_over_second']:.2f})" if s.get("top_over_second") else ""))
    md.append("")
  md += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
  md += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
  _atomic_write(os.path.join(root, "report.json"), json.dumps(report, indent=2, default=float))
  _atomic_write(os.path.join(root, "report.md"), "\n".join(md) + "\n")
  return report
