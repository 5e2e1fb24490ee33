"""srun's PMI plugins against the real single-node SLURM of tests/test_slurm.py: under
`srun --mpi=pmi2` (PMI_RANK / PMI_SIZE / PMI_FD in every task), `--mpi=pmix` (PMIX_*) and
`--mpi=cray_shasta` (PALS_*) two tasks are SLURM ranks 0 and 1 with local ranks 0 and 1 and
meet over gloo; `mpirun` run inside an srun step (its ranks inherit the step's SLURM_PROCID=0)
is still Open MPI's world."""

import json
import os
import shutil
import sys

import pytest

from tests.launch_helpers import REPO
from tests.multiproc import free_port
from tests.test_slurm import cluster  # noqa: F401  (the module-scoped SLURM fixture)

PROBE = os.path.join(REPO, "tests", "rank_probe.py")


def _records(folder, world):
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.multiproc
@pytest.mark.parametrize("mpi", ["pmi2", "pmix", "cray_shasta"])
def test_srun_pmi_plugin_tasks_are_slurm_ranks(cluster, tmp_path, mpi):  # noqa: F811
    # MASTER_PORT: a free port instead of the one derived from the job id, which another
    # test cluster on this host (its job ids also start at 1) could be using right now.
    port = free_port()
    result = cluster.run("srun", f"--mpi={mpi}", "--ntasks=2", sys.executable, PROBE,
                         timeout=300, PROBE_DIR=str(tmp_path), PROBE_MEGATRON="0",
                         MASTER_PORT=str(port))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for rank, record in enumerate(_records(tmp_path, 2)):
        assert record == dict(
            launcher="slurm", rank=rank, local_rank=rank, world_size=2, local_world_size=2,
            dist_rank=rank, dist_world_size=2, rank_sum=1.0, master=f"localhost:{port}",
            argv=[], raw_argv=[], omp_num_threads="1"), mpi


@pytest.mark.multiproc
def test_mpirun_inside_an_srun_step_is_open_mpi(cluster, tmp_path):  # noqa: F811
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: run `make install` (installs Debian Open MPI)")
    # The one-task step gives each mpirun rank SLURM_STEP_ID=0, SLURM_PROCID=0,
    # SLURM_STEP_NUM_TASKS=1; OMPI_COMM_WORLD_* must win (--oversubscribe: the step has
    # one CPU slot for Open MPI).
    result = cluster.run("srun", "--ntasks=1", "mpirun", "--allow-run-as-root",
                         "--oversubscribe", "--bind-to", "none", "-np", "2", sys.executable,
                         PROBE, timeout=300, PROBE_DIR=str(tmp_path), PROBE_MEGATRON="0")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = _records(tmp_path, 2)
    for rank, record in enumerate(records):
        assert (record["launcher"], record["rank"], record["local_rank"], record["world_size"],
                record["dist_rank"], record["rank_sum"]) == ("mpirun", rank, rank, 2, rank, 1.0)
    assert records[0]["master"] == records[1]["master"]  # broadcast by mpi4py
