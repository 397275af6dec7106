"""Count what makes a step wait on the device or read data on the host: syncs, data-dependent shapes, aten ops.

A `TorchDispatchMode` sees every aten op a step runs; on a GPU each is (about) one kernel launch.
Host reads that never reach aten on CPU tensors (`.tolist()`, `.numpy()`, `.cpu()`) are counted
by wrapping those methods. Ops inside an opaque `rnq_ep::` op (one launch on a GPU) are its own
business and not counted. On CPU this counts what would sync on a GPU; it times nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read device data on the host or whose output shape depends on it (a host sync on a GPU)
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "nonzero_static_unused", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "masked_select", "bincount", "equal", "is_nonzero", "allclose", "histc",
})
HOST_READS = ("tolist", "numpy", "cpu")  # Tensor methods that copy device data to the host
VIEW_OPS = frozenset({  # metadata only: no kernel on a GPU
    "view", "_unsafe_view", "reshape", "slice", "select", "expand", "unsqueeze", "squeeze", "permute", "t",
    "transpose", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "lift_fresh",
})


@dataclass
class SyncCount:
    """What one call did: host syncs by kind, and aten ops (kernel launches on a GPU) by name."""

    syncs: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Host syncs of all kinds."""
        return sum(self.syncs.values())

    @property
    def num_ops(self) -> int:
        """aten ops run (an opaque rnq_ep op counts as one)."""
        return sum(self.ops.values())

    @property
    def launches(self) -> int:
        """Ops that run a kernel on a GPU: num_ops less metadata-only views."""
        return sum(n for name, n in self.ops.items() if name.split(".", 1)[1] not in VIEW_OPS)


class _Counting(TorchDispatchMode):
    def __init__(self, count: SyncCount) -> None:
        super().__init__()
        self.count, self.opaque = count, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.opaque:
            return func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if func.namespace not in ("_c10d_functional",) or not name.startswith("wait_tensor"):
            self.count.ops[f"{func.namespace}.{name}"] += 1
        if name in SYNC_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                and isinstance(args[0], torch.Tensor) and len(args) == 1):
            self.count.syncs[name] += 1
        if func.namespace == "rnq_ep":
            self.opaque += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.opaque -= 1
        return func(*args, **kwargs)


def count_syncs(step: Callable[[], Any]) -> SyncCount:
    """Run step() once, counting host syncs and aten ops."""
    count = SyncCount()
    mode = _Counting(count)
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrapped(name: str, method: Callable) -> Callable:
        def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not mode.opaque:
                count.syncs[name] += 1
            return method(self, *args, **kwargs)
        return call

    for name, method in originals.items():
        setattr(torch.Tensor, name, wrapped(name, method))
    try:
        with mode:
            step()
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    return count
