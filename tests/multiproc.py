"""Run a test body in N real processes over gloo (torch.multiprocessing, spawn).

Each worker gets RANK / WORLD_SIZE / MASTER_* in its environment, OMP_NUM_THREADS=1, and a
results queue; an exception in any worker fails the test with that worker's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, errors):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    except BaseException:  # report everything, including assertion failures
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        # As the entry points do: a process group left to the interpreter's exit can abort
        # the process ("terminate called without an active exception", exit -6) when its
        # gloo threads are torn down in a random order.
        from megatron_dynamoe.runtime.parallel import destroy_parallel

        destroy_parallel()


def run_processes(fn, world_size: int, *args, timeout: float = 600.0) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; raise on failure.

    `fn` must be a module-level function (picklable).
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    messages = []
    while not errors.empty():
        rank, tb = errors.get()
        messages.append(f"--- rank {rank} ---\n{tb}")
    if messages:
        raise AssertionError("worker failed:\n" + "\n".join(messages))
    if alive:
        raise AssertionError(f"{len(alive)} worker(s) still running after {timeout}s")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"worker exit codes {bad}")
