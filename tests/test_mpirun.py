"""`mpirun --allow-run-as-root -np 2` trains the tiny MoEfy run of slurm/moefy_tiny.sh with
ranks from Open MPI and the rendezvous broadcast by mpi4py, and reproduces the torchrun run of
the same command: same layout, same data, same loss curve."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.launch_helpers import REPO, TINY_ARGS, loss_curve, quiet_env, shared_sotu_data

ITERS = 4


def _train(launcher, data, out):
    tokenizer, prefix = data
    return [*launcher, os.path.join(REPO, "launch", "train.py"), *TINY_ARGS,
            "--tokenizer", tokenizer, "--data-path", prefix, "--train-iters", str(ITERS),
            "--save", str(out / "ckpt"),
            "--tensorboard-dir", str(out / "tb")]


@pytest.mark.multiproc
def test_mpirun_matches_torchrun(tmp_path_factory, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: run `make install` (installs Debian Open MPI)")
    data = shared_sotu_data(tmp_path_factory)
    # --bind-to none: Open MPI would pin each rank to one core, torchrun does not; the runs
    # are compared number for number, so they get the same threads (1 per rank: launch_env).
    mpi = subprocess.run(
        _train(["mpirun", "--allow-run-as-root", "-np", "2", "--bind-to", "none",
                sys.executable], data, tmp_path / "mpi"),
        env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert mpi.returncode == 0, mpi.stderr[-4000:]
    assert "launcher: mpirun, world size 2 (2 per node), rendezvous 127.0.0.1:" in mpi.stderr
    assert "training DynaMoE llama model: TP=1 PP=1 EP=2 DP=2" in mpi.stdout

    torchrun = subprocess.run(
        _train([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--standalone"], data, tmp_path / "torchrun"),
        env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert torchrun.returncode == 0, torchrun.stderr[-4000:]
    assert "launcher: torchrun, world size 2 (2 per node)" in torchrun.stderr

    mpi_curve = loss_curve(str(tmp_path / "mpi" / "tb"))
    torchrun_curve = loss_curve(str(tmp_path / "torchrun" / "tb"))
    assert sorted(mpi_curve) == sorted(torchrun_curve) == list(range(1, ITERS + 1))
    for step in mpi_curve:
        assert mpi_curve[step] == pytest.approx(torchrun_curve[step], abs=1e-6, rel=0)
    pointer = tmp_path / "mpi" / "ckpt" / "latest_checkpointed_iteration.txt"
    assert pointer.read_text().strip() == str(ITERS)
