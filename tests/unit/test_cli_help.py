"""Every registered `longlive` subcommand answers --help, and bad arguments exit non-zero with one line.

Runs the CLI as a real process (`python -m megatron_longlive.cli.main`) and iterates over SUBCOMMANDS,
so subcommands added later are covered without touching this file.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_longlive.cli.main import SUBCOMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _longlive(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_longlive.cli.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def test_top_level_help_lists_every_subcommand():
    r = _longlive("--help")
    assert r.returncode == 0, r.stderr
    for name in SUBCOMMANDS:
        assert name in r.stdout


def test_modules_follow_the_subcommand_contract():
    import importlib

    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(f"megatron_longlive.cli.{module}")
        assert callable(mod.add_arguments) and callable(mod.run), name
        assert mod.__doc__ and mod.__doc__.strip().splitlines()[0].strip(), f"{name}: one-line module docstring"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help(name):
    r = _longlive(name, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: longlive {name}")
    assert "Traceback" not in r.stderr


def test_every_subcommand_rejects_unknown_flag_with_one_line(capsys):
    """In-process (same `main`, cheaper than a process per subcommand): exit code 2 and one error line."""
    from megatron_longlive.cli.main import main

    for name in sorted(SUBCOMMANDS):
        with pytest.raises(SystemExit) as e:
            main([name, "--definitely-not-a-flag"])
        assert e.value.code == 2, name
        last = _last_line(capsys.readouterr().err)
        # argparse reports unknown flags from the top parser, missing required ones from the subparser
        assert last.startswith((f"longlive {name}: error:", "longlive: error:")), (name, last)
        assert "--definitely-not-a-flag" in last or "required" in last, (name, last)


def test_unknown_subcommand_and_missing_subcommand_fail():
    r = _longlive("no-such-command")
    assert r.returncode == 2 and "invalid choice" in _last_line(r.stderr)
    r = _longlive()
    assert r.returncode == 2 and _last_line(r.stderr).startswith("longlive: error:")


@pytest.mark.parametrize("args, reason", [
    (("convert", "--src", "/nonexistent/ckpt", "--dst", "/tmp/x", "--to", "native"), "checkpoint not found"),
    (("convert", "--dst", "/y", "--to", "native"), "the following arguments are required: --src"),
    (("info", "/nonexistent/ckpt"), "checkpoint not found"),
])
def test_bad_arguments_give_a_one_line_reason(args, reason):
    r = _longlive(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = _last_line(r.stderr)
    assert last.startswith(f"longlive {args[0]}: error:") and reason in last, r.stderr
