"""tools/evaluate.py, tools/export.py --ffn-budget and the top-k baseline's checkpoints.

A tiny LLaMA with SmolLM2's vocabulary (so the shipped tokenizer and tasks apply) is
MoEfied with moderately confident random routers, then:
- evaluate writes the table, JSON, plot and routing picture with every baseline, and its
  numbers obey the invariants (dense and level K agree, budgets are met on calibration text);
- export --ffn-budget writes a DynaMoE checkpoint that reproduces the solved variant;
- bad input: one `error:` line and exit 2 before any work, nothing written.
"""

import json
import os

import pytest
import torch

from megatron_dynamoe.models.architectures import get_architecture, transformer_config
from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, read_info, save_checkpoint
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.moefy import moefy_state_dict
from megatron_dynamoe.baselines.topk_init import write_topk_init
from megatron_dynamoe.models.builder import build_gpt_model
from tests.tool_runner import run_tool_here

pytestmark = pytest.mark.usefixtures("single_rank")
ARCH = get_architecture("tiny-smollm2")
DYN = DynaMoEConfig(num_shells=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ckpts")
    torch.manual_seed(11)
    dense = build_gpt_model(ARCH, transformer_config(ARCH))
    save_checkpoint(dense, str(root / "dense"), CheckpointInfo(ARCH, None, {}))
    state = moefy_state_dict(dense.state_dict(), DYN, gated=True)
    gen = torch.Generator().manual_seed(4)
    for key in state:
        if key.endswith("router.weight"):
            state[key] = 0.1 * torch.randn(state[key].shape, generator=gen)
    model = build_gpt_model(ARCH, transformer_config(ARCH, dynamoe=DYN), DYN)
    model.load_state_dict(state)
    save_checkpoint(model, str(root / "dynamoe"), CheckpointInfo(ARCH, DYN, {}))
    write_topk_init(str(root / "dynamoe"), str(root / "topk"))
    return root


def _evaluate(*args):
    return run_tool_here("tools/evaluate.py", *args)


def test_evaluate_end_to_end(checkpoints, tmp_path):
    out = tmp_path / "eval"
    result = _evaluate("--load", checkpoints / "dynamoe", "--dense-load", checkpoints / "dense",
                       "--topk-load", checkpoints / "topk", "--tokenizer", "smollm2",
                       "--output-dir", out, "--tasks", "piqa,lambada", "--limit", "3",
                       "--eval-sequences", "2", "--calibration-sequences", "2",
                       "--seq-length", "32", "--sensitivities", "1,0.5", "--ffn-budget", "0.6",
                       "--routing-tokens", "16")
    assert result.returncode == 0, result.stderr
    for name in ("results.json", "results.md", "quality_vs_compute.png", "routing.png",
                 "routing.html"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    rows = {(r["family"], r["setting"]): r for r in data["rows"]}
    assert {f for f, _ in rows} == {"dense", "dynamoe", "static", "topk"}
    dense, full = rows[("dense", "-")], rows[("dynamoe", "theta=1.000")]
    # theta = 1 is the dense model: same perplexity and task scores, full compute.
    assert full["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4)
    for task, metrics in dense["tasks"].items():
        assert full["tasks"][task] == pytest.approx(metrics, rel=1e-4)
    assert full["ffn_fraction"] == 1.0 and dense["relative_flops"] == 1.0
    for level in (1, 2, 3):
        static = rows[("static", f"level {level}")]
        assert static["ffn_fraction"] == pytest.approx(level / 4)
        assert static["layer_ffn_fraction"] == pytest.approx([level / 4] * ARCH.num_layers)
        assert rows[("topk", f"k={level}")]["ffn_fraction"] == pytest.approx(level / 4)
    [solution] = data["meta"]["budgets"]
    assert abs(solution["achieved"] - 0.6) <= 0.005
    assert data["rows"][1]["budget"] == 0.6
    assert set(data["rows"][0]["tasks"]) == {"piqa", "lambada"}
    assert data["rows"][0]["tasks"]["piqa"]["n"] == 3


def test_export_ffn_budget(checkpoints, tmp_path):
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint
    from megatron_dynamoe.utils.parity import megatron_logits
    from megatron_dynamoe.dynamoe.control import set_layer_sensitivities

    out = tmp_path / "budget"
    result = run_tool_here("tools/export.py", "--load", checkpoints / "dynamoe", "--output", out,
                           "--ffn-budget", "0.6", "--budget-mode", "per-layer", "--tokenizer",
                           "smollm2", "--calibration-sequences", "2",
                           "--calibration-seq-length", "64")
    assert result.returncode == 0, result.stderr
    info = read_info(str(out))
    thetas = info.extra["layer_sensitivities"]
    assert len(thetas) == ARCH.num_layers and info.extra["ffn_budget"] == 0.6
    assert abs(info.extra["budget"]["achieved"] - 0.6) <= 0.005
    # The checkpoint, loaded through the evaluation loader, is the solved variant.
    from megatron_dynamoe.checkpoint.loading import load_for_evaluation

    loaded = load_for_evaluation(str(out))
    reference = build_gpt_model(ARCH, transformer_config(ARCH, dynamoe=DYN), DYN)
    load_checkpoint(reference, str(checkpoints / "dynamoe"))
    set_layer_sensitivities(reference, thetas)
    tokens = torch.randint(0, ARCH.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    assert torch.equal(megatron_logits(loaded.model, tokens), megatron_logits(reference, tokens))


@pytest.mark.parametrize("args,message", [
    (["--tasks", "piqa,mmlu"], "unknown task"),
    (["--limit", "0"], "--limit"),
    (["--sensitivities", "0.5,1.5"], "[0, 1]"),
    (["--ffn-budget", "0"], "--ffn-budget"),
    (["--baselines", "dense,topk"], "--topk-load"),
    (["--baselines", "dense,flextron"], "--baselines"),
])
def test_evaluate_bad_input(checkpoints, tmp_path, args, message):
    out = tmp_path / "never"
    result = _evaluate("--load", checkpoints / "dynamoe", "--tokenizer", "smollm2",
                       "--output-dir", out, *args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and message in result.stderr
    assert not out.exists()


def test_evaluate_missing_or_wrong_checkpoint(checkpoints, tmp_path):
    missing = _evaluate("--load", tmp_path / "nope", "--tokenizer", "smollm2",
                        "--output-dir", tmp_path / "o")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    topk_as_main = _evaluate("--load", checkpoints / "topk", "--tokenizer", "smollm2",
                             "--output-dir", tmp_path / "o")
    assert topk_as_main.returncode == 2 and "--topk-load" in topk_as_main.stderr
    budget_hf = run_tool_here("tools/export.py", "--load", checkpoints / "dynamoe", "--output",
                              tmp_path / "x", "--ffn-budget", "0.6", "--format", "hf")
    assert budget_hf.returncode == 2 and "--format megatron" in budget_hf.stderr
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "x")
