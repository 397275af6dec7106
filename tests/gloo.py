"""Run a function on N gloo CPU ranks (spawned processes) and collect what each rank returns.

`fn(rank, world_size, *args)` must be importable by the children (a module-level function of a
test module or package) and return something picklable. A rank that raises makes `run_ranks`
raise with that rank's traceback; a rank that dies without a word (gloo aborts on mismatched
split sizes) or a hang past `timeout` fails instead of blocking the test run.
"""

from __future__ import annotations

import os
import time
import traceback
from multiprocessing.connection import wait
from collections import Counter
from typing import Any, Callable

import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
import torch.multiprocessing as mp

from rnq_ep.runtime.worker import free_port, leave_group

DEFAULT_TIMEOUT_S = 120.0
FUNCTIONAL_NAMES = {"all_gather_into_tensor": "all_gather"}  # functional op -> the dist.* name tests use
FUNCTIONAL_COLLECTIVES = ("all_gather_into_tensor", "all_to_all_single", "all_reduce", "reduce_scatter_tensor", "broadcast")
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all",
               "all_to_all_single", "broadcast", "barrier", "send", "recv")
# (seed, tokens on each rank, policy); rank 1 of the last case has no tokens at all
CASES = [
    (1, (9, 5, 7, 6), "least-loaded"),
    (2, (16, 3, 11, 8), "static"),
    (3, (4, 12, 6, 9), "hash"),
    (4, (7, 0, 5, 3), "least-loaded"),
]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` gloo ranks over loopback: results by rank."""
    ctx = mp.get_context("spawn")
    address = f"tcp://127.0.0.1:{free_port()}"
    pipes = [ctx.Pipe() for _ in range(world_size)]
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, address, child, args))
        for rank, (_, child) in enumerate(pipes)
    ]
    for proc in procs:
        proc.start()
    try:
        return _collect(procs, [parent for parent, _ in pipes], timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


def _collect(procs: list, conns: list, timeout: float) -> list[Any]:
    """One message per rank; raise on the first error, a rank that dies silently, or the timeout."""
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(procs):
        waiting = [conns[r] for r in range(len(procs)) if r not in out]
        for conn in wait(waiting, timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            rank = conns.index(conn)
            try:
                ok, value = conn.recv()
            except EOFError:
                procs[rank].join(5)
                raise RuntimeError(f"rank {rank} of {len(procs)} died without a result; {_exit_codes(procs)}") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {len(procs)} failed; {_exit_codes(procs)}:\n{value}")
            out[rank] = value
            conn.send(True)  # the rank may exit now: its tensors are in our hands
        if time.monotonic() >= deadline and len(out) < len(procs):
            missing = sorted(set(range(len(procs))) - set(out))
            raise TimeoutError(f"gloo ranks {missing} of {len(procs)} did not finish in {timeout:.0f} s")
    return [out[rank] for rank in range(len(procs))]


def _exit_codes(procs: list) -> str:
    """Exit codes of the ranks that have ended (a negative code is the signal, -6 = SIGABRT)."""
    ended = {rank: proc.exitcode for rank, proc in enumerate(procs) if proc.exitcode is not None}
    return f"ended ranks (rank: exit code) {ended}"


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, address: str, conn: Any, args: tuple) -> None:
    """Child process: join the gloo group, run fn, send (ok, result or traceback), wait for the ack."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world_size)
        conn.send((True, fn(rank, world_size, *args)))
    except BaseException:
        conn.send((False, traceback.format_exc()))
    conn.recv()
    leave_group(created=dist.is_initialized())




def count_collectives(step: Callable[[], Any]) -> dict[str, int]:
    """Run step() counting each torch.distributed collective it calls: name -> calls (only those called)."""
    calls: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name: str, collective: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return collective(*args, **kwargs)
        return call

    class Functional(TorchDispatchMode):  # functional collectives (what a compiled step holds) bypass dist.*
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if func.namespace == "_c10d_functional" and name in FUNCTIONAL_COLLECTIVES:
                calls[FUNCTIONAL_NAMES.get(name, name)] += 1
            return func(*args, **(kwargs or {}))

    for name, collective in originals.items():
        setattr(dist, name, counted(name, collective))
    try:
        with Functional():
            step()
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
    return dict(calls)
