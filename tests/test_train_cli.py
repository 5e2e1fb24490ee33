"""launch/train.py as a user runs it: real data (State of the Union, SmolLM2 tokenizer), a
SIGTERM in the middle of a run, `--load` to resume, TensorBoard events read back."""

import os
import signal
import subprocess
import sys
import time

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 16


def _tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _train_command(data_prefix, save, tb, *extra):
    return [sys.executable, os.path.join(REPO, "launch", "train.py"), "--model", "tiny-smollm2",
            "--tokenizer", "smollm2", "--data-path", data_prefix, "--save", save,
            "--tensorboard-dir", tb, "--micro-batch-size", "2", "--global-batch-size", "4",
            "--seq-length", "64", "--train-iters", str(ITERS), "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--log-interval", "1", "--dynamoe-sensitivity-min", "0.3",
            "--dynamoe-label-fraction", "0.5", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# The default run has the same check through bench/gpu_smoke.sh --quick (a real SIGTERM to
# launch/train.py, resumed bit for bit: tests/test_gpu_smoke.py) and through SLURM's requeue
# (tests/test_slurm.py); this one runs with the slow tests (make test-all).
@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_uninterrupted_run(sotu_prefix, tmp_path):
    # Uninterrupted reference.
    full = subprocess.run(_train_command(sotu_prefix, str(tmp_path / "full"),
                                         str(tmp_path / "tb-full")),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr
    # The same run, stopped by SIGTERM once iteration 5 has been logged.
    save, tb = str(tmp_path / "stopped"), str(tmp_path / "tb-stopped")
    proc = subprocess.Popen(_train_command(sotu_prefix, save, tb), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 600
    for line in proc.stdout:
        lines.append(line)
        if "iteration        5/" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    rest, _ = proc.communicate(timeout=600)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "stopped by a preemption signal" in output
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        stopped_at = int(f.read())
    assert 5 <= stopped_at < ITERS
    # Resume with the same command plus --load.
    resumed = subprocess.run(_train_command(sotu_prefix, save, tb, "--load", save),
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {save}/iter_{stopped_at:07d}" in resumed.stdout

    reference = {e.step: e.value for e in _tb_scalars(str(tmp_path / "tb-full")).Scalars("lm loss")}
    acc = _tb_scalars(tb)
    curve = {e.step: e.value for e in acc.Scalars("lm loss")}
    assert sorted(curve) == list(range(1, ITERS + 1)) == sorted(reference)
    assert curve == reference  # bit-identical on CPU
    first, last = sum(reference[i] for i in (1, 2, 3)), sum(reference[i] for i in (14, 15, 16))
    assert last < first - 1.0  # the loss falls on real text

    tags = set(acc.Tags()["scalars"])
    for tag in ("lm loss", "learning-rate", "grad-norm", "tokens-per-second",
                "dynamoe/sensitivity", "dynamoe/ffn-compute-fraction", "memory/max-rss-gb",
                "dynamoe/layer001/ffn-compute-fraction", "dynamoe/layer001/router-loss",
                "dynamoe/layer001/router-accuracy", "dynamoe/layer001/ep-load-imbalance",
                "dynamoe/layer002/ep-rank0-tokens"):
        assert tag in tags, tag
    assert "dynamoe/layer001/levels" in acc.Tags()["histograms"]


def test_bad_flags_fail_before_training(sotu_prefix, tmp_path):
    """Refused with one line and exit 2 before a model is built; the trainer's `main` through
    `run_tool` in this process (what its own process runs: no ~20 s of start-up per case)."""
    from tests.tool_runner import run_tool_here

    def run(*args):
        return run_tool_here(os.path.join("launch", "train.py"), *args)

    result = run("--model", "tiny-smollm2", "--tensor-model-parallel-size", "3",
                 "--data-path", sotu_prefix, "--tokenizer", "smollm2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: TP=3 must divide")
    result = run("--model", "tiny-smollm2", "--lr-decay-style", "zigzag")
    assert result.returncode == 2 and "--lr-decay-style 'zigzag'" in result.stderr
    result = run("--model", "tiny-llama", "--data-path", sotu_prefix, "--tokenizer", "smollm2")
    assert result.returncode == 2 and "use the model's own tokenizer" in result.stderr


def test_smollm2_dynamoe_loss_falls_on_shipped_corpus(sotu_prefix, tmp_path, single_rank):
    """The real model: SmolLM2-135M from its GGUF, MoEfied (calibrated on SOTU text), then a
    few fine-tuning iterations on the shipped corpus with sensitivities in [0.5, 1]."""
    import torch.nn.functional as F

    from megatron_dynamoe.checkpoint import hf as hf_interop
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.utils.parity import model_batches
    from megatron_dynamoe.data.corpora import load_texts, token_windows
    from megatron_dynamoe.dynamoe.config import DynaMoEConfig
    from megatron_dynamoe.dynamoe.moefy import calibrate_importance, moefy_state_dict
    from megatron_dynamoe.models.builder import build_gpt_model

    folder, gguf = hf_interop.find_smollm2_gguf()
    hf_model, tokenizer = hf_interop.load_hf_model(folder, gguf)
    arch = hf_interop.architecture_from_hf_config(hf_model.config)
    dense = build_gpt_model(arch, transformer_config(arch))
    dense.load_state_dict(hf_interop.hf_to_megatron_state_dict(hf_model.state_dict(), arch))
    del hf_model
    calib = token_windows(tokenizer, load_texts("sotu", limit=30)[20:], 128, 4)
    importance = calibrate_importance(dense, model_batches(calib, 2), gated=True,
                                      activation=F.silu)
    dyn = DynaMoEConfig(label_fraction=0.5)  # default labels: residual-relative, soft
    model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn), dyn)
    model.load_state_dict(moefy_state_dict(dense.state_dict(), dyn, True, importance))
    start = str(tmp_path / "smollm2-dynamoe")
    save_checkpoint(model, start, CheckpointInfo(arch, dyn, {}))
    del dense, model

    tb = str(tmp_path / "tb")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train.py"), "--load", start,
         "--tokenizer", "smollm2", "--data-path", sotu_prefix, "--tensorboard-dir", tb,
         "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "64",
         "--train-iters", "8", "--lr", "2e-4", "--log-interval", "1",
         "--dynamoe-sensitivity-min", "0.5"],
        env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [e.value for e in _tb_scalars(tb).Scalars("lm loss")]
    assert len(curve) == 8
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
