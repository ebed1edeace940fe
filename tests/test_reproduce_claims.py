"""The statistics and tables of examples/reproduce_claims.py (issue 12), without a sweep."""
import importlib.util
import os

import numpy as np
import pytest
from scipy.stats import spearmanr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "reproduce_claims", os.path.join(ROOT, "examples", "reproduce_claims.py"))
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)


def test_paired_verdicts():
  assert rc.paired([0.92, 0.93, 0.925], [0.90, 0.905, 0.90])["verdict"] == "holds"
  assert rc.paired([0.90, 0.905, 0.90], [0.92, 0.93, 0.925])["verdict"] == "reversed"
  r = rc.paired([0.92, 0.90, 0.93], [0.91, 0.92, 0.91])
  assert r["verdict"] == "no difference" and r["ci_pp"][0] < 0 < r["ci_pp"][1]
  # the t-interval by hand: mean +- t(0.975, 2) * sd / sqrt(3)
  d = np.array([0.01, -0.02, 0.02])
  half = 4.303 * d.std(ddof=1) / np.sqrt(3)
  np.testing.assert_allclose(r["ci_pp"], [100 * (d.mean() - half), 100 * (d.mean() + half)])
  assert rc.paired([0.9], [0.8])["verdict"] == "too few seeds"


def test_spearman_and_bootstrap():
  rng = np.random.default_rng(0)
  x = rng.normal(size=40)
  y = -x + 0.3 * rng.normal(size=40)
  assert rc.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
  lo, hi = rc.bootstrap_ci(x, y, n=300)
  assert lo <= rc.spearman(x, y) <= hi < 0
  assert np.isnan(rc.spearman(x, np.ones(40)))


def test_markdown_flags_unequal_sizes_and_sorts_by_accuracy():
  row = lambda size, ptq, acc: {"size_mb": size, "avg_bits": 3.0, "omega": {"hawq_v2": 0.1},  # noqa
                                "ptq": ptq, "qat_mean": float(np.mean(acc)),
                                "qat_std": float(np.std(acc, ddof=1)), "qat": acc}
  rows = {"hawq_v2": row(0.1109, 0.92, [0.93, 0.931, 0.929]),
          "uniform": row(0.0777, 0.10, [0.89, 0.9, 0.895]),
          "weight_norm": row(0.1109, 0.91, [0.94, 0.94, 0.941])}
  claims = {k: dict(rc.paired(rows[a]["qat"], rows[b]["qat"]), same_configuration=False)
            for k, (a, b) in rc.PAIRS.items() if a in rows and b in rows}
  md = rc.to_markdown({"curvature": "ggn", "seeds": 3, "epochs": 0.1,
                       "budgets": {"avg:3": {"rows": rows, "claims": claims}}})
  lines = md.splitlines()
  order = [l.split("|")[1].strip() for l in lines if l.startswith("| ") and "MB" not in l
           and l.split("|")[1].strip() in rows]
  assert order == ["weight_norm", "hawq_v2", "uniform"]
  uni = next(l for l in lines if l.startswith("| hawq_v2_vs_uniform"))
  assert "sizes differ" in uni and "holds" in uni
  wn = next(l for l in lines if l.startswith("| a_trace_vs_weight_norm"))
  assert "sizes differ" not in wn and "reversed" in wn


def test_spearman_ties_share_their_mean_rank():
  x, y = [0.1, 0.2, 0.3, 0.4, 0.5], [0.9, 0.9, 0.8, 0.8, 0.7]
  assert rc.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
