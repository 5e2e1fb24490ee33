"""Calibration text sampled from the dense model (data/self_samples.py, tools/sample_text.py):
greedy decoding equals a reference decoding loop without KV cache, end-of-sequence is
suppressed to the requested length, the seed makes the file reproducible, bad flags give one
error line and no file."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_dynamoe.data.self_samples import SamplingConfig, sample_token_ids, start_token
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
