"""Shared `main()` of the tools/ command lines: argparse, then user errors as one line and exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def build_parser(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """The argparse parser of `python -m tools.<prog>` (its description: the module docstring)."""
    parser = argparse.ArgumentParser(prog=f"python -m tools.{prog}", description=doc.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def run_tool(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """Parse `argv` for `python -m tools.<prog>` and call `run`; bad input exits 2 with `prog: error: reason`."""
    args = build_parser(prog, doc, add_arguments).parse_args(argv)
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m tools.{prog}: error: {e}", file=sys.stderr)
        return 2
