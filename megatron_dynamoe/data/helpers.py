"""Megatron's dataset helpers: the compiled C++ extension, or an exact NumPy / Python stand-in.

GPTDataset and BlendedDataset call `megatron.core.datasets.helpers`, a thin wrapper over the C++
extension `helpers_cpp`. The megatron-core 0.16.1 wheel ships it compiled (cp311 manylinux
x86_64); `compile_helpers()` (running `make` inside site-packages, needing pybind11) is never
needed. Where the extension is missing (an sdist install, another platform)
`dataset_helpers_backend()` installs an exact NumPy / Python re-implementation of the three
functions GPT datasets use (checked against the compiled one by tests/test_data.py).
"""

from __future__ import annotations

import importlib
import math
import sys
import types

import numpy as np

__all__ = [
    "dataset_helpers_backend",
    "py_build_sample_idx",
    "py_build_blending_indices",
    "py_build_exhaustive_blending_indices",
]

_HELPERS_MODULE = "megatron.core.datasets.helpers_cpp"


def dataset_helpers_backend() -> str:
    """Make `megatron.core.datasets.helpers` importable and say how: "compiled" (the C++
    extension shipped in the megatron-core wheel) or "python" (`_python_helpers()` registered
    as `megatron.core.datasets.helpers_cpp` because the extension could not be imported)."""
    module = sys.modules.get(_HELPERS_MODULE)
    if module is not None:
        return "python" if getattr(module, "IS_PYTHON_FALLBACK", False) else "compiled"
    try:
        importlib.import_module(_HELPERS_MODULE)
        return "compiled"
    except ImportError:
        sys.modules[_HELPERS_MODULE] = _python_helpers()
        return "python"


def _python_helpers() -> types.ModuleType:
    """A module with the helpers_cpp functions GPT datasets use, same results bit for bit."""
    module = types.ModuleType(_HELPERS_MODULE, "pure-Python megatron dataset helpers")
    module.IS_PYTHON_FALLBACK = True
    module.build_sample_idx_int32 = lambda *a: py_build_sample_idx(*a, dtype=np.int32)
    module.build_sample_idx_int64 = lambda *a: py_build_sample_idx(*a, dtype=np.int64)
    module.build_blending_indices = py_build_blending_indices
    module.build_exhaustive_blending_indices = py_build_exhaustive_blending_indices

    def _unsupported(*_args, **_kwargs):
        raise NotImplementedError("BERT / T5 index mappings need Megatron's compiled helpers "
                                  "(megatron.core.datasets.utils.compile_helpers)")

    module.build_mapping = module.build_blocks_mapping = _unsupported
    return module


def py_build_sample_idx(sizes: np.ndarray, document_idx: np.ndarray, seq_length: int,
                        num_epochs: int, tokens_per_epoch: int,
                        drop_last_partial_sequence: bool = True,
                        add_extra_token_to_sequence: int = 1,
                        dtype=np.int64) -> np.ndarray:
    """helpers.cpp `build_sample_idx`, vectorised: [num_samples + 1, 2] (index into
    `document_idx`, token offset) of each sample's start. Sample i covers the flattened token
    stream [i * seq_length, (i + 1) * seq_length + extra)."""
    extra = int(add_extra_token_to_sequence)
    total = num_epochs * tokens_per_epoch - extra
    if drop_last_partial_sequence:
        num_samples = total // seq_length
    else:  # the C++ computes this in single precision
        num_samples = int(math.ceil(np.float32(total) / np.float32(seq_length)))
    lengths = sizes[document_idx].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    out = np.zeros((num_samples + 1, 2), dtype=dtype)
    # Entry i >= 1 records where sample i-1 ends: the document holding its last token
    # e = i * seq_length - 1 + extra, at offset e - start (+1 without the extra token).
    last = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length - 1 + extra
    inside = last < starts[-1]
    doc = np.searchsorted(starts, last[inside], side="right") - 1
    out[1:][inside, 0] = doc
    out[1:][inside, 1] = last[inside] - starts[doc] + (1 - extra)
    # A final partial sample (drop_last_partial_sequence=False) ends at the stream's end.
    out[1:][~inside, 0] = len(document_idx) - 1
    out[1:][~inside, 1] = sizes[document_idx[-1]] - extra
    return out


def py_build_blending_indices(dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                              weights, num_datasets: int, size: int, verbose: bool) -> None:
    """helpers.cpp `build_blending_indices` (in place): each sample goes to the dataset whose
    count lags its weight the most."""
    weights = [float(w) for w in weights]
    counts = [0] * num_datasets
    for i in range(size):
        position = max(float(i), 1.0)
        best, best_error = 0, weights[0] * position - counts[0]
        for d in range(1, num_datasets):
            error = weights[d] * position - counts[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1


def py_build_exhaustive_blending_indices(dataset_index: np.ndarray,
                                         dataset_sample_index: np.ndarray, sizes,
                                         num_datasets: int) -> None:
    """helpers.cpp `build_exhaustive_blending_indices` (in place): exactly sizes[d] samples
    of every dataset d, interleaved in proportion."""
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    weights = [s / float(total) for s in sizes]
    counts = [0] * num_datasets
    unspent = [d for d in range(num_datasets) if sizes[d] > 0]
    i = 0
    while unspent:
        position = max(float(i), 1.0)
        best, best_error = -1, -math.inf
        for d in unspent:
            error = weights[d] * position - counts[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
        i += 1
