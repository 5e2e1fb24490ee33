"""Model checkpoints in Megatron-Core's `torch_dist` format, written atomically.

A checkpoint is a folder written by `megatron.core.dist_checkpointing.save` from the model's
`sharded_state_dict()` (so it loads at any TP / PP / EP layout), plus `model.json`: the
model family, the architecture, the DynaMoE config (null for a dense model) and provenance
(older checkpoints call it `dynamoe.json`, still read), and `checksums.json`: the size and
SHA-256 of every other file (`checkpoint_integrity`). Folders written by plain Megatron-Core
(no `model.json`) load too; the caller then supplies the architecture. Loading first verifies the checksums and refuses pickles that could run code.

Writes go to a hidden temporary sibling folder that is renamed into place only after every
rank finished, so an interrupted or failed save never leaves a folder that looks complete;
an existing folder is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_dynamoe.utils.outputs import (
    replace_with,
    stale_temporaries,
    temporary_sibling,
)
from megatron_dynamoe.models.architectures import ModelArchitecture
from megatron_dynamoe.dynamoe.config import DynaMoEConfig

METADATA_FILE = "model.json"
# What checkpoints written before the family registry call the same file; still read.
LEGACY_METADATA_FILE = "dynamoe.json"
# Sharded keys of a GPTModel's weights (a training checkpoint adds optimizer.* and others).
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
FORMAT_VERSION = 1
_MEGATRON_METADATA = "metadata.json"  # written by dist_checkpointing


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


@dataclass
class CheckpointInfo:
    """What `model.json` records about a checkpoint."""

    architecture: ModelArchitecture
    dynamoe: Optional[DynaMoEConfig]
    extra: dict

    def to_json(self) -> dict:
        return dict(format_version=FORMAT_VERSION, architecture=self.architecture.to_dict(),
                    dynamoe=self.dynamoe.to_dict() if self.dynamoe else None, extra=self.extra)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_path(path: Optional[str]) -> str:
    if not dist.is_initialized():
        return path
    holder = [path]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def check_loadable(directory: str) -> None:
    """Raise CheckpointError unless `directory` holds a complete dist checkpoint."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint folder {directory!r} does not exist")
    if not os.path.isfile(os.path.join(directory, _MEGATRON_METADATA)):
        raise CheckpointError(
            f"{directory!r} is not a complete Megatron torch_dist checkpoint (no "
            f"{_MEGATRON_METADATA}); point to the folder that dist_checkpointing.save wrote")


