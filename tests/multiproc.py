"""Run a test body in N real processes over gloo (torch.multiprocessing, forkserver).

Each worker gets RANK / WORLD_SIZE / MASTER_* in its environment, OMP_NUM_THREADS=1, and a
results queue; an exception in any worker fails the test with that worker's traceback.

Workers are forked from one fork server per test session that imported torch, Megatron-Core
and this package once (~7 s per process on the CI machine, paid by every spawned rank
before). The server is a fresh interpreter, not the pytest process: a worker inherits no
process group, Megatron parallel state or threads from the tests that ran in-process.
"""

from __future__ import annotations

import os
import socket
import time
import traceback

import torch.multiprocessing as mp


def _ephemeral_low() -> int:
    """The first port the kernel hands out for bind(0) / connect (Linux; 32768 otherwise)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_next_port = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, chosen so that nothing else takes it
    before the launched rank binds it: below the kernel's ephemeral range (gloo's and the
    launchers' bind(0) / connect ports come from there), above the ports slurm_master_port
    gives the test clusters' first jobs (10000 + 10 x job id), below torch's default 29500,
    and in a band of its own per pytest-xdist worker (the other worker's ranks probe theirs).
    Without room for the bands, a port the kernel picks."""
    global _next_port
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % workers
    low = 11000
    band = (min(29000, _ephemeral_low()) - low) // workers
    if band >= 100:
        first = low + worker * band
        if _next_port is None:  # a process of its own: start somewhere else in the band
            _next_port = first + (os.getpid() * 7919) % band
        for _ in range(band):
            port = _next_port
            _next_port = first + (_next_port + 1 - first) % band
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_lost(output: str) -> bool:
    """Whether a rank's output says its rendezvous port was taken before it bound it."""
    return "EADDRINUSE" in output or "Address already in use" in output


def run_on_a_free_port(run, attempts: int = 3):
    """(result, port): `run(port)` -> CompletedProcess (text output) on a `free_port()`, again
    on another port when the rendezvous lost the port to another process between `free_port`
    closing it and the launched rank binding it; any other failure is returned as is."""
    for attempt in range(attempts):
        port = free_port()
        result = run(port)
        lost = result.returncode != 0 and _port_lost((result.stdout or "") +
                                                     (result.stderr or ""))
        if not lost or attempt == attempts - 1:
            return result, port


# Imported once by the fork server, so that no worker pays for them; the rest of the package
# is cheap next to these.
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.transformer",
           "megatron.core.models.gpt", "megatron.core.pipeline_parallel",
           "megatron.core.distributed", "megatron.core.optimizer", "megatron_dynamoe.runtime",
           "megatron_dynamoe.models", "megatron_dynamoe.dynamoe", "megatron_dynamoe.training"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank, world_size, port, environ, fn, args, errors):
    # A forked worker has the fork server's environment: give it the test's, as spawn did.
    os.environ.clear()
    os.environ.update(environ)
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


class _PortLost(Exception):
    """Rank 0 could not listen on the rendezvous port: another process took it."""


def _run_once(ctx, fn, world_size, args, timeout):
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, dict(os.environ), fn, args,
                                                 errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    messages = []
    deadline = time.monotonic() + timeout
    # Poll rather than join one by one: when a rank fails (rank 0 losing the port, or a
    # failed assertion), the others may wait in a collective until their own timeout. They
    # get a few seconds to report their own failure, then are stopped.
    first_failure = None
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        while not errors.empty():
            messages.append(errors.get())
            first_failure = first_failure or time.monotonic()
        if any(_port_lost(tb) for _, tb in messages):
            break
        if first_failure is not None and time.monotonic() - first_failure > 10.0:
            break
        procs[0].join(0.2)
    while not errors.empty():
        messages.append(errors.get())
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    for p in procs:
        p.join()
    if any(_port_lost(tb) for _, tb in messages):
        raise _PortLost(port)
    if messages:
        raise AssertionError("worker failed:\n" + "\n".join(
            f"--- rank {rank} ---\n{tb}" for rank, tb in messages))
    if alive:
        raise AssertionError(f"{len(alive)} worker(s) still running after {timeout}s")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"worker exit codes {bad}")


def run_processes(fn, world_size: int, *args, timeout: float = 600.0, attempts: int = 3) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` processes; raise on failure.

    `fn` must be a module-level function (picklable). When rank 0 finds its `free_port()`
    taken (EADDRINUSE: the other test worker's ranks bound it after the probe closed it), the
    ranks are stopped and started again on another port, at most `attempts` times.
    """
    ctx = _context()
    for attempt in range(attempts):
        try:
            return _run_once(ctx, fn, world_size, args, timeout)
        except _PortLost as lost:
            if attempt == attempts - 1:
                raise AssertionError(f"the rendezvous port was taken {attempts} times "
                                     f"(last: {lost.args[0]})") from None
