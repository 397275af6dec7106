"""Calibrate, plan and convert a tiny model of every transformers family on two gloo CPU ranks; print how closely
the converted models follow the originals (the numbers of docs/calibration.md).

    python scripts/hf_agreement.py

Per family: plain EP's largest |logit difference| (bf16 copies only), and for R&Q plans allowed bf16+int8 and
bf16+int4 the share of copies quantized and the top-1 token agreement on 1024 builtin tokens after the
calibration text. The work is tests/test_hf_pipeline.py's; this prints what that test asserts on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_hf_pipeline import FAMILIES, measure  # noqa: E402  (needs the tests folder on the path)


def main() -> int:
    """Measure every family and print one row each."""
    table = Table(title="tiny models converted on 2 gloo ranks vs the original (builtin text)")
    for column in ("family", "plain EP max |diff|", "R&Q int8: quantized", "top-1", "R&Q int4: quantized", "top-1"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for family, by_name in measure(FAMILIES).items():
        row = [family, f"{by_name['plain EP'].max_diff:.1e}"]
        for name in ("R&Q int8", "R&Q int4"):
            row += [f"{by_name[name].quantized:.0%}", f"{by_name[name].agreement:.2%}"]
        table.add_row(*row)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
