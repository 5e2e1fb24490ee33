"""The real DeepSpeed launcher (`deepspeed --num_gpus 2 ...`, the `deepspeed` console script of
the installed package, CPU accelerator) starts 2 ranks of tests/rank_probe.py: launch_env
recognises it, drops the `--local_rank=N` it appends, and the ranks meet over gloo."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.launch_helpers import REPO, quiet_env
from tests.multiproc import run_on_a_free_port


def _deepspeed_cli() -> str:
    """The `deepspeed` console script of this interpreter's installation (not a shim found
    first on PATH, which may belong to another Python)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        pytest.fail(f"deepspeed is not importable ({e}): run `make install`")
    here = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    found = here if os.path.isfile(here) else shutil.which("deepspeed")
    if found is None:
        pytest.fail("the `deepspeed` console script was not found next to the Python "
                    "interpreter nor on PATH: run `make install`")
    return found


@pytest.mark.multiproc
def test_deepspeed_launcher_starts_two_cpu_ranks(tmp_path):
    def launch(port):
        # DS_ACCELERATOR=cpu: the launcher's device count comes from DeepSpeed's CPU
        # accelerator (the suite hides GPUs); --num_gpus 2 then asks for 2 local ranks, as
        # on a GPU node.
        return subprocess.run(
            [sys.executable, _deepspeed_cli(), "--num_gpus", "2", "--master_port", str(port),
             os.path.join(REPO, "tests", "rank_probe.py"), "--probe-arg", "kept"],
            env=quiet_env(PROBE_DIR=str(tmp_path), DS_ACCELERATOR="cpu"),
            capture_output=True, text=True, timeout=300)

    result, port = run_on_a_free_port(launch)
    log = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, log
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, record in enumerate(records):
        assert record == dict(
            launcher="deepspeed", rank=rank, local_rank=rank, world_size=2, local_world_size=2,
            dist_rank=rank, dist_world_size=2, rank_sum=1.0, master=f"127.0.0.1:{port}",
            # The launcher appended --local_rank=N; prepare() dropped it.
            argv=["--probe-arg", "kept"], raw_argv=[f"--local_rank={rank}", "--probe-arg", "kept"],
            omp_num_threads="1"), log
