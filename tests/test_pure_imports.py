"""Import direction: the pure core never imports process groups or Ray; the planner is numpy only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rnq_ep"
PURE = [
    "planner", "routing.py", "balance.py", "costmodel.py", "quant.py", "memory.py", "metrics.py", "specs.py",
    "policies.py", "synthetic.py", "replan_sim.py", "load_windows.py", "rebalance/replan.py", "rebalance/moves.py",
    "rebalance/swaps.py",
]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def pure_files() -> list[Path]:
    files = []
    for entry in PURE:
        path = PACKAGE / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else [])
    return files


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_module_imports_no_torch_distributed_or_ray(path):
    bad = {m for m in imported_modules(path) if m.startswith(("torch.distributed", "ray")) or m == "ray"}
    assert not bad, f"{path} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "planner").glob("*.py")), ids=lambda p: p.name)
def test_planner_imports_no_torch(path):
    bad = {m for m in imported_modules(path) if m == "torch" or m.startswith("torch.")}
    assert not bad, f"{path} imports {sorted(bad)}"
