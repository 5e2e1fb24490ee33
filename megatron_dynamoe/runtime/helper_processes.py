"""Helper processes that must outlive the job's signals and die with their rank.

Megatron-Core's checkpoint writer (`dist_checkpointing.strategies.filesystem_async`) starts a
multiprocessing Manager at a rank's first save and keeps it for the process's lifetime; every
later save sends its results through it. That server inherits the rank's process group and
default signal dispositions. SLURM's `--signal=USR1@600`, `scancel --signal`, torchrun and a
group kill signal the whole group: the server dies, and the save the signal asked for fails
with BrokenPipeError, losing the work since the last checkpoint. And when a rank is killed
outright, the server is orphaned and stays alive holding its memory.

`start_checkpoint_writer_manager()` starts that Manager ourselves, before Megatron would,
with an initializer (run inside the server) that ignores the preemption signals and asks the
kernel to kill the server when its parent dies (Linux `PR_SET_PDEATHSIG`). Megatron's
writer then finds its results queue in place and uses it.
"""

from __future__ import annotations

import signal

# The signals a job sends to announce preemption or to stop it politely.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1

_MANAGER = None


def shield_helper_process() -> None:
    """Initializer of a helper process (the checkpoint writer's Manager, the DataLoader's
    workers): ignore the job's signals, so that the rank they serve can finish the step and
    the save a signal asks for, and die with the parent."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the Manager's own shutdown at exit still applies


def start_checkpoint_writer_manager() -> None:
    """Give Megatron's checkpoint writer a results queue served by a shielded Manager
    process (once per process; a no-op when Megatron already made one)."""
    global _MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing as mp

    if _MANAGER is not None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    from multiprocessing.managers import SyncManager

    # What Megatron would start (`mp.get_context("spawn").Manager()`), plus the initializer.
    _MANAGER = SyncManager(ctx=mp.get_context("spawn"))
    _MANAGER.start(initializer=shield_helper_process)
    filesystem_async._results_queue = _MANAGER.Queue()


def checkpoint_writer_pid():
    """PID of the shielded Manager process, or None before the first save (tests)."""
    return None if _MANAGER is None else _MANAGER._process.pid
