"""The main job (`python -m megatron_dynamoe.cli.demo`): its contract, and a miniature end to end.

The miniature (`--quick`: 2 fine-tuning iterations, 2 documents per task) converts the shipped
SmolLM2, MoEfies, fine-tunes DynaMoE and the top-k baseline under torchrun and evaluates:
minutes on 2 cores, hence `slow`. Its table is compared with the checked-in
tests/assets/main-job/quick-cpu.json.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tool_runner import REPO

GOLDEN = os.path.join(REPO, "tests", "assets", "main-job", "quick-cpu.json")
# Per-row numbers of the --quick table compared with the recorded ones: (key, relative, absolute)
# tolerance. CPU runs repeat bit for bit on one machine; the margins leave room for another
# CPU's reduction order, far below what the fine-tuning moves (perplexity ~1e-1 relative).
COMPARED = (("perplexity", 1e-3, 0.0), ("ffn_fraction", 0.0, 1e-3),
            ("relative_flops", 0.0, 1e-3), ("mean_accuracy", 0.0, 1e-6))


def _main_job(*args, timeout=3600):
    return subprocess.run([sys.executable, "-m", "megatron_dynamoe.cli.demo", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_refuses_existing_output(tmp_path, capsys):
    from megatron_dynamoe.cli.common import run_tool
    from megatron_dynamoe.cli.demo import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert run_tool(main, ["--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and "--overwrite" in error
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_self_sample_weight_blends_the_fine_tuning_data(capsys):
    """--self-sample-weight W: every fine-tune reads a Megatron blend of the speeches (1 - W)
    and the dense model's own samples (W); 0 (the default) the speeches alone; W outside
    [0, 1) is refused with one line."""
    from megatron_dynamoe.cli.demo import fine_tune_flags, parse_args

    def data_path(argv):
        flags = fine_tune_flags(parse_args(argv), "/job/data", "/job/data/cache")
        start = flags.index("--data-path") + 1
        return flags[start:flags.index("--micro-batch-size")]

    assert data_path([]) == ["/job/data/sotu"]
    assert data_path(["--self-sample-weight", "0.25"]) == [
        "0.75", "/job/data/sotu", "0.25", "/job/data/self-samples"]
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            parse_args(["--self-sample-weight", bad])
        assert "--self-sample-weight" in capsys.readouterr().err


# A main-job step that, like the trainer, stops cleanly on SIGTERM: it prints its pid, then
# on the signal "saves" for a second and exits 0.
GRACEFUL_STEP = """
import os, signal, sys, time
def stop(signum, frame):
    print("saving", flush=True)
    time.sleep(1)
    print("saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print(os.getpid(), flush=True)
time.sleep(120)
"""


def test_a_stop_signal_reaches_the_running_step(tmp_path):
    """SIGTERM to the main job (kill, scancel) goes on to the step it runs: the step stops
    as that tool does on the signal (here: saves, then exits), the job waits for it, then
    ends by SIGTERM itself, and no step process is left writing into the output folder."""
    import signal

    job = ("import sys\nfrom megatron_dynamoe.cli.demo import Job\n"
           "Job(sys.argv[1]).run('wait', [sys.executable, '-c', sys.argv[2]])\n")
    proc = subprocess.Popen([sys.executable, "-c", job, str(tmp_path), GRACEFUL_STEP],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the job echoes the step's output
            if line.strip().isdigit():
                step_pid = int(line)
                break
        else:
            pytest.fail("the step never started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
        rest = proc.stderr.read()
    finally:
        proc.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(step_pid, 0)  # gone (and reaped by the job)
    with open(tmp_path / "logs" / "01-wait.log") as f:
        assert f.read().split() == [str(step_pid), "saving", "saved"]
    assert "SIGTERM: step 1 (wait) stopped" in rest and "--overwrite" in rest


@pytest.mark.slow
@pytest.mark.multiproc
def test_quick_main_job_end_to_end(tmp_path):
    out = tmp_path / "main"
    result = _main_job("--output-dir", out, "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("results.md", "results.json", "quality_vs_compute.png", "routing.png",
                 "routing.html"):
        assert (out / "results" / name).is_file(), name
    assert list((out / "tensorboard" / "dynamoe").glob("events.out.tfevents.*"))
    assert list((out / "tensorboard" / "topk").glob("events.out.tfevents.*"))
    summary = json.loads((out / "main_job.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [
        "convert", "sample text", "moefy", "preprocess", "fine-tune dynamoe", "fine-tune static",
        "top-k init", "fine-tune top-k", "evaluate"]
    rows = json.loads((out / "results" / "results.json").read_text())["rows"]
    assert {r["family"] for r in rows} == {"dense", "dynamoe", "static", "static-trained",
                                           "topk"}
    _compare_with_golden(rows)


def _row_key(row: dict) -> str:
    return f"{row['family']}/{row['setting']}"


def _compare_with_golden(rows: list) -> None:
    """The --quick table against tests/assets/main-job/quick-cpu.json (as torchtitan's
    checked-in loss curves): the same rows, each number within COMPARED's tolerance.
    DYNAMOE_RECORD_GOLDEN=1 rewrites the file (then review the diff)."""
    found = {_row_key(r): {key: r[key] for key, _, _ in COMPARED} for r in rows}
    if os.environ.get("DYNAMOE_RECORD_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump({"recorded_with": f"torch {torch.__version__}, CPU, "
                                        f"python -m megatron_dynamoe.cli.demo --quick",
                       "rows": found}, f, indent=2)
        return
    with open(GOLDEN) as f:
        golden = json.load(f)["rows"]
    assert sorted(found) == sorted(golden)
    for name, numbers in golden.items():
        for key, relative, absolute in COMPARED:
            want, got = numbers[key], found[name][key]
            if want is None or got is None:
                assert want is got, (name, key, got, want)
                continue
            assert abs(got - want) <= relative * abs(want) + absolute, (name, key, got, want)
