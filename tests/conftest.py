"""Shared fixtures: a single-rank Megatron world for in-process tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed (gloo, world 1) + Megatron groups at TP=PP=EP=1, once per session."""
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout())
    yield
    # Left initialised for the rest of the session; the process exits afterwards.


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
