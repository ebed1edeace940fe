"""The ``amq-jax`` command line: parses arguments and calls one function per stage."""
from __future__ import annotations

import argparse
import json
import os
import sys

COMMANDS = {
    "train": "train the FP32 model of a config (resumes after interruption)",
    "analyze": "per-layer Hessian traces and top eigenvalues of the FP32 model",
    "search": "exact size-vs-Omega frontier and the bit configuration at a budget",
    "finetune": "quantization-aware fine-tuning of a bit configuration, packed export",
    "run": "everything: FP32 -> analyze -> search -> finetune -> report (cached per stage)",
    "report": "rewrite report.md/json and figures from the finished stages (runs nothing)",
}


def _split_overrides(argv):
  """Separates ``--config.a.b=value`` overrides from ordinary arguments."""
  rest, overrides = [], []
  it = iter(argv)
  for a in it:
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body:
        body = body + "=" + next(it, "")
      overrides.append(body)
    else:
      rest.append(a)
  return rest, overrides


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="amq-jax",
      description="Hessian-aware automatic mixed-precision quantization (HAWQ-V2) for JAX/Flax.",
      epilog="Override any config field with --config.FIELD=VALUE (e.g. --config.num_epochs=2).")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name, help_ in COMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--config", required=True,
                   help="config file, e.g. configs/resnet20_fmnist.py (or FILE.py:VARIANT)")
    p.add_argument("--workdir", required=True, help="directory for every output of the run")
    if name == "analyze":
      p.add_argument("--force", action="store_true", help="recompute even if files exist")
    if name == "search":
      g = p.add_mutually_exclusive_group()
      g.add_argument("--budget", help="size budget, e.g. 0.12MB, or 'uniform:3'")
      g.add_argument("--avg-bits", type=float, help="average weight bits, e.g. 3")
      g.add_argument("--weight-bits", type=float, help="total weight bits sum(n_l * b_l)")
    if name in ("search", "run"):
      p.add_argument("--baselines", choices=["default", "all"],
                     help="which baselines to configure (default: the config's)")
    if name == "finetune":
      p.add_argument("--bits", help="bits JSON (default: WORKDIR/search/bits.json)")
      p.add_argument("--name", default=None, help="name of the run under WORKDIR/finetune/")
  return parser


def _budget(args):
  if getattr(args, "avg_bits", None) is not None:
    return f"avg:{args.avg_bits}"
  if getattr(args, "weight_bits", None) is not None:
    return f"bits:{args.weight_bits}"
  return getattr(args, "budget", None)


def _dispatch(args, cfg) -> int:
  if args.command == "train":
    if cfg.get("task") == "detection" or cfg.get("dataset") in ("coco", "fmnist_det"):
      import jax
      from amq_jax.detection import train_detector
      from amq_jax.train import save_variables, write_json
      out = os.path.join(args.workdir, "fp32")
      state, result = train_detector(cfg, out)
      # The files the detection run looks for, so 'run' continues from this model.
      save_variables(os.path.join(out, "variables.msgpack"), jax.device_get(state.variables))
      write_json(os.path.join(out, "result.json"), result)
      print(json.dumps(result, indent=2, default=float))
      return 0
    from amq_jax.train import train_fp32
    print(json.dumps(train_fp32(cfg, args.workdir), indent=2))
    return 0
  from amq_jax import pipeline
  if getattr(args, "baselines", None):
    cfg.baselines = args.baselines
  if args.command == "run":
    if cfg.get("task") == "detection":
      from amq_jax.detection import run_detection
      run_detection(cfg, args.workdir)
      print(open(f"{pipeline.Workdir(args.workdir).root}/report.md").read())
      return 0
    report = pipeline.run(cfg, args.workdir)
    print(open(f"{pipeline.Workdir(args.workdir).root}/report.md").read())
    return 0
  ctx = pipeline.Context(cfg, args.workdir, train_if_missing=False)
  if args.command == "analyze":
    out = pipeline.analyze(ctx, force=args.force)
    for p, e in out["traces"]["layers"].items():
      print(f"{p:45s} Tr(H) = {e['trace']:10.4g} +- {e['stderr']:.2g}  ({e['probes']} probes)")
  elif args.command == "search":
    if not os.path.isfile(ctx.wd.traces):
      raise FileNotFoundError(f"{ctx.wd.traces} does not exist; run amq-jax analyze first")
    methods = None
    if cfg.get("baselines") != "all" and os.path.isfile(ctx.wd.eigenvalues):
      methods = pipeline.DEFAULT_METHODS + ("hawq_v1",)  # marked on the frontier figure
    pipeline.search(ctx, budget=_budget(args), methods=methods)
    print(f"wrote {ctx.wd.bits}, {ctx.wd.frontier} and {ctx.wd.path('search', 'frontier.png')}")
  elif args.command == "finetune":
    path = args.bits or ctx.wd.bits
    bits = pipeline.load_bits(ctx, path)
    name = args.name or ("hawq_v2" if args.bits is None else
                         __import__("os").path.splitext(__import__("os").path.basename(path))[0])
    print(json.dumps(pipeline.finetune(ctx, bits, name), indent=2))
  elif args.command == "report":
    from amq_jax.pipeline._run import report
    report(cfg, args.workdir)
    print(open(f"{pipeline.Workdir(args.workdir).root}/report.md").read())
  return 0


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  from amq_jax.config import ConfigError, load_config
  from amq_jax.data import DataError
  try:
    cfg = load_config(args.config, overrides)
    return _dispatch(args, cfg)
  except (ConfigError, DataError, FileNotFoundError, FloatingPointError, ValueError,
          KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"amq-jax {args.command}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
