"""The work directory: one layout for every task, and a stage cache that notices changes.

Layout (the same for classification and detection)::

    config.json                 the config of the latest run (snapshot)
    fp32/variables.msgpack      the float model (trained here, or a copy of the shipped one)
    fp32/eval.json              its test metrics
    analyze/traces.json         per-layer weight traces (+ status), eigenvalues.json,
                                activations.json (activation traces and errors, if any)
    search/frontier.json, bits.json, methods/<method>.json
    finetune/<method>/seed<k>/  checkpoints, metrics.jsonl, model.amq, result.json
    report.md, report.json, figures/
    stages.json                 fingerprint, seconds and reuse of every stage

Every stage result is recorded in ``stages.json`` under its name with the *fingerprint* of
what produced it: a hash of the config fields the stage reads and of the fingerprints of
the stages it reads. A stage is reused only when its recorded fingerprint equals the one
computed now and its files exist; otherwise its directory is cleared (a fine-tune must
never resume from another configuration's checkpoint) and it runs again, and so does
everything downstream, whose fingerprints include it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

from amq_jax import _io
from amq_jax.errors import StateError

__all__ = ["Workdir", "fingerprint"]


def _canon(obj: Any) -> Any:
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()
  if isinstance(obj, dict):
    return {str(k): _canon(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
  if isinstance(obj, (list, tuple)):
    return [_canon(v) for v in obj]
  if isinstance(obj, float) and obj == int(obj) and abs(obj) < 2**53:
    return int(obj)  # 1.0 and 1 configure the same thing
  return obj


def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-able ``parts`` (dict order and 1 vs 1.0 do not matter)."""
  text = json.dumps(_canon(list(parts)), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class Workdir:
  """Paths of one run's work directory and its stage records (``stages.json``)."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self._stages_path = os.path.join(self.root, "stages.json")
    self.reused: dict[str, bool] = {}

  def path(self, *parts: str, mkdir: bool = True) -> str:
    p = os.path.join(self.root, *parts)
    if mkdir:
      os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

  fp32 = property(lambda self: self.path("fp32", "variables.msgpack"))
  traces = property(lambda self: self.path("analyze", "traces.json"))
  eigenvalues = property(lambda self: self.path("analyze", "eigenvalues.json"))
  activations = property(lambda self: self.path("analyze", "activations.json"))
  frontier = property(lambda self: self.path("search", "frontier.json"))
  bits = property(lambda self: self.path("search", "bits.json"))

  def method_bits(self, method: str) -> str:
    return self.path("search", "methods", f"{method}.json")

  def finetune_dir(self, method: str, seed: int) -> str:
    return os.path.join(self.root, "finetune", method, f"seed{int(seed)}")

  # -- stage records -------------------------------------------------------------------
  def stages(self) -> dict:
    if not os.path.isfile(self._stages_path):
      return {}
    rec = _io.read_json(self._stages_path, what="the stage records",
                        check=lambda o: None if isinstance(o, dict) else "not an object")
    return rec

  def record(self, name: str) -> dict | None:
    return self.stages().get(name)

  def _write_record(self, name: str, rec: dict | None) -> None:
    st = self.stages()
    if rec is None:
      st.pop(name, None)
    else:
      st[name] = rec
    _io.write_json(self._stages_path, st)

  def cached(self, name: str, fp: str, outputs: list[str], compute: Callable[[], Any], *,
             clear: list[str] = (), force: bool = False) -> bool:
    """Runs ``compute()`` unless stage ``name`` was made with fingerprint ``fp`` and all of
    ``outputs`` exist. Before recomputing, ``clear`` (files or directories of this stage)
    are removed, so nothing of another configuration is resumed. Returns True if reused."""
    rec = self.record(name)
    have = all(os.path.exists(p) for p in outputs)
    if not force and rec is not None and rec.get("fingerprint") == fp and have:
      self.reused[name] = True
      return True
    if rec is not None and rec.get("fingerprint") != fp:
      for p in clear:
        if os.path.isdir(p):
          shutil.rmtree(p)
        elif os.path.exists(p):
          os.unlink(p)
    # Mark the stage as started with this fingerprint: a resumed run (killed half-way)
    # continues its own checkpoints; a changed config clears them above.
    self._write_record(name, {"fingerprint": fp, "done": False})
    t0 = time.time()
    compute()
    self._write_record(name, {"fingerprint": fp, "done": True, "seconds": time.time() - t0,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    self.reused[name] = False
    return False

  def check(self, name: str, fp: str) -> None:
    """Raises StateError if stage ``name`` was not made with ``fp`` (report consistency)."""
    rec = self.record(name)
    if rec is None or rec.get("fingerprint") != fp or not rec.get("done"):
      raise StateError(
          f"stage {name!r} in {self.root} was made with another configuration (or did not "
          "finish); run `amq-jax run` (or the stage's command) again to recompute it")
