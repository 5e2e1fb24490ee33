"""Training data on Megatron-Core's own dataset code (megatron.core.datasets, 0.16.1).

Pipeline: text -> `tools/preprocess_data.py` (tokenized by `data.tokenizer.HFTokenizerAdapter`)
-> a Megatron indexed dataset PREFIX.bin/.idx (`data.indexed`: IndexedDatasetBuilder, one
sequence per document, the tokenizer's EOD appended) -> `build_gpt_datasets`, here (GPTDataset
per prefix and split, BlendedDataset for weighted blends (`data.blend` parses them), built by
BlendedMegatronDatasetBuilder on Megatron's dataset helpers (`data.helpers`)) ->
`data.sampling.micro_batches` / `MicroBatchSampler` (the global sample order cut into
micro-batches per data-parallel rank) -> batch dicts for GPTModel.

What the trainer needs to know (the position in the data, consumed_samples, and the
data-parallel rank: see `data.sampling`):

- **Sample counts up front.** GPTDataset builds its shuffled sample index for a fixed number of
  samples per split (`num_samples`, as many epochs as that takes; the trainer asks for
  train_iters x global batch size training samples, as Megatron-LM does). The order of
  samples depends on (data, split, seed, seq_length, num_samples): resuming with a different
  `--train-iters` or global batch size rebuilds a *different* order (Megatron behaves the same).
- **Index cache.** The sample / shuffle / blend indices are cached as .npy files under
  `cache_path/data-<fingerprint>/` (the fingerprint hashes every prefix's .idx bytes and .bin
  size, so re-preprocessed data never hits a stale cache). Pass the same `cache_path` on every
  run and nothing is rebuilt; with several ranks, rank 0 builds and the others load after a
  barrier. The cache is never placed inside a Python package.
- **Collectives.** `build_gpt_datasets` must be called on every rank, after torch.distributed
  is initialised (a world of 1 is fine: `parallel.initialize_parallel(ParallelLayout())`):
  Megatron's builder uses barriers and the rank number.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from megatron_dynamoe.data.blend import _split_weights, parse_blend
from megatron_dynamoe.data.errors import DataError
from megatron_dynamoe.data.helpers import dataset_helpers_backend
from megatron_dynamoe.data.indexed import open_indexed_dataset

__all__ = ["GPTDatasets", "build_gpt_datasets", "default_cache_path"]

SPLIT_NAMES = ("train", "valid", "test")


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
