"""Megatron's --data-path blends and --split weights, parsed and checked.

`parse_blend`: "W1 PREFIX1 W2 PREFIX2 ..." (weighted) or "PREFIX1 PREFIX2 ..." (blended by
size) -> (prefixes, normalised weights or None). `parse_split`: "98,2,0" -> train / valid / test
fractions of each prefix's documents. Bad input raises DataError with one clear line.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

from megatron_dynamoe.data.errors import DataError

__all__ = ["parse_blend", "parse_split"]


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _strip_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[:-len(suffix)]
    return prefix


def parse_blend(data_path: Union[str, os.PathLike, Sequence[str]]
                ) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's --data-path: "W1 PREFIX1 W2 PREFIX2 ..." (a string or its words) or
    "PREFIX1 PREFIX2 ..." (blended by size). Returns (prefixes, weights normalised to sum 1, or
    None). A trailing .bin / .idx on a prefix is dropped. Raises DataError for anything else."""
    if isinstance(data_path, (str, os.PathLike)):
        data_path = [data_path]
    # A quoted blend (`--data-path "0.7 A 0.3 B"`, as a job script's variable passes it) is
    # its words; an existing prefix whose name holds a space stays one word.
    words = [word for item in map(os.fspath, data_path)
             for word in ([item] if _is_prefix(item) else item.split())]
    if not words:
        raise DataError("no data path given: pass 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...'")
    numbers = [_number(w) for w in words]
    usage = ("expected 'W1 PREFIX1 W2 PREFIX2 ...' (weights > 0) or 'PREFIX1 PREFIX2 ...'")
    if all(n is None for n in numbers):
        return [_strip_suffix(w) for w in words], None
    if len(words) % 2 or any(n is None for n in numbers[0::2]) \
            or any(n is not None for n in numbers[1::2]):
        raise DataError(f"bad data blend {' '.join(words)!r}: {usage}")
    weights = numbers[0::2]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise DataError(f"bad data blend weights {weights}: every weight must be a finite "
                        f"number > 0 ({usage})")
    prefixes = [_strip_suffix(w) for w in words[1::2]]
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def _is_prefix(text: str) -> bool:
    """Whether `text` names an existing indexed dataset (PREFIX.bin / .idx, or either file)."""
    prefix = _strip_suffix(text)
    return os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx")


def parse_split(split: str) -> List[float]:
    """"98,2,0" -> [0.98, 0.02, 0.0]: up to three non-negative numbers (train, valid, test),
    separated by ',' or '/', missing ones 0. Raises DataError."""
    values = _split_weights(split)
    return [v / sum(values) for v in values]


def _split_weights(split: str) -> List[float]:
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    values = [_number(p) for p in parts]
    if not 1 <= len(values) <= 3 or any(v is None or not math.isfinite(v) or v < 0
                                        for v in values) or sum(values) <= 0:
        raise DataError(f"bad split {split!r}: give up to three non-negative weights for "
                        f"train,valid,test such as '98,2,0'")
    return values + [0.0] * (3 - len(values))
