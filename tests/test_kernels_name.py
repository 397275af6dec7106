"""Our kernels/ folder (rnq_ep.kernels) never shadows Hugging Face's `kernels`, which transformers imports."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_hf_kernels = pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `python -c code` with the repository root as working directory (so it is sys.path[0])."""
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@needs_hf_kernels
def test_import_kernels_from_the_root_gets_hugging_face_package() -> None:
    done = _python(
        "import kernels, rnq_ep.kernels as ours\n"
        "from kernels import CUDAProperties, LayerRepository\n"
        "print(kernels.__file__); print(ours.__file__); print(callable(ours.grouped_swiglu))"
    )
    assert done.returncode == 0, done.stderr
    theirs, ours, ok = done.stdout.split()
    assert not Path(theirs).resolve().is_relative_to(ROOT / "kernels"), theirs
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert ok == "True"


@needs_hf_kernels
def test_transformers_hub_kernels_import_from_the_root() -> None:
    done = _python("import transformers.integrations.hub_kernels as h; from kernels import Mode; print(h.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "transformers.integrations.hub_kernels"


@needs_hf_kernels
def test_hub_kernels_import_in_this_process() -> None:
    """`python -m pytest` from the root puts the root on sys.path: this process is the case that broke CI."""
    import transformers.integrations.hub_kernels  # noqa: F401
    from kernels import CUDAProperties  # noqa: F401

    import rnq_ep.kernels

    assert Path(rnq_ep.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_without_hugging_face_kernels_the_name_is_missing_not_ours() -> None:
    """With no `kernels` anywhere else on sys.path, `import kernels` fails as if our folder were not there."""
    done = _python(
        "import sys\n"
        "sys.path = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as err:\n    print('missing', err.name)\n"
        "else:\n    print('found', kernels.__file__)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "missing kernels"
