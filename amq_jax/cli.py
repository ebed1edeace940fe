"""The ``amq-jax`` command line: parses arguments and calls one function per stage.

    amq-jax train|analyze|search|finetune|run|report --config FILE.py[:VARIANT] --workdir DIR
            [--config.FIELD=VALUE ...] [--json] [--strict] [--debug]

Every command calls the function of the same name in :mod:`amq_jax.pipeline` and prints
its result: as text (a header line, then ``key: value`` lines and aligned tables), or with
``--json`` as ONE JSON object on stdout (progress, warnings and errors go to stderr)::

    {"command": "search",          # the command
     "workdir": "runs/default",    # the work directory as given
     "ok": true,                   # false when the command failed
     "result": {...},              # what the pipeline function returned (null on failure)
     "error": null}                # on failure: {"type": "BudgetError", "message": "...",
                                   #              "exit_status": 2}

Non-finite numbers are written as ``null`` (strict JSON).

Exit status: 0 done; 2 a user error (any :class:`amq_jax.errors.AmqError`, a bad
argument, out of memory, a warning made an error by ``--strict``), printed as one line
``amq-jax <command>: error: <message>``; 1 an internal error (a bug), printed as one line
that points to ``--debug``; 130 interrupted. ``--debug`` prints the traceback of every
error. Warnings print as one line ``amq-jax <command>: warning: <message>``;
``--strict`` makes the near-chance FP32 warning an error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
import warnings
from typing import Any, Mapping, Sequence

from amq_jax.errors import AmqError, BudgetError, NearChanceWarning

__all__ = ["main", "build_parser", "COMMANDS", "UsageError"]

COMMANDS = {
    "train": "train the FP32 model of a config (resumes after interruption)",
    "analyze": "per-layer Hessian traces and top eigenvalues of the FP32 model",
    "search": "exact size-vs-Omega frontier and the bit configuration at a budget",
    "finetune": "quantization-aware fine-tuning of a bit configuration, packed export",
    "run": "everything: FP32 -> analyze -> search -> finetune -> report (cached per stage)",
    "report": "rewrite report.md/json and figures from the finished stages (runs nothing)",
}

# The batch-size fields that matter for each command's memory (the out-of-memory advice).
_MEMORY_FIELDS = {
    "train": ("train.batch_size", "train.eval_batch_size", "batch_size", "eval_batch_size"),
    "analyze": ("hessian.batch_size",),
    "finetune": ("finetune.batch_size", "finetune.eval_batch_size"),
}


class UsageError(AmqError):
  """A command-line argument is missing or malformed (exit status 2)."""


class _Parser(argparse.ArgumentParser):
  """argparse that raises :class:`UsageError` (printed as one line) instead of exiting."""

  def error(self, message):
    raise UsageError(f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- arguments

def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates ``--config.a.b=value`` (or ``--config.a.b value``) overrides from the rest."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
          raise UsageError(f"{a} needs a value: {a}=VALUE")
        body, i = body + "=" + argv[i + 1], i + 1
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def build_parser() -> argparse.ArgumentParser:
  from amq_jax import __version__

  def output_flags(p, default):
    p.add_argument("--json", action="store_true", default=default,
                   help="print one JSON object {command, workdir, ok, result, error} "
                        "instead of text")
    p.add_argument("--strict", action="store_true", default=default,
                   help="make warnings about the run's validity (an FP32 model near chance) "
                        "errors (exit status 2)")
    p.add_argument("--debug", action="store_true", default=default,
                   help="print the traceback of every error")

  parser = _Parser(
      prog="amq-jax", allow_abbrev=False,
      description="Hessian-aware automatic mixed-precision quantization (HAWQ-V2) for JAX/Flax.",
      epilog="Override any config field with --config.FIELD=VALUE (e.g. "
             "--config.finetune.num_epochs=2). Exit status: 0 done, 2 user error, "
             "1 internal error.")
  parser.add_argument("--version", action="version", version=f"amq-jax {__version__}")
  output_flags(parser, False)
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  output_flags(common, argparse.SUPPRESS)  # after the command too, without resetting
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                              parser_class=_Parser)
  for name, help_ in COMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_, parents=[common],
                       allow_abbrev=False)
    p.add_argument("--config", required=True,
                   help="config file, e.g. configs/resnet20_fmnist.py (or FILE.py:VARIANT)")
    p.add_argument("--workdir", required=True, help="directory for every output of the run")
    if name == "analyze":
      p.add_argument("--force", action="store_true", help="recompute even if files exist")
    if name in ("search", "run"):
      g = p.add_mutually_exclusive_group()
      g.add_argument("--budget", metavar="BUDGET",
                     help="e.g. 0.08MB, avg:3, uniform:3, bits:2.5M, bops:1.2G "
                          "(default: the config's search.budget)")
      g.add_argument("--avg-bits", metavar="B", help="average weight bits (= --budget avg:B)")
      g.add_argument("--weight-bits", metavar="N",
                     help="total weight bits sum(n_l * b_l), e.g. 2.5M (= --budget bits:N)")
      g.add_argument("--bops", metavar="N",
                     help="bit operations per example, e.g. 1.2G (= --budget bops:N)")
      p.add_argument("--baselines", choices=["default", "all"],
                     help="which baselines to configure (default: the config's)")
    if name == "finetune":
      p.add_argument("--bits", help="bits JSON (default: WORKDIR/search/bits.json)")
      p.add_argument("--name", default=None, help="name of the run under WORKDIR/finetune/")
  return parser


_BUDGET_FLAGS = (("budget", "--budget", ""), ("avg_bits", "--avg-bits", "avg:"),
                 ("weight_bits", "--weight-bits", "bits:"), ("bops", "--bops", "bops:"))


def _budget(args) -> str | None:
  """The budget of ``--budget/--avg-bits/--weight-bits/--bops`` as one budget string,
  checked by the budget grammar (None: the config's budget)."""
  for attr, flag, prefix in _BUDGET_FLAGS:
    raw = getattr(args, attr, None)
    if raw is None:
      continue
    spec = prefix + raw
    if not raw.strip():
      raise BudgetError(f"{flag} {raw!r} is empty; give a budget such as "
                        + ("0.08MB, avg:3, uniform:3, bits:2.5M or bops:1.2G" if not prefix
                           else "3" if prefix == "avg:" else "2.5M"))
    from amq_jax.alloc import parse_budget
    try:
      parse_budget(spec)
    except BudgetError as e:
      raise BudgetError(f"{flag} {raw!r}: {e}") from None
    return spec
  return None


# ----------------------------------------------------------------------------- commands

def _dispatch(args, cfg) -> Any:
  from amq_jax import pipeline
  cmd, wd = args.command, args.workdir
  if cmd == "train":
    return pipeline.train(cfg, wd)
  if cmd == "analyze":
    return pipeline.analyze(cfg, wd, force=args.force)
  if cmd in ("search", "run"):
    if args.baselines:
      cfg.baselines = args.baselines
    fn = pipeline.search if cmd == "search" else pipeline.run
    return fn(cfg, wd, budget=_budget(args), methods=None)
  if cmd == "finetune":
    return pipeline.finetune(cfg, wd, bits=args.bits, name=args.name)
  if cmd == "report":
    return pipeline.report(cfg, wd)
  raise UsageError(f"unknown command {cmd!r}")  # argparse rejects it first


def _precheck(args) -> None:
  """Checks of the arguments that need no config and no model: fail before any work."""
  from amq_jax import _guard
  _guard.check_workdir(args.workdir)
  if getattr(args, "name", None) is not None:
    _guard.safe_name(args.name, what="--name")
  if args.command in ("search", "run"):
    _budget(args)


# ----------------------------------------------------------------------------- output

def _plain(o: Any, depth: int = 0) -> Any:
  """``o`` as strict-JSON data: mappings, lists, finite numbers, text, null."""
  if depth > 50:
    return str(o)
  if o is None or isinstance(o, (bool, str)):
    return o
  if isinstance(o, int):
    return o
  if isinstance(o, float):
    return o if math.isfinite(o) else None
  if isinstance(o, Mapping):
    return {str(k): _plain(v, depth + 1) for k, v in o.items()}
  if isinstance(o, (list, tuple, set, frozenset)):
    return [_plain(v, depth + 1) for v in o]
  if hasattr(o, "tolist"):  # NumPy/JAX arrays and scalars
    return _plain(o.tolist(), depth + 1)
  if hasattr(o, "_asdict"):
    return _plain(o._asdict(), depth + 1)
  return str(o)


def _cell(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, list):
    return ", ".join(_cell(x) for x in v[:12]) + (f", ... ({len(v)} in all)" if len(v) > 12
                                                   else "")
  return str(v)


def _scalar(v) -> bool:
  return v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and "\n" not in v)


