"""Preemption as clusters deliver it: the signal goes to the whole process group, after a
periodic checkpoint exists (so Megatron's checkpoint-writer helper process is running).

SLURM (`--signal=USR1@600`, `scancel --signal`), torchrun and a group kill signal every
process of the job, helpers included. The save that the signal asks for must still complete
at the signalled iteration, the ranks must exit 0, a resume must reproduce the uninterrupted
loss curve, and no helper process may be left behind.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.multiproc import free_port
from tests.tool_runner import REPO

pytestmark = pytest.mark.multiproc

ITERS = 8


def _command(data, save, *extra):
    return [os.path.join(REPO, "launch", "train.py"), "--model", "tiny-smollm2", "--tokenizer",
            "smollm2", "--data-path", data, "--save", save, "--save-interval", "2",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64",
            "--train-iters", str(ITERS), "--lr", "3e-3", "--log-interval", "1",
            "--data-cache-path", save + "-cache", *extra]


def _env(**extra):
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                **extra)


def _losses(text):
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \| lm loss: (\S+)", text)}


def _ranks(data, save, *extra):
    """Two ranks started the way srun starts tasks (RANK / WORLD_SIZE / MASTER_*), in one new
    process group; rank 0's output is returned by the caller."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        kwargs = dict(process_group=0) if rank == 0 else dict(
            process_group=procs[0].pid)
        procs.append(subprocess.Popen([sys.executable, *_command(data, save, *extra)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, **kwargs))
    return procs


def _group_gone(pgid, seconds: float = 10.0) -> bool:
    """Whether every process of group `pgid` has exited (helpers die with their rank, which
    the kernel signals as the rank exits: allow it a moment)."""
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    print(subprocess.run(["ps", "-o", "pid,ppid,pgid,stat,cmd", "-g", str(pgid)],
                         capture_output=True, text=True).stdout)
    return False


@pytest.fixture(scope="module")
def uninterrupted_losses(sotu_prefix, tmp_path_factory):
    """{iteration: logged loss text} of the two-rank run without a signal (one for every
    signal below: the run does not depend on it)."""
    reference = _ranks(sotu_prefix, str(tmp_path_factory.mktemp("reference") / "full"))
    out = [p.communicate(timeout=600)[0] for p in reference]
    assert [p.returncode for p in reference] == [0, 0], out[0][-3000:]
    expected = _losses(out[0])
    assert sorted(expected) == list(range(1, ITERS + 1))
    return expected


# SIGUSR1 is what SLURM sends before the time limit; SIGTERM (the same handler; scancel,
# torchrun) runs with the slow tests.
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
                                 signal.SIGUSR1])
def test_group_signal_after_a_periodic_save_saves_and_resumes(sotu_prefix, uninterrupted_losses,
                                                              tmp_path, sig):
    expected = uninterrupted_losses

    save = str(tmp_path / "run")
    procs = _ranks(sotu_prefix, save)
    lines = []
    for line in procs[0].stdout:
        lines.append(line)
        # Iteration 3 is logged after the periodic save of iteration 2: the writer's
        # helper process exists now.
        if re.search(r"iteration\s+3/", line):
            os.killpg(procs[0].pid, sig)
            break
    rest = procs[0].communicate(timeout=600)[0]
    other = procs[1].communicate(timeout=600)[0]
    text = "".join(lines) + rest
    assert [p.returncode for p in procs] == [0, 0], (text + other)[-4000:]
    assert "Traceback" not in text + other, (text + other)[-4000:]
    stopped = int(re.search(r"stopped by a preemption signal after iteration (\d+)",
                            text).group(1))
    assert 3 <= stopped < ITERS
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert int(f.read()) == stopped
    assert _group_gone(procs[0].pid), "a helper process of the ranks outlived them"
    assert not glob.glob(os.path.join(save, ".*tmp*"))

    resumed = _ranks(sotu_prefix, save, "--load", save)
    out = [p.communicate(timeout=600)[0] for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], out[0][-3000:]
    assert f"resumed from {save}/iter_{stopped:07d}" in out[0]
    losses = {**_losses(text), **_losses(out[0])}
    assert losses == expected  # the printed values: bit-identical on the CPU


def test_a_save_killed_mid_write_leaves_no_temporary_behind(sotu_prefix, tmp_path):
    # What a SIGKILL during a save leaves: a hidden, incomplete iteration folder. The next
    # save into the same --save removes it.
    save = tmp_path / "run"
    stale = save / ".iter_0000004.tmp-12345-1700000000"
    (stale / "shard").mkdir(parents=True)
    (stale / "shard" / "__0_0.distcp").write_bytes(b"\0" * 4096)
    procs = _ranks(sotu_prefix, str(save), "--train-iters", "2")
    out = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], out[0][-3000:]
    assert not stale.exists()
    assert f"removed the incomplete checkpoint {stale}" in out[0]
    assert (save / "iter_0000002").is_dir()


def test_checkpoint_writer_helper_dies_with_a_killed_rank(sotu_prefix, tmp_path):
    # kill -9 of a rank (OOM killer, node agent) must not leave Megatron's checkpoint-writer
    # helper alive forever.
    import psutil

    save = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable,
                             *_command(sotu_prefix, save, "--train-iters", "200")],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    helpers = []
    for line in proc.stdout:
        if "saved " in line:  # the first periodic save started the helper
            helpers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if "multiprocessing" in " ".join(c.cmdline())]
            break
    assert helpers, "no checkpoint-writer helper process was found"
    proc.kill()
    proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(helpers, timeout=10)
    assert not alive, [h.cmdline() for h in alive]
