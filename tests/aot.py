"""Compile a Triton kernel of ours for an H100 (sm_90) with no GPU: a child process, the interpreter off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = """
import json, sys, importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, name, signature, constexprs, warps = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), name)
sig = dict(signature, **{k: "constexpr" for k in constexprs})
k = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print(json.dumps({"shared": k.metadata.shared, "asm": sorted(k.asm), "ptx": k.asm["ptx"]}))
"""


class Compiled:
    """What triton.compile made: metadata.shared, asm (names -> text for ptx, else present)."""

    def __init__(self, out: dict) -> None:
        self.asm = {name: out["ptx"] if name == "ptx" else True for name in out["asm"]}
        self.metadata = type("Metadata", (), {"shared": out["shared"]})()


def compile_sm90(module: str, name: str, signature: dict, constexprs: dict, num_warps: int = 4) -> Compiled:
    """triton.compile of `module`.`name` (e.g. rnq_ep.kernels.quotas) for sm_90; AssertionError with stderr on failure."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    arg = json.dumps([module, name, signature, constexprs, num_warps])
    done = subprocess.run([sys.executable, "-c", _SCRIPT, arg], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Compiled(json.loads(done.stdout.splitlines()[-1]))
