"""`longlive` entry point: one subcommand per module in this package (thin mains, STYLE.md §8).

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`, and a one-line
module docstring used as its help text. User errors (ValueError, FileNotFoundError) exit with
status 2 and a one-line reason, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under megatron_longlive.cli; later issues add train, generate, serve, ...
SUBCOMMANDS: dict[str, str] = {
    "bench": "bench",
    "convert": "convert",
    "demo": "demo",
    "distill": "distill",
    "eval": "eval",
    "generate": "generate",
    "info": "info",
    "preprocess": "preprocess",
    "serve": "serve",
    "slurm": "slurm",
    "train": "train",
}


def _load(name: str):
    return importlib.import_module(f"megatron_longlive.cli.{SUBCOMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longlive", description="megatron_longlive: long AR video diffusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        module = _load(name)
        doc = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        p = sub.add_parser(name, help=doc, description=(module.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"longlive {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
