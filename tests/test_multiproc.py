"""The test harness's own rank launcher: a rendezvous port another process took between
`free_port()` probing it and rank 0 binding it is retried on another port, while a real
failure in a rank is still reported, with its traceback."""

from __future__ import annotations

import socket
import time

import pytest

from tests import multiproc


def _sum_ranks(rank, world_size):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)
        assert total.item() == world_size * (world_size + 1) / 2
    finally:
        dist.destroy_process_group()


def _fail_on_rank_1(rank, world_size):
    """Rank 1 fails while rank 0 waits for something that will not come (as a rank in a
    collective with a live but failed peer would, until a 30-minute timeout)."""
    import time

    assert rank != 1, "rank 1 fails on purpose"
    time.sleep(600)


@pytest.mark.multiproc
def test_a_taken_rendezvous_port_is_retried_on_another(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real_free_port = multiproc.free_port
    handed = []

    def free_port():  # the first probe returns a port some other process listens on
        handed.append(taken.getsockname()[1] if not handed else real_free_port())
        return handed[-1]

    monkeypatch.setattr(multiproc, "free_port", free_port)
    try:
        multiproc.run_processes(_sum_ranks, 2, timeout=120)
    finally:
        taken.close()
    assert len(handed) == 2  # one lost rendezvous, one that worked


@pytest.mark.multiproc
def test_a_rank_failure_is_reported_without_waiting_for_the_other_rank():
    started = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
        multiproc.run_processes(_fail_on_rank_1, 2, timeout=300)
    # Not retried, and rank 0, blocked in its all-reduce, is stopped after the grace period
    # instead of the 300 s timeout.
    assert time.monotonic() - started < 120
