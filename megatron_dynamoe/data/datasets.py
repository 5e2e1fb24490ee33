"""Training data on Megatron-Core's own dataset code (megatron.core.datasets, 0.16.1).

Pipeline: text -> `tools/preprocess_data.py` -> a Megatron indexed dataset PREFIX.bin/.idx
(IndexedDatasetBuilder: one sequence per document, the tokenizer's EOD appended) ->
`build_gpt_datasets` (GPTDataset per prefix and split, BlendedDataset for weighted blends,
built by BlendedMegatronDatasetBuilder) -> `micro_batches` / `MicroBatchSampler` (the global
sample order cut into micro-batches per data-parallel rank) -> batch dicts for GPTModel.

What the trainer needs to know:

- **Sample counts up front.** GPTDataset builds its shuffled sample index for a fixed number of
  samples per split (`num_samples`, as many epochs as that takes; the trainer asks for
  train_iters x global batch size training samples, as Megatron-LM does). The order of
  samples depends on (data, split, seed, seq_length, num_samples): resuming with a different
  `--train-iters` or global batch size rebuilds a *different* order (Megatron behaves the same).
- **Position = consumed_samples.** A run's position in the data is one integer, the number of
  samples consumed by all data-parallel ranks together (iteration x global batch size). That is
  what checkpoints store; `micro_batches(..., consumed_samples=k)` resumes exactly at global
  sample k, whatever the DP size of the resumed run.
- **Index cache.** The sample / shuffle / blend indices are cached as .npy files under
  `cache_path/data-<fingerprint>/` (the fingerprint hashes every prefix's .idx bytes and .bin
  size, so re-preprocessed data never hits a stale cache). Pass the same `cache_path` on every
  run and nothing is rebuilt; with several ranks, rank 0 builds and the others load after a
  barrier. The cache is never placed inside a Python package.
- **Collectives.** `build_gpt_datasets` must be called on every rank, after torch.distributed
  is initialised (a world of 1 is fine: `parallel.initialize_parallel(ParallelLayout())`):
  Megatron's builder uses barriers and the rank number.
- **DP rank.** `dp_rank` / `dp_size` are the data-parallel rank and size
  (`parallel_state.get_data_parallel_rank()` / `..._world_size()`), not the global rank: every
  TP / PP / EP rank of one model replica must read the same micro-batches.

Dataset helpers: GPTDataset and BlendedDataset call `megatron.core.datasets.helpers`, a thin
wrapper over the C++ extension `helpers_cpp`. The megatron-core 0.16.1 wheel ships it compiled
(cp311 manylinux x86_64); `compile_helpers()` (running `make` inside site-packages, needing
pybind11) is never needed. Where the extension is missing (an sdist install, another platform)
`dataset_helpers_backend()` installs an exact NumPy / Python re-implementation of the three
functions GPT datasets use (checked against the compiled one by tests/test_data.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import struct
import sys
import types
from collections import OrderedDict
from typing import (Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch

__all__ = [
    "DataError",
    "dataset_helpers_backend",
    "HFTokenizerAdapter",
    "parse_blend",
    "parse_split",
    "open_indexed_dataset",
    "indexed_dataset_writer",
    "GPTDatasets",
    "build_gpt_datasets",
    "MicroBatchSampler",
    "micro_batch_starts",
    "collate_samples",
    "micro_batches",
]

SPLIT_NAMES = ("train", "valid", "test")
_HELPERS_MODULE = "megatron.core.datasets.helpers_cpp"


class DataError(ValueError):
    """Bad data input (missing or corrupt files, bad blend / split / sizes): one clear line."""


# ---------------------------------------------------------------------------------------------
# Megatron's compiled dataset helpers, or an exact pure-Python stand-in
# ---------------------------------------------------------------------------------------------
def dataset_helpers_backend() -> str:
    """Make `megatron.core.datasets.helpers` importable and say how: "compiled" (the C++
    extension shipped in the megatron-core wheel) or "python" (`_python_helpers()` registered
    as `megatron.core.datasets.helpers_cpp` because the extension could not be imported)."""
    module = sys.modules.get(_HELPERS_MODULE)
    if module is not None:
        return "python" if getattr(module, "IS_PYTHON_FALLBACK", False) else "compiled"
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
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


# ---------------------------------------------------------------------------------------------
# Tokenizer adapter
# ---------------------------------------------------------------------------------------------
def _tokenizer_base():
    from megatron.core.tokenizers import MegatronTokenizerBase

    return MegatronTokenizerBase


class HFTokenizerAdapter(_tokenizer_base()):
    """A Hugging Face tokenizer behind Megatron-Core's tokenizer interface.

    What GPTDataset uses: `eod` (end-of-document id: the tokenizer's EOS unless `eod_token`
    names another token), `vocab_size` (len(tokenizer), added tokens included; also picks the
    .bin dtype), `pad` (-1: pretraining data is never padded, and SmolLM2's pad token equals its
    EOS), and `unique_identifiers`, which enter the index-cache hash: they hold only `name`, the
    vocabulary size and the EOD id, so the same tokenizer named the same way hits the cache.
    `tokenize` does not add special tokens (preprocessing appends the EOD itself).
    """

    def __init__(self, tokenizer, name: str, eod_token: Optional[str] = None):
        super().__init__(str(name), {})
        self.hf_tokenizer = tokenizer
        self.name = str(name)
        if eod_token is None:
            eod = tokenizer.eos_token_id
            if eod is None:
                raise DataError(f"tokenizer {name!r} has no EOS token: name the end-of-document "
                                f"token explicitly (eod_token / --eod-token)")
        else:
            eod = tokenizer.convert_tokens_to_ids(eod_token)
            if eod is None or (eod == tokenizer.unk_token_id and eod_token != tokenizer.unk_token):
                raise DataError(f"end-of-document token {eod_token!r} is not in the vocabulary "
                                f"of tokenizer {name!r}")
        self._eod = int(eod)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return -1

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    @property
    def vocab(self) -> Dict[str, int]:
        return self.hf_tokenizer.get_vocab()

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", f"{__name__}.{type(self).__qualname__}"),
                            ("tokenizer_path", self.name), ("vocab_size", self.vocab_size),
                            ("eod", self.eod)])

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, no special tokens (fast tokenizers batch in Rust)."""
        return self.hf_tokenizer(list(texts), add_special_tokens=False,
                                 verbose=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.decode(list(ids))

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        return self.hf_tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                     **kwargs)

    def __repr__(self) -> str:
        return f"HFTokenizerAdapter({self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"


