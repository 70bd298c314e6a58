"""The command line as a terminal shows it: help that reads at 80 columns, and a start-up
that loads no numerical library for a command that only parses its options."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from conftest import run_cli
from typer.core import TyperOption

from hitanno_cli.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def help_text(*args: str) -> str:
    result = run_cli(*args, "--help")
    assert result.exit_code == 0, result.stderr
    return result.stdout


def option_names(name: str) -> list[str]:
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return [flag for param in command.params if isinstance(param, TyperOption) for flag in param.opts]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_fits_80_columns_and_names_every_option_whole(name: str) -> None:
    text = help_text(name)
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    for flag in option_names(name):
        assert re.search(rf"(^|[\s,/]){re.escape(flag)}([\s,/=]|$)", text, re.M), f"{flag} not shown whole"


def test_top_level_help_lists_every_command() -> None:
    text = help_text()
    for name in COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s", text, re.M), name


HEAVY = ("torch", "anndata", "zarr", "h5py", "pandas", "sklearn", "scipy")


def test_parsing_options_loads_no_heavy_library() -> None:
    """``hitanno --help`` and every ``hitanno CMD --help`` never import torch, anndata, pandas or scipy."""
    probe = (
        "import sys\n"
        "from hitanno_cli.__main__ import main\n"
        f"for args in [[], *([name] for name in {COMMANDS!r})]:\n"
        "    sys.argv = ['hitanno', *args, '--help']\n"
        "    try:\n        main()\n    except SystemExit:\n        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "Usage: hitanno train" in done.stdout  # the commands did run
    assert done.stdout.strip().splitlines()[-1] == "[]"
