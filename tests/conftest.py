"""Shared fixtures: a single-rank Megatron world for in-process tests.

The suite is the CPU suite: it hides GPUs (CUDA_VISIBLE_DEVICES="", inherited by every rank
and tool it starts) so that on a GPU machine `--device auto` still means the CPU path the
tests compare against. GPU checks live in bench/ (check_gpu.py, gpu_smoke.sh);
DYNAMOE_TESTS_SEE_GPUS=1 lets the suite see GPUs on purpose.
"""

from __future__ import annotations

import os

if os.environ.get("DYNAMOE_TESTS_SEE_GPUS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402


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