# ---------------------------------------------------------------------------------------------
# Blend, split and indexed datasets on disk
# ---------------------------------------------------------------------------------------------
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
    if isinstance(data_path, os.PathLike):
        data_path = [os.fspath(data_path)]
    words = data_path.split() if isinstance(data_path, str) else [os.fspath(w) for w in data_path]
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

    from megatron_dynamoe.checkpoint.outputs import replace_with, temporary_sibling

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


# ---------------------------------------------------------------------------------------------
# GPT datasets
# ---------------------------------------------------------------------------------------------
class GPTDatasets(NamedTuple):
    """train / valid / test: a GPTDataset (one prefix), a BlendedDataset (several), or None
    (a split of weight 0)."""

    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]


def _fingerprint(prefixes: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for prefix in prefixes:
        digest.update(os.path.abspath(prefix).encode())
        digest.update(str(os.path.getsize(prefix + ".bin")).encode())
        with open(prefix + ".idx", "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def default_cache_path(run_folder: Optional[str] = None) -> str:
    """Where dataset indices are cached when --data-cache-path is not given: the run's own
    folder (`RUN/data_cache`), else this user's cache folder ($XDG_CACHE_HOME or ~/.cache,
    `megatron-dynamoe/data`). Never a shared temporary folder: Megatron loads the cached .npy
    files with pickle enabled, so whoever can write them can run code in the job."""
    if run_folder:
        return os.path.join(run_folder, "data_cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron-dynamoe", "data")


def _check_cache_owner(folder: str) -> None:
    """Refuse an index-cache folder another user owns or may write (see default_cache_path):
    Megatron would unpickle what they put there."""
    info = os.stat(folder)
    if info.st_uid != os.getuid():
        raise DataError(f"cache folder {folder} belongs to another user (uid {info.st_uid}): "
                        f"Megatron loads its index files with pickle enabled; use a "
                        f"--data-cache-path of your own")
    if info.st_mode & 0o022:
        raise DataError(f"cache folder {folder} is writable by other users (mode "
                        f"{oct(info.st_mode & 0o777)}): Megatron loads its index files with "
                        f"pickle enabled; chmod go-w it or use another --data-cache-path")


def _check_cache_path(cache_path: Optional[str]) -> str:
    if not cache_path:
        raise DataError("a cache folder for the dataset indices is required (cache_path / "
                        "--data-cache-path), e.g. the run's output folder")
    cache_path = os.path.realpath(cache_path)
    import megatron

    for package in [os.path.dirname(os.path.abspath(__file__))] + list(megatron.__path__):
        package = os.path.realpath(package)
        if os.path.commonpath([cache_path, package]) == package:
            raise DataError(f"cache folder {cache_path} is inside the installed package "
                            f"{package}: use a run / temporary folder")
    if os.path.exists(cache_path) and not os.path.isdir(cache_path):
        raise DataError(f"cache folder {cache_path} exists and is not a folder")
    return cache_path


def _check_split_sizes(prefix: str, lengths: np.ndarray, split_matrix, seq_length: int) -> None:
    """Mirror Megatron's document split (round(fraction x documents)) and refuse a split that
    cannot hold one sample of seq_length + 1 tokens."""
    count = len(lengths)
    for name, bounds in zip(SPLIT_NAMES, split_matrix):
        if bounds is None:
            continue
        begin = int(round(bounds[0] * float(count)))
        end = int(round(bounds[1] * float(count)))
        tokens = int(lengths[begin:end].astype(np.int64).sum())
        if tokens < seq_length + 1:
            raise DataError(
                f"dataset {prefix!r}: its {name} split (documents {begin}..{end} of {count}) "
                f"holds {tokens} tokens, fewer than seq_length + 1 = {seq_length + 1}: use a "
                f"shorter seq_length, more data, or a split giving {name} more documents")


def build_gpt_datasets(data_path: Union[str, Sequence[str]], tokenizer, *, seq_length: int,
                       num_samples: Sequence[Optional[int]], cache_path: str,
                       split: str = "98,2,0", seed: int = 1234,
                       reset_position_ids: bool = False, reset_attention_mask: bool = False,
                       eod_mask_loss: bool = False, create_attention_mask: bool = True,
                       is_built_on_rank: Optional[Callable[[], bool]] = None) -> GPTDatasets:
    """Train / valid / test datasets over Megatron indexed datasets, with Megatron's GPTDataset,
    BlendedDataset and BlendedMegatronDatasetBuilder.

    data_path: "W1 PREFIX1 W2 PREFIX2 ..." (weights, normalised) or "PREFIX ..." (a string or
        its words, see `parse_blend`). split: "train,valid,test" weights over each prefix's
        documents (Megatron's --split). num_samples: (train, valid, test) samples to build; a
        split is repeated over as many epochs as needed (None: one epoch, unweighted data only).
    tokenizer: an `HFTokenizerAdapter` (its EOD id drives the flags below).
    cache_path: folder for the cached indices (see the module docstring); never a package.
    Flags (Megatron's GPTDatasetConfig, defaults as Megatron-LM's): reset_position_ids /
    reset_attention_mask restart positions / attention after each EOD; eod_mask_loss zeroes the
    loss where the input token is the EOD; create_attention_mask=False leaves the mask to the
    attention kernel (the batch then has attention_mask None).
    is_built_on_rank: Megatron's predicate (default: every rank builds and reads data).

    Each sample is a dict: tokens / labels (labels = tokens shifted by one) / loss_mask /
    position_ids [s], attention_mask [1, s, s] bool (True = masked); blends add dataset_id.
    Raises DataError (a ValueError) for a missing or corrupt prefix, bad weights / split /
    sizes, or a split with fewer than seq_length + 1 tokens; RuntimeError when
    torch.distributed is not initialised. Call on every rank.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(data_path)
    prefixes = [os.path.abspath(p) for p in prefixes]
    if int(seq_length) != seq_length or seq_length < 2:
        raise DataError(f"seq_length must be an integer >= 2, got {seq_length}")
    seq_length = int(seq_length)
    # Megatron re-parses the split string: hand it plain decimals, check with its own matrix.
    split = ",".join(np.format_float_positional(v, trim="-") for v in _split_weights(split))
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    sizes = list(num_samples)
    if len(sizes) != 3:
        raise DataError(f"num_samples must give (train, valid, test), got {num_samples!r}")
    for name, size in zip(SPLIT_NAMES, sizes):
        if size is not None and (int(size) != size or size < 0):
            raise DataError(f"num_samples for {name} must be an integer >= 0, got {size}")
        if size is None and weights is not None and len(prefixes) > 1:
            raise DataError(f"a weighted blend needs a number of {name} samples (got None)")
    sizes = [None if s is None else int(s) for s in sizes]
    for prefix in prefixes:
        dataset = open_indexed_dataset(prefix)
        _check_split_sizes(prefix, dataset.sequence_lengths, split_matrix, seq_length)
        del dataset
    cache = os.path.join(_check_cache_path(cache_path), f"data-{_fingerprint(prefixes)}")
    if not torch.distributed.is_initialized():
        raise RuntimeError("build_gpt_datasets needs torch.distributed initialised (Megatron's "
                           "dataset builder synchronises ranks): call "
                           "megatron_dynamoe.runtime.parallel.initialize_parallel first")
    os.makedirs(cache, mode=0o700, exist_ok=True)
    _check_cache_owner(cache)
    backend = dataset_helpers_backend()
    if backend != "compiled":
        from megatron_dynamoe.utils.log import log

        log("megatron dataset helpers: C++ extension missing, using the pure-Python ones")

    if len(prefixes) == 1:
        weights = None  # one prefix: a plain GPTDataset, no single-member BlendedDataset
    config = GPTDatasetConfig(
        random_seed=int(seed), sequence_length=seq_length, blend=(prefixes, weights),
        split=split, path_to_cache=cache, tokenizer=tokenizer,
        reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss, create_attention_mask=create_attention_mask)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True),
                                            config)
    return GPTDatasets(*builder.build())


# ---------------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------------
class MicroBatchSampler:
    """Megatron's pretraining batch sampler (MegatronPretrainingSampler): the dataset order
    (already shuffled by GPTDataset with the data seed) cut into global micro-batch steps of
    micro_batch_size x dp_size samples; DP rank r takes the r-th slice of micro_batch_size.

    Step t covers global samples [t * mbs * dp, (t + 1) * mbs * dp), so `consumed_samples`
    (samples consumed by all DP ranks, what checkpoints store) fixes the position exactly:
    iteration starts at global sample `consumed_samples`. An incomplete last step is dropped.
    Yields lists of dataset indices; usable as a DataLoader `batch_sampler`.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if micro_batch_size < 1 or dp_size < 1:
            raise DataError(f"micro_batch_size and dp_size must be >= 1, got "
                            f"{micro_batch_size} and {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        if total_samples < 1:
            raise DataError("the dataset is empty")
        if not 0 <= consumed_samples <= total_samples:
            raise DataError(f"consumed_samples={consumed_samples} is outside the dataset's "
                            f"{total_samples} samples: build the datasets with the same (or "
                            f"more) num_samples as the run being resumed")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)

    @property
    def step_size(self) -> int:
        """Samples per micro-batch step over all DP ranks."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step_size

    def __iter__(self) -> Iterator[List[int]]:
        for start in micro_batch_starts(self.consumed_samples, self.micro_batch_size, len(self),
                                        self.dp_rank, self.dp_size):
            yield list(range(start, start + self.micro_batch_size))


def micro_batch_starts(consumed_samples: int, micro_batch_size: int, count: int,
                       dp_rank: int, dp_size: int) -> List[int]:
    """The first global sample of each of DP rank `dp_rank`'s next `count` micro-batches from
    sample `consumed_samples` on: micro-batch m starts at consumed + (m x dp_size + dp_rank)
    x micro_batch_size (every step takes dp_size consecutive micro-batches, one per rank).
    The one sample order of training (trainer) and of `MicroBatchSampler`."""
    return [consumed_samples + (m * dp_size + dp_rank) * micro_batch_size for m in range(count)]


def collate_samples(samples: Sequence[Dict], shared_attention_mask: bool = True) -> Dict:
    """Stack GPTDataset samples into a GPTModel batch: tokens / labels / position_ids
    [b, s] int64, loss_mask [b, s] float32, attention_mask bool (True = masked) [1, 1, s, s]
    when every sample shares the causal mask (`shared_attention_mask`, i.e. no
    reset_attention_mask), [b, 1, s, s] otherwise, None when the dataset makes no mask."""
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
             for key in ("tokens", "labels", "loss_mask", "position_ids")}
    masks = [s.get("attention_mask") for s in samples]
    if masks[0] is None:
        batch["attention_mask"] = None
    elif shared_attention_mask:
        batch["attention_mask"] = masks[0].unsqueeze(0)
    else:
        batch["attention_mask"] = torch.stack(masks)
    return batch


def _shares_mask(dataset) -> bool:
    config = getattr(dataset, "config", None)
    return not getattr(config, "reset_attention_mask", False)


def micro_batches(dataset, micro_batch_size: int, *, consumed_samples: int = 0,
                  dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0) -> Iterator[Dict]:
    """This DP rank's micro-batches (dicts, see `collate_samples`) from global sample
    `consumed_samples` on, in `MicroBatchSampler` order: deterministic given the dataset (its
    data, split, seed, seq_length, num_samples) and `consumed_samples`. num_workers > 0 reads
    through a torch DataLoader with that many worker processes (same order)."""
    import functools

    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank,
                                dp_size)
    collate = functools.partial(collate_samples, shared_attention_mask=_shares_mask(dataset))
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=num_workers)
        return iter(loader)
    return (collate([dataset[i] for i in indices]) for indices in sampler)
