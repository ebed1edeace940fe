"""The run report: ``report.md`` for people, ``report.json`` for programs, figures.

One writer for every task: the metric is named by the task ('accuracy', 'mAP'); with
several fine-tuning seeds the report gives mean +- std; each stage's fingerprint and
whether it was reused is listed, and the report refuses to pair results of different
configurations (the caller passes only fine-tunes whose fingerprint matches the search).
"""
from __future__ import annotations

import os

import numpy as np

from amq_jax import _io

__all__ = ["write_report"]


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.4g}"


def _stats(values) -> dict | None:
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return None
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "n": int(v.size)}


def _status_notes(traces: dict, chosen: dict) -> list[str]:
  """Warnings, by layer, where a choice of bits rests on an unconverged, negative or
  near-zero trace estimate."""
  notes = []
  for name, e in traces.get("layers", {}).items():
    st = e.get("status", "converged" if e.get("converged", True) else "max_probes")
    if st == "converged":
      continue
    widths = sorted({c[name]["w"] for c in chosen.values() if name in c})
    why = {"max_probes": f"stopped at max_probes ({e.get('probes')}) with relative standard "
                         f"error {abs(e.get('stderr', 0)) / max(abs(e.get('trace', 0)), 1e-30):.2f}",
           "negative": "negative estimate (its sensitivity is floored: see "
                       "hessian.sensitivity_traces)",
           "near_zero": "estimate indistinguishable from zero (floored likewise)"}.get(st, st)
    notes.append(f"- **{name}**: {why}; widths chosen for it: {widths}")
  return notes


def _compare_section(cc: dict) -> list[str]:
  """Markdown of ``search/curvature_compare.json``: both curvatures side by side."""
  a, b = cc["curvature"], cc["compare"]
  name = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}
  na, nb = name.get(a, a), name.get(b, b)
  n, k = cc["layers_compared"], cc["layers_differ"]
  md = [f"## Curvature: {na} vs {nb}", "",
        f"Spearman rank correlation across {n} layers: {_fmt(cc['spearman_trace'])} "
        f"(traces), {_fmt(cc['spearman_avg_trace'])} (per-parameter traces Tr/n, what Omega "
        f"uses). At the budget `{cc['budget']}`, HAWQ-V2 on the {nb} picks another width for "
        f"{k} of {n} layers" + (f" ({', '.join(cc['differ'])})" if cc["differ"] else "")
        + f"; the search above uses the {na}.", "",
        f"| bits picked by | avg bits | Omega under {na} | Omega under {nb} |",
        "|---|---|---|---|"]
  for c in (a, b):
    p = cc["picks"][c]
    md.append(f"| {name.get(c, c)} | {p['avg_bits']:.3f} | {_fmt(p['omega'][a])} | "
              f"{_fmt(p['omega'][b])} |")
  md += ["", f"| layer | Tr {na} | Tr {nb} | {nb} / {na} | status {na} / {nb} | "
         f"bits {na} / {nb} |", "|---|---|---|---|---|---|"]
  for l, r in cc["layers"].items():
    bits = r.get("bits", {})
    md.append(f"| {l} | {r['trace'][a]:.4g} | {r['trace'][b]:.4g} | {_fmt(r['ratio'])} | "
              f"{r['status'][a]} / {r['status'][b]} | {bits.get(a, '-')} / {bits.get(b, '-')}"
              " |")
  return md + [""]