def metadata_path(directory: str) -> Optional[str]:
    """The checkpoint's metadata file: `model.json`, else the older name `dynamoe.json`, else
    None (a plain Megatron-Core checkpoint)."""
    for name in (METADATA_FILE, LEGACY_METADATA_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def read_info(directory: str) -> Optional[CheckpointInfo]:
    """The checkpoint's `model.json` (or older `dynamoe.json`), or None for a plain
    Megatron-Core checkpoint."""
    check_loadable(directory)
    path = metadata_path(directory)
    if path is None:
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        arch = ModelArchitecture(**raw["architecture"])
        dyn = DynaMoEConfig.from_dict(raw["dynamoe"]) if raw.get("dynamoe") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt: {e}") from e
    return CheckpointInfo(arch, dyn, raw.get("extra", {}))


def resolve_architecture(directory: str, preset: Optional[str],
                         flags: Optional[Mapping] = None) -> tuple:
    """(ModelArchitecture, CheckpointInfo or None) of a checkpoint: from its model.json; for
    a plain Megatron checkpoint from `--model PRESET`, from Megatron's architecture flags
    (`flags`: Megatron-LM argument names, see checkpoint.megatron_args), or from the
    arguments Megatron-LM saved in its common.pt, in that order. Raises CheckpointError when
    none is available, when both a preset and flags are given, or when either disagrees
    with model.json."""
    from megatron_dynamoe.checkpoint.megatron_args import (
        architecture_from_megatron_args,
        read_saved_arguments,
    )
    from megatron_dynamoe.models.architectures import get_architecture

    if preset is not None and flags:
        raise CheckpointError("give the architecture once: --model PRESET or Megatron's "
                              "architecture flags, not both")
    try:
        given = (get_architecture(preset) if preset is not None else
                 architecture_from_megatron_args(flags, "the architecture flags") if flags
                 else None)
        info = read_info(directory)
        if info is None and given is None:
            saved = read_saved_arguments(directory)
            if saved is not None:
                return architecture_from_megatron_args(
                    saved, f"the arguments saved in {directory}/common.pt"), None
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if info is None:
        if given is None:
            raise CheckpointError(f"{directory!r} has no {METADATA_FILE} and no saved Megatron-LM "
                                  f"arguments (a plain Megatron-Core checkpoint): pass --model "
                                  f"PRESET or Megatron's architecture flags (--num-layers "
                                  f"--hidden-size --ffn-hidden-size --num-attention-heads ...)")
        return given, None
    if given is not None and given != info.architecture:
        what = f"--model {preset}" if preset is not None else "the architecture flags"
        raise CheckpointError(f"{what} does not match the architecture recorded in "
                              f"{directory!r}; drop them")
    return info.architecture, info


def remove_stale_temporaries(parent: str, name_pattern: str) -> list:
    """Delete the hidden temporary folders `.{name_pattern}.tmp-*` in `parent` that an
    interrupted save (a killed job) left behind; returns their paths. Call it on rank 0 before
    a save into `parent`, which only one run writes to: a full-size checkpoint that never
    completed would otherwise stay on the file system forever."""
    stale = stale_temporaries(parent, name_pattern)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def parallel_save_strategy(group):
    """Megatron's fully parallel save (`FullyParallelSaveStrategyWrapper`) over `group` (the
    ranks holding replicas: data parallel), so that each replica's shards are written once,
    split over its holders, instead of all by the first; None (the default strategy) when
    `group` is None or has one rank."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def parallel_load_strategy(directory: str, group):
    """Megatron's fully parallel load (`FullyParallelLoadStrategyWrapper`) of `directory`
    over `group`: each replica's shards are read once, split over its holders, and exchanged;
    None (the default strategy) when `group` is None or has one rank."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(directory), group)


def save_checkpoint(model: torch.nn.Module, directory: str, info: CheckpointInfo,
                    overwrite: bool = False, parallel_group=None, async_queue=None,
                    then: Optional[Callable[[], None]] = None) -> None:
    """Save `model` (this rank's part; every rank calls) to `directory` atomically: shards,
    then model.json, then checksums.json (hashing split over the ranks), then the rename,
    then `then()` (every rank). `parallel_group`: the ranks holding replicas (e.g. data
    parallel) split the writing of each replicated shard (`parallel_save_strategy`).

    `async_queue` (Megatron's `AsyncCallsQueue`): the shards are copied to host buffers and
    written by a background process (`dist_checkpointing.save(async_sharded_save=True)`);
    this returns as soon as the request is scheduled, and everything after the shards
    (model.json, checksums, the rename, `then`) runs when the caller finalizes the queue
    (`maybe_finalize_async_calls`, on every rank). Until then only the hidden temporary
    folder exists, so an interrupted asynchronous save leaves nothing that looks complete."""
    from megatron.core import dist_checkpointing

    directory = os.path.abspath(directory)
    tmp = None
    if _rank() == 0:
        if os.path.exists(directory) and not overwrite:
            tmp = f"error: {directory} exists; pass --overwrite to replace it"
        else:
            parent = os.path.dirname(directory)
            os.makedirs(parent, exist_ok=True)
            remove_stale_temporaries(parent, glob.escape(os.path.basename(directory)))
            tmp = temporary_sibling(directory)
            os.makedirs(tmp)
    tmp = _broadcast_path(tmp)
    if tmp.startswith("error: "):
        raise CheckpointError(tmp[len("error: "):])
    try:
        from megatron_dynamoe.checkpoint.integrity import run_on_rank0, write_manifest
        from megatron_dynamoe.runtime.helper_processes import start_checkpoint_writer_manager

        start_checkpoint_writer_manager()  # survives the job's preemption signals
        request = dist_checkpointing.save(
            model.sharded_state_dict(), tmp,
            sharded_strategy=parallel_save_strategy(parallel_group),
            async_sharded_save=async_queue is not None)
    except BaseException:
        _discard(tmp)
        raise

    def finish() -> None:
        try:
            _barrier()
            # Each step below ends in a collective that hands rank 0's failure to every
            # rank, so no rank waits for a rank that already gave up.
            run_on_rank0(lambda: _write_info(tmp, info))
            write_manifest(tmp)  # checksums.json: last, so that it covers every other file
            run_on_rank0(lambda: _publish(tmp, directory))
        except BaseException:
            _discard(tmp)
            raise
        if then is not None:
            then()

    if async_queue is None:
        finish()
        return
    request.add_finalize_fn(finish)
    async_queue.schedule_async_request(request)


def describe_folder(folder: str, info: CheckpointInfo) -> None:
    """Write model.json and then checksums.json into a checkpoint folder whose shards were
    written by other means (one process; e.g. a streaming conversion), as `save_checkpoint`
    ends its own saves."""
    from megatron_dynamoe.checkpoint.integrity import write_manifest

    _write_info(folder, info)
    write_manifest(folder, collective=False)


def _discard(tmp: str) -> None:
    """Remove an unfinished save's temporary folder (rank 0)."""
    if _rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


def _write_info(folder: str, info: CheckpointInfo) -> None:
    from megatron_dynamoe.runtime import transformer_impl

    from megatron_dynamoe.models.registry import FAMILY_KEY, family_of

    payload = info.to_json()
    # Provenance: the layer implementation that wrote these weights, and the model family
    # (models.registry) whoever loads them builds.
    payload["extra"] = {**payload["extra"], "transformer_impl": transformer_impl.current(),
                        FAMILY_KEY: family_of(info)}
    with open(os.path.join(folder, METADATA_FILE), "w") as f:
        json.dump(payload, f, indent=2)


def _publish(tmp: str, directory: str) -> None:
    replace_with(tmp, directory)


def load_checkpoint(model: torch.nn.Module, directory: str, origin: str = "this model",
                    verify_checksums: bool = True) -> None:
    """Load `directory` into `model` at the model's own layout (every rank calls).

    Before anything is read: `verify_checkpoint_files` (checksums unless `verify_checksums`
    is False, complete files, no unsafe pickle), and the checkpoint's tensors must be the
    model's (names and global shapes; `origin` names the model in errors, e.g. "--model
    tiny-llama"). Raises CheckpointError with one line naming the problem for a missing /
    incomplete / corrupt / tampered folder or an architecture mismatch.
    """
    from megatron.core import dist_checkpointing

    metadata = verify_checkpoint_files(directory, verify_checksums=verify_checksums)
    if metadata is not None:
        check_tensors_match(model, metadata, directory, origin)
    from megatron_dynamoe.checkpoint.megatron_args import unpickling_allowlist

    template = model.sharded_state_dict()
    try:
        # common.pt of a Megatron-LM checkpoint holds its arguments (a Namespace with
        # Megatron's enums); verify_checkpoint_files has checked it holds nothing else.
        with torch.serialization.safe_globals(unpickling_allowlist()):
            state = dist_checkpointing.load(template, directory)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        raise CheckpointError(f"cannot load {directory!r} into {origin}: "
                              f"{describe_load_failure(e)} (is "
                              f"the checkpoint complete, and does the architecture match it?)"
                              ) from e
    # dist_checkpointing also returns the folder's whole common state: a training
    # checkpoint (iter_N) adds optimizer / scheduler / training entries, not the model's.
    state = {k: v for k, v in state.items() if k in template}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{directory!r} does not match {origin}: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")


def verify_checkpoint_files(directory: str, verify_checksums: bool = True,
                            collective: bool = True):
    """Before any model is built or any pickle is loaded, raise CheckpointError (one line
    naming the file and the fix) when a checkpoint is incomplete, corrupt or unsafe: a file
    of its `checksums.json` is missing or differs in size or hash (`verify_checksums=False`
    skips only the hashing), a file its .metadata refers to is missing or truncated, or its
    .metadata / common.pt / byte items hold a pickle that could run code. A checkpoint
    without `checksums.json` (plain Megatron-Core, older versions) passes with a note. Every
    rank calls it (the hashing is split over the ranks; `collective=False`: this process
    alone). Returns the torch.distributed.checkpoint Metadata, or None for another backend."""
    from megatron_dynamoe.checkpoint.integrity import verify_checkpoint

    return verify_checkpoint(directory, verify_checksums, collective)


def check_tensors_match(model, metadata, directory: str, origin: str) -> None:
    """Raise CheckpointError naming the first tensor whose name or global shape differs between
    the checkpoint and `model` (an architecture mismatch). dist_checkpointing alone would
    silently ignore checkpoint tensors the model lacks (e.g. an untied output layer)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    stored = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
              if isinstance(v, TensorStorageMetadata)}
    wanted = {}
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedTensor):
            wanted[item.key] = tuple(item.global_shape)
        elif isinstance(item, ShardedTensorFactory):
            wanted.setdefault(item.key, None)  # built into shards at load time: name only
    mismatch = f"{directory!r} does not match the architecture of {origin}"
    for key, shape in wanted.items():
        if key not in stored:
            raise CheckpointError(f"{mismatch}: the checkpoint has no tensor {key!r} (wrong "
                                  f"--model?)")
        if shape is not None and stored[key] != shape:
            raise CheckpointError(f"{mismatch}: tensor {key!r} is {list(stored[key])} in the "
                                  f"checkpoint, {list(shape)} in the model (wrong --model?)")
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        return  # a pipeline stage holds part of the model: extra tensors belong to others
    extra = sorted(k for k in stored if k.startswith(MODEL_KEY_PREFIXES) and k not in wanted)
    if extra:
        raise CheckpointError(f"{mismatch}: the checkpoint has tensors the model lacks, e.g. "
                              f"{extra[:3]} (wrong --model, or a DynaMoE checkpoint?)")


def describe_load_failure(error: BaseException) -> str:
    """One line for a load failure; unwraps torch.distributed.checkpoint's per-rank errors
    (CheckpointException.failures maps rank -> (exception, traceback))."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {describe_load_failure(inner)}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}" + (f": {text[0][:300]}" if text else " (truncated file?)")
