"""Triton grouped SwiGLU kernels over expert copies (bf16, int8, int4) and their torch oracles.

This folder is installed as `rnq_ep.kernels`. The top-level name `kernels` belongs to Hugging Face's
package (transformers imports it); when the repository root is on sys.path (`python -m ...` or a
script started there) an `import kernels` finds this folder first, so under that name this file
loads Hugging Face's package in its place and defines nothing of ours (tests/test_kernels_name.py).

Without CUDA, Triton can only run its CPU interpreter, which it reads from TRITON_INTERPRET when
triton is first imported; this package sets the variable (if unset) before any of its modules
imports triton, so the kernels run on CPU whichever module imports them first.
"""

import os
import sys

if __name__ == "kernels":  # found through the repository root: hand the name to the package that owns it
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (Hugging Face's package is not installed; the repository's kernels/ "
            "folder is rnq_ep.kernels)",
            name="kernels",
        )
    _module = module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns; the import system drops it if the next line raises
    _spec.loader.exec_module(_module)
else:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from rnq_ep.kernels.grouped_swiglu import grouped_swiglu  # noqa: E402
    from rnq_ep.kernels.reference import grouped_swiglu_reference  # noqa: E402

    __all__ = ["grouped_swiglu", "grouped_swiglu_reference"]
