"""SIGTERM / SIGUSR1 (SLURM preemption, `scancel --signal`, `#SBATCH --signal=USR1@120`):
finish the current iteration, save, exit cleanly.

The handler only sets a flag; the trainer asks `agreed()` after each iteration, which
all-reduces the flag so that every rank stops after the SAME iteration (a signal delivered to
one rank, or to ranks at slightly different times, must not split the job). The flag tensor
lives on the communication device of the world group (the GPU under NCCL, which takes no
host tensors), and the entry point installs the handler before its long start-up (model
build, checkpoint load), so a signal then ends the job cleanly instead of killing it.
"""

from __future__ import annotations

import contextlib
import signal


SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 while `installed()`; `agreed()` is True on every rank once
    any rank received one."""

    def __init__(self):
        self.received = False

    def _handler(self, signum, frame):
        self.received = True

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled (a collective: all ranks call)."""
        from megatron_dynamoe.runtime.device import any_rank

        return any_rank(self.received)
