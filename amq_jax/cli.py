"""The ``amq-jax`` command line: parses arguments and calls one function per stage."""
from __future__ import annotations

import argparse
import json
import sys

COMMANDS = {
    "train": "train the FP32 model of a config (resumes after interruption)",
}


def _common(p: argparse.ArgumentParser, workdir_required=True):
  p.add_argument("--config", required=True,
                 help="config file, e.g. configs/resnet20_fmnist.py (or FILE.py:VARIANT)")
  p.add_argument("--workdir", required=workdir_required, help="directory for outputs")


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
      epilog="Override any config field with --config.FIELD=VALUE.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name, help_ in COMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_)
    _common(p)
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  from amq_jax.config import ConfigError, load_config
  from amq_jax.data import DataError
  try:
    cfg = load_config(args.config, overrides)
    if args.command == "train":
      from amq_jax.train import train_fp32
      result = train_fp32(cfg, args.workdir)
      print(json.dumps(result, indent=2))
  except (ConfigError, DataError, FileNotFoundError, FloatingPointError, ValueError,
          KeyError) as e:
    print(f"amq-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
