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

TABLE_COLUMNS = 120  # what a table may take without --wide
WIDE_ENV = "RNQ_EP_WIDE"  # set (by --wide) to print every column, up to WIDE_COLUMNS when not on a terminal
WIDE_COLUMNS = 200


class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where a flag has a real default (not None / off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def wide() -> bool:
    """Whether --wide asked for every table column (RNQ_EP_WIDE set and not '0')."""
    return os.environ.get(WIDE_ENV, "0") not in ("", "0")


def console() -> Console:
    """A rich console on the current stdout; TABLE_COLUMNS wide when it is not a terminal (pipes, tests), WIDE_COLUMNS
    with --wide."""
    out = Console(file=sys.stdout)
    return out if out.is_terminal else Console(file=sys.stdout, width=WIDE_COLUMNS if wide() else TABLE_COLUMNS)


def print_table(table: BenchTable) -> None:
    """Print a BenchTable with rich: its title on one line, then without --wide the first columns that fit
    TABLE_COLUMNS, the others named below."""
    shown = list(range(len(table.header))) if wide() else fitting_columns(table, TABLE_COLUMNS)
    left_out = [table.header[i] for i in range(len(table.header)) if i not in shown]
    notes = [table.note] if table.note else []
    if left_out:
        notes.append(f"not shown (--wide shows them): {'; '.join(left_out)}")
    view = Table(caption="\n".join(notes) or None, caption_justify="left")
    for i in shown:
        view.add_column(table.header[i], no_wrap=i == 0)
    for row in table.rows:
        view.add_row(*(row[i] for i in shown))
    out = console()
    out.print(table.title, soft_wrap=True, markup=False, highlight=False)  # one line, whatever its length: it is searched
    out.print(view)


def fitting_columns(table: BenchTable, width: int) -> list[int]:
    """Indices of the first columns whose widest cell (headers wrap at spaces, cells do not) fits `width` with borders."""
    used, shown = 1, []  # the left border
    for i, header in enumerate(table.header):
        need = max([len(word) for word in header.split()] + [len(row[i]) for row in table.rows]) + 3  # padding, border
        if shown and used + need > width:
            break
        used += need
        shown.append(i)
    return shown


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