def _table(rows: Mapping[str, Mapping], indent: str, max_cols: int = 8) -> list[str]:
  cols: list[str] = []
  for r in rows.values():
    for k, v in r.items():
      if k not in cols and _scalar(v):
        cols.append(k)
  # a column that only repeats the row names says nothing
  cols = [c for c in cols if any(r.get(c) != name for name, r in rows.items())][:max_cols]
  head = [""] + cols
  body = [[str(name)] + [_cell(r.get(c)) for c in cols] for name, r in rows.items()]
  widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]

  def line(cells, numeric):
    return indent + "  ".join(c.rjust(w) if (i and numeric[i]) else c.ljust(w)
                              for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  numeric = [False] + [all(isinstance(r.get(c), (int, float)) or r.get(c) is None
                           for r in rows.values()) for c in cols]
  return [line(head, numeric)] + [line(b, numeric) for b in body]


def _render(result: Any, indent: str = "  ", depth: int = 0) -> list[str]:
  """A result as text lines: ``key: value`` for scalars, aligned tables for mappings of
  records, nested blocks for mappings of scalars; long or deep data is summarized."""
  if not isinstance(result, Mapping):
    return [indent + _cell(result)] if result is not None else []
  out = []
  for k, v in result.items():
    if _scalar(v):
      out.append(f"{indent}{k}: {_cell(v)}")
    elif isinstance(v, str):
      out.append(f"{indent}{k}:")
      out += [indent + "  " + line for line in v.splitlines()]
    elif isinstance(v, list):
      if all(_scalar(x) for x in v):
        out.append(f"{indent}{k}: {_cell(v)}")
      else:
        out.append(f"{indent}{k}: [{len(v)} entries]")
    elif isinstance(v, Mapping) and v and all(isinstance(x, Mapping) for x in v.values()):
      out.append(f"{indent}{k}:")
      out += _table(v, indent + "  ")
    elif isinstance(v, Mapping) and depth < 2:
      out.append(f"{indent}{k}:")
      out += _render(v, indent + "  ", depth + 1)
    else:
      out.append(f"{indent}{k}: {{{len(v)} entries}}" if isinstance(v, Mapping) else
                 f"{indent}{k}: {_cell(v)}")
  return out


# Bulky parts of a result that the text output leaves to the files (--json keeps them).
_TEXT_SKIP = {"search": ("table", "weights", "activations"), "run": ("table",),
              "report": ("table",)}


def _print_text(command: str, workdir: str, result: Any, seconds: float) -> None:
  print(f"amq-jax {command}: done in {seconds:.1f} s (workdir {workdir})")
  if isinstance(result, Mapping):
    skip = _TEXT_SKIP.get(command, ())
    result = {k: v for k, v in result.items() if k not in skip}
  for line in _render(_plain(result)):
    print(line)


# ----------------------------------------------------------------------------- errors

def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _is_oom(e: BaseException) -> bool:
  for x in _chain(e):
    if isinstance(x, MemoryError):
      return True
    names = {c.__name__ for c in type(x).__mro__}
    if names & {"XlaRuntimeError", "JaxRuntimeError"} and (
        "RESOURCE_EXHAUSTED" in str(x) or "Out of memory" in str(x)):
      return True
  return False


def _one_line(text: str) -> str:
  """Joins the lines of a message (each stripped) into one."""
  return " ".join(l.strip() for l in text.splitlines() if l.strip())


def _first_line(e: BaseException, limit: int = 200) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  s = lines[0] if lines else type(e).__name__
  return s if len(s) <= limit else s[:limit - 3] + "..."


def _oom_message(e: BaseException, command: str, cfg) -> str:
  from amq_jax.config import BATCH_SIZE_FIELDS, _get
  fields = _MEMORY_FIELDS.get(command, BATCH_SIZE_FIELDS)
  tips = []
  for f in fields:
    v = _get(cfg, f) if cfg is not None else None
    if isinstance(v, int) and not isinstance(v, bool) and v > 1:
      tips.append(f"--config.{f}={max(1, v // 2)} (now {v})")
  if not tips:
    tips = [f"--config.{f}" for f in fields]
  what = "MemoryError" if isinstance(e, MemoryError) else _first_line(e, 120)
  return (f"out of memory ({what}); lower the batch sizes and re-run (finished stages are "
          f"kept): {' '.join(tips)}")


def _error(e: BaseException, command: str, cfg) -> tuple[int, str, str]:
  """(exit status, error type, one-line message) of an exception."""
  if isinstance(e, NearChanceWarning):
    return 2, type(e).__name__, f"{_first_line(e, 400)} (an error because of --strict)"
  if isinstance(e, AmqError):
    return 2, type(e).__name__, _one_line(str(e))
  if _is_oom(e):
    return 2, "OutOfMemory", _oom_message(e, command, cfg)
  if isinstance(e, KeyboardInterrupt):
    return 130, "KeyboardInterrupt", "interrupted; re-run the same command to resume"
  return 1, type(e).__name__, (f"internal error {type(e).__name__}: {_first_line(e)}; run "
                               "with --debug for the traceback (and please report it)")


def _wants(argv: Sequence[str], flag: str) -> bool:
  return flag in argv  # for failures before the arguments are parsed


def _command_of(argv: Sequence[str]) -> str | None:
  return next((a for a in argv if a in COMMANDS), None)


@contextlib.contextmanager
def _warnings_as_lines(command: str, strict: bool):
  """Each warning as one line on stderr; with ``strict``, NearChanceWarning raises."""
  def show(message, category, filename, lineno, file=None, line=None):
    text = _one_line(str(message))
    ours = category.__module__.startswith("amq_jax") or (
        category is UserWarning and str(filename).startswith(_package_dir()))
    if not ours:
      text = f"{category.__name__}: {text}"
    print(f"amq-jax {command}: warning: {text}", file=sys.stderr)

  with warnings.catch_warnings():
    warnings.showwarning = show
    if strict:
      warnings.simplefilter("error", NearChanceWarning)
    else:
      warnings.simplefilter("default", NearChanceWarning)
    yield


def _package_dir() -> str:
  return os.path.dirname(os.path.abspath(__file__))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns the exit status (0 done, 2 user error, 1 internal error)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  command = _command_of(argv)
  prog = f"amq-jax {command}" if command else "amq-jax"
  as_json, debug, strict = (_wants(argv, "--json"), _wants(argv, "--debug"),
                            _wants(argv, "--strict"))
  workdir, cfg, result = None, None, None
  t0 = time.time()
  try:
    rest, overrides = _split_overrides(argv)
    try:
      args = build_parser().parse_args(rest)
    except SystemExit as e:  # --help, --version: argparse printed them
      return int(e.code or 0)
    as_json, debug, strict = args.json, args.debug, args.strict
    command, workdir = args.command, args.workdir
    prog = f"amq-jax {command}"
    _precheck(args)
    from amq_jax.config import load_config
    cfg = load_config(args.config, overrides)
    from amq_jax import _hostdev
    _hostdev.configure(cfg)  # before the first JAX computation: one CPU device per core
    with _warnings_as_lines(command, strict):
      if as_json:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON object
          result = _dispatch(args, cfg)
      else:
        result = _dispatch(args, cfg)
  except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes one line
    status, kind, message = _error(e, command, cfg)
    if debug:
      traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr)
    if as_json:
      print(json.dumps({"command": command, "workdir": workdir, "ok": False, "result": None,
                        "error": {"type": kind, "message": message, "exit_status": status}}))
    return status
  if as_json:
    print(json.dumps({"command": command, "workdir": workdir, "ok": True,
                      "result": _plain(result), "error": None}, allow_nan=False))
  else:
    _print_text(command, workdir, result, time.time() - t0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
