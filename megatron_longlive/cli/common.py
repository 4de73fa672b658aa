"""Argument helpers shared by subcommands: `--config FILE` plus repeated `--set section.key=value`."""
from __future__ import annotations

import argparse

from ..config import RunConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML run config (see examples/configs/).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Override one config field, e.g. --set train.lr=1e-4 (repeatable).")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)
