"""A stalled rank must not hang the job: --distributed-timeout-minutes bounds every collective.

A rank that stops (SIGSTOP here; a hung GPU, a swapping or frozen node in production) leaves
the others waiting in their next collective. They must give up after
--distributed-timeout-minutes, say so in ONE `error:` line (no traceback) and exit with
EXIT_COLLECTIVE_TIMEOUT; torchrun then stops the rest of the job. The stopped worker cannot
act on torchrun's SIGTERM, so torchrun SIGKILLs it after its fixed 30 s grace period
(`_stop_workers` uses the default `timeout=30`; TORCH_ELASTIC_SHUTDOWN_TIMEOUT does not
apply to this path): that grace period makes the end-to-end test slow.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.tool_runner import REPO

TIMEOUT_MINUTES = 0.25
TORCHRUN_GRACE_S = 30  # torchrun's SIGTERM -> SIGKILL wait for workers that do not exit
# Measured on the 2-core test machine: the surviving rank reports 15.1 s after the SIGSTOP
# (the timeout itself) and torchrun exits 47-51 s after it (15 s + 30 s grace + exit).
# The slack absorbs a machine loaded by other test runs.
SLACK_S = 25


def _train_module():
    import megatron_dynamoe.training.run as module

    return module


# ---- which failures count as a collective timeout -------------------------------------------

GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78]"
                " Timed out waiting 15000ms for recv operation to complete")


def _chained(outer, cause):
    try:
        try:
            raise cause
        except Exception as inner:
            raise outer from inner
    except Exception as e:
        return e


@pytest.mark.parametrize("error, expected", [
    (RuntimeError(GLOO_TIMEOUT), True),
    (lambda dist: dist.DistBackendError(
        "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
        "OpType=ALLREDUCE) ran for 900000 milliseconds before timing out."), True),
    (lambda dist: _chained(RuntimeError("step failed"), RuntimeError(GLOO_TIMEOUT)), True),
    # Store timeouts are start-up / rendezvous problems with their own message.
    (lambda dist: dist.DistStoreError("Socket Timeout"), False),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("Timed out waiting for the data loader"), False),  # not gloo's
    (lambda dist: dist.DistBackendError("NCCL error: unhandled system error"), False),
    (ValueError("timed out"), False),
])
def test_collective_timeout_is_recognised_narrowly(error, expected):
    import torch.distributed as dist

    train = _train_module()
    if callable(error):
        error = error(dist)
    assert train.is_collective_timeout(error) is expected


def test_timeout_message_names_the_flag_the_iteration_and_the_fix():
    train = _train_module()
    message = train.collective_timeout_message(0.25, 7)
    assert "\n" not in message
    assert "within --distributed-timeout-minutes 0.25 after iteration 7" in message
    assert "a rank stalled or died" in message and "raise --distributed-timeout-minutes" in message
    assert "before this run's first iteration" in train.collective_timeout_message(10, None)
    from megatron_dynamoe.cli.common import EXIT_COLLECTIVE_TIMEOUT

    assert EXIT_COLLECTIVE_TIMEOUT not in (0, 1, 2, 3, 4)


# ---- every process group gets the timeout ---------------------------------------------------

GROUP_TIMEOUTS = """
import torch
from megatron_dynamoe.runtime.parallel import ParallelLayout, destroy_parallel, initialize_parallel
from torch.distributed import distributed_c10d as c10d

initialize_parallel(ParallelLayout(), device="cpu", timeout_minutes=0.25)
for group in list(c10d._world.pg_map):
    timeout = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    print("group", group.group_desc, timeout)
