"""Shared by the launcher tests (test_slurm.py, test_mpirun.py): one tokenizer folder and one
tokenised dataset per test session, the tiny training command, TensorBoard loss curves."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny run of slurm/moefy_tiny.sh: 2 ranks, EP=2 over the 4 shells, DP=2 (+ --tokenizer).
TINY_ARGS = ("--model", "tiny-smollm2", "--dynamoe-num-shells", "4",
             "--expert-model-parallel-size", "2", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--seq-length", "64", "--lr", "3e-3",
             "--lr-warmup-iters", "2", "--log-interval", "1",
             "--dynamoe-sensitivity-min", "0.3", "--dynamoe-label-fraction", "0.5")


def quiet_env(**extra) -> dict:
    """The test process's environment for a child launcher, without its own rank variables
    (a launcher under test must be the only one describing the world)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "OMP_NUM_THREADS") and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1", **extra)
    return env


def shared_sotu_data(tmp_path_factory) -> tuple:
    """(tokenizer folder, data prefix), made once per session: the shipped SmolLM2 tokenizer
    saved as a Hugging Face folder (each training process then loads it in 0.5 s instead of
    parsing the GGUF for ~15 s) and four State of the Union speeches tokenised with it."""
    from megatron_dynamoe.checkpoint.hf import load_tokenizer
    from tests.tool_runner import run_tool_here

    folder = tmp_path_factory.getbasetemp() / "shared-sotu-smollm2"
    tokenizer, prefix = str(folder / "tokenizer"), str(folder / "sotu")
    if not os.path.exists(prefix + ".idx"):
        folder.mkdir(exist_ok=True)
        load_tokenizer("smollm2").save_pretrained(tokenizer)
        result = run_tool_here("tools/preprocess_data.py", "--input", "sotu", "--tokenizer",
                               tokenizer, "--limit", "4", "--output-prefix", prefix)
        assert result.returncode == 0, result.stderr[-3000:]
    return tokenizer, prefix


def loss_curve(tb_dir: str) -> dict:
    """{iteration: lm loss} from the TensorBoard events in `tb_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("lm loss")}
