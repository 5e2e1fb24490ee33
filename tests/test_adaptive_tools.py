"""tools/upcycle.py and tools/profile_curriculum.py as users run them: a dense checkpoint
becomes an adaptive MoE checkpoint that loads through its recorded gating config; bad input
is one `error:` line with exit code 2; the profiling pass writes a valid scores file."""

import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_dynamoe.models.architectures import get_architecture
from tests.tool_runner import REPO, run_tool_here


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory, single_rank):
    """A dense tiny-smollm2 checkpoint (random weights; SmolLM2's vocabulary)."""
    import torch

    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.models.builder import ModelProvider
    from megatron_dynamoe.runtime.parallel import ParallelLayout

    arch = get_architecture("tiny-smollm2")
    provider = ModelProvider(arch, None)
    torch.manual_seed(0)
    model = provider.build(provider.transformer_config(ParallelLayout()))
    folder = str(tmp_path_factory.mktemp("dense") / "ckpt")
    save_checkpoint(model, folder, CheckpointInfo(arch, None, {}))
    return folder


def test_upcycle_tool_writes_a_loadable_adaptive_checkpoint(dense_checkpoint, tmp_path,
                                                            single_rank):
    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint, read_info
    from megatron_dynamoe.runtime.parallel import ParallelLayout

    out = str(tmp_path / "moe")
    result = run_tool_here("tools/upcycle.py", "--load", dense_checkpoint, "--output", out,
                           "--method", "split-importance", "--num-experts", "4",
                           "--threshold", "0.05", "--expert-model-parallel-size", "2")
    assert result.returncode == 0, result.stderr
    assert "every split expert at weight 1 vs dense" in result.stderr
    info = read_info(out)
    assert info.extra["method"] == "split-importance"
    assert info.extra["closeness"]["relative_logit_error"] > 0
    provider = AdaptiveMoEProvider.from_checkpoint_info(info)
    assert provider.gating.threshold == 0.05 and provider.gating.scale == 4.0
    load_checkpoint(provider.build(provider.transformer_config(ParallelLayout())), out)

    again = run_tool_here("tools/upcycle.py", "--load", out, "--output", str(tmp_path / "x"))
    assert again.returncode == 2 and "already an MoE checkpoint" in again.stderr
    exists = run_tool_here("tools/upcycle.py", "--load", dense_checkpoint, "--output", out,
                           "--method", "split-importance")
    assert exists.returncode == 2 and "--overwrite" in exists.stderr


@pytest.mark.parametrize("args,message", [
    (["--method", "split-coactivation"], "needs calibration text"),
    (["--method", "split-importance", "--num-experts", "3"], "not divisible"),
    (["--method", "split-importance", "--expert-model-parallel-size", "8"],
     "cannot be split over expert-parallel size 8"),
    (["--method", "replicate", "--gating", "topk", "--topk", "1"], "combine='softmax'"),
])
def test_upcycle_tool_bad_input(dense_checkpoint, tmp_path, args, message, single_rank):
    result = run_tool_here("tools/upcycle.py", "--load", dense_checkpoint, "--output",
                           str(tmp_path / "moe"), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]


def test_profile_tool_bad_input(dense_checkpoint, tmp_path, single_rank):
    common = ["--data-path", "nowhere", "--tokenizer", "smollm2"]
    bad_suffix = run_tool_here("tools/profile_curriculum.py", "--load", dense_checkpoint,
                               "--output", str(tmp_path / "s.csv"), *common)
    assert bad_suffix.returncode == 2 and "name a .json or .npz" in bad_suffix.stderr
    dense = run_tool_here("tools/profile_curriculum.py", "--load", dense_checkpoint,
                          "--output", str(tmp_path / "s.json"), *common)
    assert dense.returncode == 2 and "nothing routes its tokens" in dense.stderr


@pytest.mark.slow
def test_profile_tool_scores_every_training_sample(dense_checkpoint, tmp_path, single_rank):
    from megatron_dynamoe.data.curriculum import CurriculumOrder, load_scores

    prefix = str(tmp_path / "sotu")
    pre = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
                          "--input", "sotu", "--tokenizer", "smollm2", "--limit", "4",
                          "--output-prefix", prefix], cwd=REPO, capture_output=True, text=True)
    assert pre.returncode == 0, pre.stderr
    moe = str(tmp_path / "moe")
    assert run_tool_here("tools/upcycle.py", "--load", dense_checkpoint, "--output", moe,
                         "--method", "split-importance", "--threshold", "0.02").returncode == 0
    scores_path = str(tmp_path / "scores.npz")
    flags = ["--data-path", prefix, "--tokenizer", "smollm2",
             "--seq-length", "64", "--train-iters", "5", "--global-batch-size", "4",
             "--data-cache-path", str(tmp_path / "cache")]
    result = run_tool_here("tools/profile_curriculum.py", "--load", moe, "--output",
                           scores_path, *flags)
    assert result.returncode == 0, result.stderr
    scores = load_scores(scores_path)
    assert scores.metric == "two-expert-share" and len(scores.scores) == 20
    assert np.array_equal(scores.indices, np.arange(20))
    assert ((scores.scores >= 0) & (scores.scores <= 1)).all() and scores.scores.std() > 0
    assert scores.provenance["seq_length"] == 64 and scores.provenance["threshold"] == 0.02
    CurriculumOrder(scores, 4, "global").check_covers(20, 20)