destroy_parallel()
"""


def test_every_process_group_gets_the_distributed_timeout():
    # The default group and each of Megatron's groups (gloo ones included: the distributed
    # optimizer gathers its state for checkpoints over them).
    done = subprocess.run([sys.executable, "-c", GROUP_TIMEOUTS], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    groups = re.findall(r"^group (\S+) (\S+)$", done.stdout, re.M)
    assert len(groups) > 10, done.stdout
    assert {desc: float(s) for desc, s in groups if float(s) != 15.0} == {}


# ---- end to end: torchrun, 2 ranks, one stopped ---------------------------------------------

def _torchrun(data, tmp_path):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--standalone",  # the agent binds a free port itself: no probe, no race
            # Each rank's lines come prefixed with [default<rank>]: on the console, and go to
            # per-rank files: the surviving rank's own output is told apart from torchrun's.
            "--tee", "3", "--log-dir", str(tmp_path / "logs"),
            os.path.join(REPO, "launch", "train.py"), "--model", "tiny-smollm2",
            "--tokenizer", "smollm2", "--data-path", data, "--device", "cpu",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64",
            "--train-iters", "1000", "--lr", "3e-3", "--log-interval", "1",
            "--save", str(tmp_path / "run"), "--save-interval", "2",
            "--data-cache-path", str(tmp_path / "cache"),
            "--distributed-timeout-minutes", str(TIMEOUT_MINUTES)]


class _Reader:
    """Collects a process's output lines on a thread, each with its arrival time, so the
    test can wait for a line with a deadline instead of blocking on the pipe."""

    def __init__(self, stream):
        self.lines: list = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def wait_for(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if re.search(pattern, line):
                    return at, line
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n"
                             + self.text()[-4000:])

    def text(self):
        return "".join(line for _, line in self.lines)


def _rank_processes(torchrun_pid):
    """{rank: psutil.Process} of torchrun's workers (each in its own session)."""
    import psutil

    return {int(p.environ()["RANK"]): p for p in psutil.Process(torchrun_pid).children()
            if "RANK" in p.environ()}


def _kill_leftovers(job, family):
    """Cleanup whatever the test's outcome: SIGKILL (it ends a stopped process too) every
    worker, helper and torchrun itself that is still alive, so no test leaves orphans."""
    import psutil

    procs = list(family)
    try:
        procs += psutil.Process(job.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


@pytest.mark.slow  # ~75 s: 15 s timeout + torchrun's fixed 30 s grace for the stopped rank
@pytest.mark.multiproc
def test_a_stopped_rank_ends_the_job_within_the_timeout(sotu_prefix, tmp_path):
    import psutil

    job = subprocess.Popen(_torchrun(sotu_prefix, tmp_path), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1",
                                    PYTHONUNBUFFERED="1"))
    out = _Reader(job.stdout)
    family = []
    try:
        # After the periodic save of iteration 2 the checkpoint-writer helpers exist too.
        out.wait_for(r"^\[default0\]:\s*iteration\s+3/", 300)
        ranks = _rank_processes(job.pid)
        assert sorted(ranks) == [0, 1], ranks
        family = [p for r in ranks.values() for p in (r, *r.children(recursive=True))]
        stopped = ranks[1]
        stopped.suspend()  # SIGSTOP
        stopped_at = time.monotonic()
        job.wait(timeout=TIMEOUT_MINUTES * 60 + TORCHRUN_GRACE_S + SLACK_S)
        exited_after = time.monotonic() - stopped_at
        error_at, _ = out.wait_for(r"^\[default0\]:error:", 5)
    finally:
        _kill_leftovers(job, family)
    print(f"surviving rank reported {error_at - stopped_at:.1f} s after SIGSTOP; "
          f"torchrun exited {exited_after:.1f} s after it")
    text = out.text()
    assert job.returncode != 0, text[-4000:]
    # The surviving rank gave up after the timeout, not before, and not much later.
    assert TIMEOUT_MINUTES * 60 - 5 <= error_at - stopped_at <= TIMEOUT_MINUTES * 60 + 15

    # Rank 0's own output: one error line naming the problem and the fix, no traceback.
    (log_dir,) = (tmp_path / "logs").iterdir()
    rank0 = "".join((log_dir / "attempt_0" / "0" / name).read_text()
                    for name in ("stdout.log", "stderr.log"))
    errors = [line for line in rank0.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, rank0[-4000:]
    assert re.fullmatch(
        r"error: rank 0: a collective did not complete within --distributed-timeout-minutes "
        r"0\.25 after iteration \d+ \(a rank stalled or died: check the other ranks' logs and "
        r"their node; raise --distributed-timeout-minutes if a step or a save legitimately "
        r"takes longer\)", errors[0]), errors[0]
    assert "Traceback" not in rank0, rank0[-4000:]
    assert not [line for line in text.splitlines()
                if line.startswith("[default0]:") and "Traceback" in line]
    # torchrun's summary: rank 0 exited with EXIT_COLLECTIVE_TIMEOUT, rank 1 was SIGKILLed.
    from megatron_dynamoe.cli.common import EXIT_COLLECTIVE_TIMEOUT as code
    assert re.search(rf"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: {code} ", text), text[-3000:]
    assert re.search(r"exitcode\s+: -9 .*\(SIGKILL\)", text), text[-3000:]

    # Nothing outlives the job: both ranks and their checkpoint-writer helpers.
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]

