"""Megatron indexed datasets on disk (PREFIX.bin / PREFIX.idx): read checked, written atomically.

`tools/preprocess_data.py` writes them through `indexed_dataset_writer` (Megatron's
IndexedDatasetBuilder: one sequence per document, the tokenizer's EOD appended);
`open_indexed_dataset` opens one as Megatron's IndexedDataset after checking the pair is whole
and consistent (DataError naming the problem otherwise).
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Sequence

import numpy as np

from megatron_dynamoe.data.blend import _strip_suffix
from megatron_dynamoe.data.errors import DataError

__all__ = ["open_indexed_dataset", "indexed_dataset_writer"]


def _check_index_file(prefix: str) -> None:
    """The .idx header and size, checked before Megatron reads it (a failed IndexedDataset
    constructor also leaves a noisy __del__ behind)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(34)
    problem = None
    if len(head) < 34 or head[:9] != _INDEX_HEADER:
        problem = "not a Megatron index (bad header)"
    else:
        version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
        if version != 1:
            problem = f"index version {version}, expected 1"
        elif code not in {d.value for d in DType}:
            problem = f"unknown token dtype code {code}"
        elif documents < 1 or size < 34 + 12 * sequences + 8 * documents:
            problem = (f"{size} bytes cannot hold {sequences} sequences and "
                       f"{documents - 1} documents (truncated?)")
    if problem:
        raise DataError(f"dataset prefix {prefix!r}: corrupt or unreadable {path}: {problem}; "
                        f"re-run tools/preprocess_data.py")


def open_indexed_dataset(prefix: str):
    """IndexedDataset(prefix), checked: both files present, .idx readable, and the .bin as
    long as the .idx says. Raises DataError naming the problem."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise DataError(f"dataset prefix {prefix!r}: {' and '.join(missing)} not found "
                        f"(make it with tools/preprocess_data.py --output-prefix {prefix})")
    _check_index_file(prefix)
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        itemsize = DType.size(dataset.index.dtype)
        lengths = dataset.sequence_lengths.astype(np.int64)
        pointers = dataset.index.sequence_pointers
        documents = dataset.document_indices
        consistent = (len(lengths) > 0 and pointers[0] == 0 and lengths.min() >= 0
                      and np.array_equal(np.diff(pointers), lengths[:-1] * itemsize)
                      and documents[0] == 0 and np.all(np.diff(documents) >= 0))
    except (AssertionError, ValueError, TypeError, KeyError, OSError, struct.error) as e:
        raise DataError(f"dataset prefix {prefix!r}: corrupt or unreadable {prefix}.idx "
                        f"({type(e).__name__}: {str(e).strip() or 'failed check'}); "
                        f"re-run tools/preprocess_data.py") from e
    if not consistent:
        raise DataError(f"dataset prefix {prefix!r}: corrupt {prefix}.idx (inconsistent "
                        f"sequence pointers or document indices, or no documents); re-run "
                        f"tools/preprocess_data.py")
    size, expected = os.path.getsize(prefix + ".bin"), int(lengths.sum()) * itemsize
    if size != expected:
        raise DataError(f"dataset prefix {prefix!r}: {prefix}.bin holds {size} bytes but "
                        f"{prefix}.idx describes {expected}: the pair is corrupt or mismatched; "
                        f"re-run tools/preprocess_data.py")
    return dataset


def _check_output_prefix(prefix: str, overwrite: bool) -> str:
    if not prefix or prefix.endswith(os.sep) or os.path.isdir(prefix):
        raise DataError(f"output prefix {prefix!r} must name files (PREFIX.bin / PREFIX.idx), "
                        f"not a folder: e.g. data/sotu_text_document")
    prefix = os.path.abspath(_strip_suffix(prefix))
    if not overwrite:
        for path in (prefix + ".bin", prefix + ".idx"):
            if os.path.exists(path):
                raise DataError(f"output {path} exists; pass --overwrite to replace it")
    return prefix


class _DocumentWriter:
    """What `indexed_dataset_writer` yields: add_document(ids) with ids checked against the
    vocabulary; counts documents and tokens."""

    def __init__(self, builder, vocab_size: int):
        self._builder = builder
        self.vocab_size = vocab_size
        self.documents = 0
        self.tokens = 0

    def add_document(self, ids: Sequence[int]) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if array.ndim != 1 or array.size == 0:
            raise DataError("a document must be a non-empty 1-D sequence of token ids")
        if array.min() < 0 or array.max() >= self.vocab_size:
            raise DataError(f"token id out of range [0, {self.vocab_size}) in document "
                            f"{self.documents}")
        self._builder.add_document(array, [int(array.size)])
        self.documents += 1
        self.tokens += int(array.size)


@contextlib.contextmanager
def indexed_dataset_writer(prefix: str, vocab_size: int, overwrite: bool = False):
    """Write a Megatron indexed dataset PREFIX.bin / PREFIX.idx atomically.

    Yields a writer with `add_document(ids)` (one sequence per document; token dtype uint16
    below 65500 ids, int32 above: Megatron's `DType.optimal_dtype`). Both files are written
    under temporary names in the target folder; on success an existing PREFIX.idx is removed
    first, then PREFIX.bin and PREFIX.idx are renamed into place, the .idx last, so a reader
    never finds a mismatched pair (at worst a lone .bin). On any error, or with no document,
    nothing is left behind. Refuses an existing output unless `overwrite` (DataError).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_dynamoe.utils.outputs import replace_with, temporary_sibling

    prefix = _check_output_prefix(prefix, overwrite)
    parent = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(parent, exist_ok=True)
    tmp = temporary_sibling(prefix)  # + .bin / .idx
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=DType.optimal_dtype(vocab_size))
    writer = _DocumentWriter(builder, vocab_size)
    try:
        yield writer
        if writer.documents == 0:
            raise DataError(f"no documents to write to {prefix}: the input holds no text")
        builder.finalize(tmp + ".idx")
        for path in (tmp + ".bin", tmp + ".idx"):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(prefix + ".idx"):
            os.remove(prefix + ".idx")
        replace_with(tmp + ".bin", prefix + ".bin")
        replace_with(tmp + ".idx", prefix + ".idx")
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
        for path in (tmp + ".bin", tmp + ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
