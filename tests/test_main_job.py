"""The main job (`python -m megatron_dynamoe.cli.demo`): its contract, and a miniature end to end.

The miniature (`--quick`: 2 fine-tuning iterations, 2 documents per task) converts the shipped
SmolLM2, MoEfies, fine-tunes DynaMoE and the top-k baseline under torchrun and evaluates:
minutes on 2 cores, hence `slow`.
"""

import json
import subprocess
import sys

import pytest

from tests.tool_runner import REPO


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
        "convert", "moefy", "preprocess", "fine-tune dynamoe", "top-k init",
        "fine-tune top-k", "evaluate"]
    rows = json.loads((out / "results" / "results.json").read_text())["rows"]
    assert {r["family"] for r in rows} == {"dense", "dynamoe", "static", "topk"}
