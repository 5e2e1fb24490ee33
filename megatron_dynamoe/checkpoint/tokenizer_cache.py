"""The tokenizer of a GGUF file, kept as a `save_pretrained` folder in the user's cache.

transformers builds a GGUF file's tokenizer by parsing the file's metadata with gguf-py (for
SmolLM2 ~8 s of CPU, most of it the 49k vocabulary strings), and every process that tokenizes
pays it again: each training rank, the preprocessing, evaluation and MoEfy tools. The first
load writes the tokenizer's folder (tokenizer.json, tokenizer_config.json, chat template) to
`$XDG_CACHE_HOME/megatron-dynamoe/gguf-tokenizers/KEY` (~/.cache without XDG_CACHE_HOME),
reloads it and checks that it tokenizes exactly as the GGUF-built one before renaming it into
place; later loads read that folder (~0.3 s). KEY digests the GGUF file's real path, size and
modification time and the transformers / tokenizers versions, so a changed file or library
builds a fresh folder. In a distributed job only global rank 0 ($RANK) writes it, so a cold
cache on a shared home does not take a copy from every rank. `DYNAMOE_TOKENIZER_CACHE=0`
turns the cache off. The cache is only a speed-up: a folder that cannot be written, read, or
that another user could have written is ignored and the tokenizer is built from the GGUF file
as before.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Callable, Optional

# Tokenized by both tokenizers before a cached folder is kept: ASCII, digits, punctuation,
# whitespace runs, accents, CJK, an emoji and the chat markers, with and without the
# special tokens added.
PROBE_TEXT = ("Mr. Speaker, the State of our Union is strong -- 1,776 ways; naïve café\n\n"
              "\tTo be, or not to be: 生存还是毁灭 🙂 <|im_start|>user\nhi<|im_end|>  end")


def cache_root() -> Optional[str]:
    """The folder that holds one sub-folder per cached tokenizer, or None when the cache is
    turned off (DYNAMOE_TOKENIZER_CACHE=0)."""
    if os.environ.get("DYNAMOE_TOKENIZER_CACHE", "1").strip() == "0":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron-dynamoe", "gguf-tokenizers")


def cache_key(gguf_path: str) -> str:
    """Digest of what the tokenizer built from `gguf_path` depends on: the file (real path,
    size, modification time) and the libraries that build and read it."""
    import tokenizers
    import transformers

    info = os.stat(gguf_path)
    fields = [os.path.realpath(gguf_path), str(info.st_size), str(info.st_mtime_ns),
              transformers.__version__, tokenizers.__version__]
    return hashlib.sha256("\0".join(fields).encode()).hexdigest()[:24]


def tokenizer_difference(reference, candidate) -> Optional[str]:
    """None when `candidate` tokenizes as `reference` does (vocabulary, special tokens and
    their ids, chat template, the ids and decoding of PROBE_TEXT), else what differs."""
    checks = [
        ("vocabulary size", len(reference), len(candidate)),
        ("vocabulary", reference.get_vocab(), candidate.get_vocab()),
        ("special tokens", reference.special_tokens_map, candidate.special_tokens_map),
        ("special token ids", reference.all_special_ids, candidate.all_special_ids),
        ("chat template", reference.chat_template, candidate.chat_template),
    ]
    for special in (False, True):
        ids = reference(PROBE_TEXT, add_special_tokens=special)["input_ids"]
        checks.append((f"ids (add_special_tokens={special})", ids,
                       candidate(PROBE_TEXT, add_special_tokens=special)["input_ids"]))
        checks.append((f"decoding (add_special_tokens={special})", reference.decode(ids),
                       candidate.decode(ids)))
    for what, expected, got in checks:
        if expected != got:
            return what
    return None


def _private_folder(path: str) -> bool:
    """Whether `path` is a folder of this user that no one else may write (a tokenizer
    folder is read with from_pretrained: whoever could write it chooses our tokenization)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (os.path.isdir(path) and info.st_uid == os.getuid()
            and not info.st_mode & 0o022)


def save_checked(tokenizer, folder: str) -> Optional[str]:
    """`tokenizer.save_pretrained(folder)`, then reload the folder: None when it tokenizes as
    `tokenizer` does, else what differs (`tokenizer_difference`)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(folder)
    return tokenizer_difference(tokenizer, AutoTokenizer.from_pretrained(folder))


def _write(tokenizer, root: str, target: str, replace: bool) -> None:
    """Save `tokenizer` to a temporary folder in `root`, check that it reloads identically,
    and rename it to `target`; a process that renamed first wins (the folders are equal and
    the rename raises: the caller ignores it). `replace`: `target` exists and could not be
    read; it is removed first."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    if not _private_folder(root):
        return
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        if save_checked(tokenizer, tmp) is not None:
            return  # never cache a tokenizer that does not survive save_pretrained
        if replace or (os.path.isdir(target) and not _private_folder(target)):
            shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def cached_gguf_tokenizer(gguf_path: str, build: Callable[[], object]):
    """The tokenizer of `gguf_path`: from the cache when a checked copy is there, else
    `build()` (transformers' GGUF loader), which is then cached for the next process."""
    root = cache_root()
    if root is None:
        return build()
    target = os.path.join(root, cache_key(gguf_path))
    damaged = False
    if _private_folder(target):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(target)
        except Exception:  # noqa: BLE001  (json, tokenizers' Rust errors: rebuilt below)
            damaged = True
    tokenizer = build()
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return tokenizer  # one writer per job: no burst of copies on a shared home
    try:
        _write(tokenizer, root, target, replace=damaged)
    except Exception:  # noqa: BLE001  (the cache is a speed-up, never the tool's failure)
        pass  # another rank renamed first, a read-only or full home, a failed save
    return tokenizer