def write_report(root: str, *, config_name: str, metric: str, fp32: dict, search: dict,
                 results: dict, analysis: dict, stages: dict, reused: dict,
                 frontier_plot: dict, curvature_compare: dict | None = None) -> dict:
  """Writes ``root/report.{md,json}`` and ``root/figures/*.png``; returns the JSON object.

  Args:
    metric: the task's metric ('accuracy' or 'mAP'). fp32: ``fp32/eval.json``.
    search: ``search/frontier.json``. results: ``{method: [result per seed]}``.
    analysis: ``{'traces', 'eigenvalues'?, 'activations'?}``. stages: ``stages.json``;
    reused: ``{stage: reused in this invocation}``. frontier_plot: the frontier figure's data.
    curvature_compare: ``search/curvature_compare.json`` (hessian.compare), or None.
  """
  from amq_jax.report import _figures
  figs = os.path.join(root, "figures")
  os.makedirs(figs, exist_ok=True)
  recs = search["methods"]
  w = search["weights"]
  summary = {m: _stats([r[metric] for r in rs]) for m, rs in results.items()}
  acc = {m: s["mean"] for m, s in summary.items() if s}
  drawn = []
  for name, fn in (("frontier.png", lambda p: _figures.plot_frontier(frontier_plot, p,
                                                                     accuracies=acc)),
                   ("bits.png", lambda p: _figures.plot_bits(w["layers"], {
                       m: {"bits": r["bits"]} for m, r in recs.items()}, p))):
    try:
      fn(os.path.join(figs, name))
      drawn.append(name)
    except Exception as e:  # noqa: BLE001 - a figure must never lose the report
      print(f"warning: figure {name} not drawn: {e}")
  rows = []
  for m, rec in recs.items():
    rs = results.get(m, [])
    rows.append({
        "method": m, "size_mb": rec["size_mb"], "avg_bits": rec["avg_bits"],
        "omega": rec["omega"].get("hawq_v2"),
        "act_avg_bits": rec.get("act", {}).get("avg_bits"),
        "omega_act": (rec.get("act", {}).get("omega") or {}).get("hawq_v2"),
        f"ptq_{metric}": _stats([r[f"ptq_{metric}"] for r in rs]),
        metric: summary.get(m),
        f"exported_{metric}": _stats([r[f"exported_{metric}"] for r in rs]),
        "sizes_agree": all(r["export"]["sizes_agree"] for r in rs) if rs else None,
        "file_bytes": rs[0]["export"]["file_bytes"] if rs else None,
        "seeds": [r["seed"] for r in rs]})
  traces = analysis.get("traces", {})
  report = {"config": config_name, "metric": metric, "fp32": fp32, "budget": w["budget"],
            "activation_budget": (search.get("activations") or {}).get("budget"),
            "frontier_points": w["frontier"]["points"], "methods": rows,
            "curvature": traces.get("curvature", "hessian"),
            # the integer grid the search's Omega and the fine-tunes used (frontier.json)
            "grid": search.get("grid", "amq"),
            "trace_status": {k: v.get("status") for k, v in traces.get("layers", {}).items()},
            "bits": {m: rec["config"] for m, rec in recs.items()},
            "stages": {k: {"fingerprint": v.get("fingerprint"), "seconds": v.get("seconds"),
                           "reused": reused.get(k, True)} for k, v in stages.items()}}
  pct = (lambda s: "-" if s is None else (
      f"{100 * s['mean']:.2f}" + (f" +- {100 * s['std']:.2f}" if s["n"] > 1 else ""))) \
      if metric == "accuracy" else (lambda s: "-" if s is None else (
          f"{s['mean']:.4f}" + (f" +- {s['std']:.4f}" if s["n"] > 1 else "")))
  unit = " (%)" if metric == "accuracy" else ""
  fm = fp32[metric]
  fline = (f"FP32 model: {metric} " + (f"{100 * fm:.2f}%" if metric == "accuracy" else
                                         f"{fm:.4f}")
           + f", {fp32.get('size_mb', 0):.4f} MB ({fp32.get('source')}).")
  md = [f"# amq-jax report: {config_name}", "", fline, ""]
  md += [f"Budget: `{w['budget']['spec']}` ({w['budget']['description']}). Exact frontier: "
         f"{w['frontier']['points']} configurations, found in {1e3 * w.get('seconds', 0):.1f} ms. "
         f"Curvature: **{report['curvature']}** ({traces.get('estimator')}, "
         f"{traces.get('num_examples')} examples). Integer grid: **{report['grid']}**"
         + (" (qwix's, as the model deploys with qwix)" if report["grid"] == "qwix" else "")
         + ".", ""]
  if search.get("activations"):
    a = search["activations"]
    md += [f"Activation budget `{a['budget']['spec']}` ({a['budget']['description']}); "
           f"activation widths {a['bit_choices']}, pinned {a['pinned']}.", ""]
  head = (f"| method | size (MB) | avg bits | Omega | PTQ {metric}{unit} | QAT {metric}{unit} | "
          f"exported {metric}{unit} | payload = computed size |")
  md += [head, "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    agree = "-" if r["sizes_agree"] is None else ("yes" if r["sizes_agree"] else "NO")
    md.append(f"| {r['method']} | {r['size_mb']:.4f} | {r['avg_bits']:.3f} | {_fmt(r['omega'])} | "
              f"{pct(r[f'ptq_{metric}'])} | {pct(r[metric])} | {pct(r[f'exported_{metric}'])} | "
              f"{agree} |")
  md += ["", "Omega is HAWQ-V2's total perturbation sum_l Tr(H_l)/n_l ||Q(W_l)-W_l||^2 "
         "(lower is better). PTQ: quantized without fine-tuning. With several seeds: "
         "mean +- std over fine-tuning seeds.", ""]
  notes = _status_notes(traces, {m: rec["config"] for m, rec in recs.items()})
  if notes:
    md += ["## Warnings: estimates the bits rest on", ""] + notes + [""]
  md += ["## Bits per layer (w, and a where searched)", ""]
  if "bits.png" in drawn:
    md += ["![bits](figures/bits.png)", ""]
  md += ["| layer | " + " | ".join(recs) + " |", "|---|" + "---|" * len(recs)]
  for l in w["layers"]:
    md.append(f"| {l} | " + " | ".join(
        f"{recs[m]['config'][l]['w']}" + (f" / a{recs[m]['config'][l]['a']}"
                                          if search.get("activations") else "")
        for m in recs) + " |")
  if "frontier.png" in drawn:
    md += ["", "## Frontier", "", "![frontier](figures/frontier.png)", ""]
  if traces:
    md += ["## Curvature traces", "",
           "| layer | Tr | std. error | probes | status | Tr/n |", "|---|---|---|---|---|---|"]
    for p, e in traces["layers"].items():
      md.append(f"| {p} | {e['trace']:.4g} | {e['stderr']:.2g} | {e['probes']} | "
                f"{e.get('status', 'converged' if e.get('converged', True) else 'max_probes')} "
                f"| {e['avg_trace']:.4g} |")
    md.append("")
  if curvature_compare:
    report["curvature_compare"] = curvature_compare
    md += _compare_section(curvature_compare)
  eig = analysis.get("eigenvalues")
  if eig:
    md += ["## Top eigenvalues", ""]
    for p, s in eig["spectra"].items():
      v = s["values"]
      md.append(f"- {p}: top {len(v)} = " + ", ".join(f"{x:.3g}" for x in v[:20])
                + (f" (top/second = {s['top_over_second']:.2f})" if s.get("top_over_second") else ""))
    md.append("")
  md += ["## Stages", "", "| stage | seconds | this invocation |", "|---|---|---|"]
  for k, v in report["stages"].items():
    md.append(f"| {k} | {_fmt(v['seconds'])} | {'reused' if v['reused'] else 'computed'} |")
  _io.write_json(os.path.join(root, "report.json"), report)
  _io.write_text(os.path.join(root, "report.md"), "\n".join(md) + "\n")
  return report
