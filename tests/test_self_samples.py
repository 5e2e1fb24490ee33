"""Calibration text sampled from the dense model (data/self_samples.py, tools/sample_text.py):
nucleus sampling draws from the float64 reference nucleus in its proportions (rows wider
than the looked-at candidates included), greedy decoding equals a reference decoding loop
without KV cache, end-of-sequence is suppressed to the requested length, the seed makes the
file reproducible, bad flags give one error line and no file."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_dynamoe.data.self_samples import (
    SamplingConfig,
    nucleus_sample,
    sample_token_ids,
    start_token,
)
from tests.tool_runner import run_tool_here

NEW_TOKENS = 12


def _tokenizer():
    """Byte-level tokenizer (256 ids) plus <s> (256) and </s> (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _greedy_reference(model, start: int, steps: int, banned=None) -> torch.Tensor:
    """Greedy decoding by full forward passes (no KV cache), `banned` never chosen."""
    ids = torch.tensor([[start]])
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids).logits[0, -1].clone()
            if banned is not None:
                logits[banned] = float("-inf")
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, 1:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer): a random tiny LLaMA saved as a Hugging Face folder whose
    EOS is the token greedy decoding picks most often, so that suppressing it matters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=256, eos_token_id=257)).eval()
    free = _greedy_reference(model, 256, NEW_TOKENS)
    favourite = int(free.bincount().argmax())
    # Swap the favourite's output row with </s>'s: greedy decoding now wants </s>.
    with torch.no_grad():
        head = model.lm_head.weight
        head[[favourite, 257]] = head[[257, favourite]]
    folder = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def _reference_nucleus(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """float64, full sort: the row's nucleus probabilities renormalised, 0 outside it."""
    top, ids = row.double().sort(descending=True)
    keep = top.cumsum(0) - top < top_p
    out = torch.zeros_like(row, dtype=torch.float64)
    out[ids[keep]] = top[keep]
    return out / out.sum()


def test_nucleus_sampling_follows_the_reference_nucleus():
    """Rows of 12 tokens, 4 candidates looked at first: a peaked row (nucleus of 2), one
    whose nucleus is exactly the candidates, and flat ones (nucleus of 7 and 11, sorted in
    full). 20,000 draws per row: never outside the reference nucleus, frequencies within
    0.015 of its renormalised probabilities (~5 standard errors)."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.tensor([[0.6, 0.33] + [0.007] * 10,
                         [0.4, 0.3, 0.16, 0.07] + [0.0085] * 8,
                         [0.16, 0.15, 0.14, 0.13, 0.12, 0.11, 0.1] + [0.018] * 5,
                         torch.linspace(1.2, 0.8, 12).tolist()])
    probs = rows[:, torch.randperm(12, generator=generator)]
    probs = probs / probs.sum(-1, keepdim=True)
    top_p = 0.9
    reference = torch.stack([_reference_nucleus(row, top_p) for row in probs])
    assert (reference > 0).sum(-1).tolist() == [2, 4, 7, 11]
    torch.manual_seed(0)
    draws = nucleus_sample(probs.repeat(20000, 1), top_p, candidates=4).view(20000, 4)
    counts = torch.stack([torch.bincount(draws[:, r], minlength=12) for r in range(4)])
    assert (counts[reference == 0] == 0).all(), "a token outside the nucleus was drawn"
    frequencies = counts.double() / 20000
    assert (frequencies - reference).abs().max() < 0.015


def test_greedy_samples_equal_the_reference_loop_without_eos(tiny):
    _, model, tokenizer = tiny
    assert start_token(tokenizer) == 256
    unconstrained = _greedy_reference(model, 256, NEW_TOKENS)
    assert (unconstrained == 257).any(), "the fixture must make </s> a greedy choice"
    config = SamplingConfig(count=3, new_tokens=NEW_TOKENS, batch_size=2, temperature=0)
    ids = sample_token_ids(model, tokenizer, config)
    assert ids.shape == (3, NEW_TOKENS)
    reference = _greedy_reference(model, 256, NEW_TOKENS, banned=257)
    for row in ids:
        assert torch.equal(row, reference)


def test_tool_writes_reproducible_samples(tiny, tmp_path):
    folder, _, tokenizer = tiny
    files = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.jsonl"
        done = run_tool_here("tools/sample_text.py", "--hf-model", folder, "--output", out,
                             "--num-samples", 5, "--batch-size", 2, "--new-tokens",
                             NEW_TOKENS, "--seed", seed, "--device", "cpu")
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["sample"] for r in rows] == list(range(5)) and len({r["text"] for r in rows}) > 1
        files.append(out.read_text())
    assert files[0] == files[1] and files[0] != files[2]
    assert "wrote 5 samples (60 tokens)" in done.stderr


@pytest.mark.parametrize("flags, message", [
    (("--output", "OUT.txt"), "must end in .jsonl"),
    (("--output", "OUT.jsonl", "--top-p", "1.5"), "top_p must be in (0, 1]"),
    (("--output", "EXISTS.jsonl"), "exists; pass --overwrite"),
])
def test_bad_flags_give_one_line_and_no_file(tiny, tmp_path, flags, message):
    folder = tiny[0]
    (tmp_path / "EXISTS.jsonl").write_text("keep\n")
    flags = [str(tmp_path / f) if f.startswith(("OUT", "EXISTS")) else f for f in flags]
    done = run_tool_here("tools/sample_text.py", "--hf-model", folder, *flags)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXISTS.jsonl"]
    assert (tmp_path / "EXISTS.jsonl").read_text() == "keep\n"
