"""Terminal output shared by the commands: rich console and tables, help formatting, machine facts."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rnq_ep.bench.planner import BenchTable
from rnq_ep.specs import SpecError


class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where a flag has a real default (not None / off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def console() -> Console:
    """A rich console on the current stdout; wide when it is not a terminal (pipes, tests)."""
    out = Console(file=sys.stdout)
    return out if out.is_terminal else Console(file=sys.stdout, width=200)


def print_table(table: BenchTable) -> None:
    """Print a BenchTable with rich."""
    view = Table(title=table.title, title_justify="left", caption=table.note or None, caption_justify="left")
    for i, column in enumerate(table.header):
        view.add_column(column, no_wrap=i == 0)
    for row in table.rows:
        view.add_row(*row)
    console().print(view)


def check_folder(path: Path | None, flag: str) -> None:
    """Fail before any work when an output's folder does not exist or the output path is itself a folder."""
    if path is None:
        return
    if path.is_dir():
        raise SpecError(f"{flag} {path}: is a folder, expected a file path")
    if not path.resolve().parent.is_dir():
        raise SpecError(f"{flag} {path}: folder {path.resolve().parent} does not exist")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def machine_line() -> str:
    """CPU model, cores, OS and Python version: the machine line of a benchmark report."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"
