"""Model checkpoints in Megatron-Core's `torch_dist` format, written atomically.

A checkpoint is a folder written by `megatron.core.dist_checkpointing.save` from the model's
`sharded_state_dict()` (so it loads at any TP / PP / EP layout), plus `dynamoe.json`: the
architecture, the DynaMoE config (null for a dense model) and provenance. Folders written by
plain Megatron-Core (no `dynamoe.json`) load too; the caller then supplies the architecture.

Writes go to a hidden temporary sibling folder that is renamed into place only after every
rank finished, so an interrupted or failed save never leaves a folder that looks complete;
an existing folder is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_dynamoe.architectures import ModelArchitecture
from megatron_dynamoe.dynamoe.config import DynaMoEConfig

METADATA_FILE = "dynamoe.json"
FORMAT_VERSION = 1
_MEGATRON_METADATA = "metadata.json"  # written by dist_checkpointing


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


@dataclass
class CheckpointInfo:
    """What `dynamoe.json` records about a checkpoint."""

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


def read_info(directory: str) -> Optional[CheckpointInfo]:
    """The checkpoint's `dynamoe.json`, or None for a plain Megatron-Core checkpoint."""
    check_loadable(directory)
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        arch = ModelArchitecture(**raw["architecture"])
        dyn = DynaMoEConfig.from_dict(raw["dynamoe"]) if raw.get("dynamoe") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt: {e}") from e
    return CheckpointInfo(arch, dyn, raw.get("extra", {}))


def resolve_architecture(directory: str, preset: Optional[str]) -> tuple:
    """(ModelArchitecture, CheckpointInfo or None) of a checkpoint: from its dynamoe.json,
    or from `--model PRESET` for a plain Megatron-Core checkpoint. Raises CheckpointError
    when neither is available or when they disagree."""
    from megatron_dynamoe.architectures import get_architecture

    info = read_info(directory)
    if info is None:
        if preset is None:
            raise CheckpointError(f"{directory!r} has no {METADATA_FILE} (a plain Megatron-Core "
                                  f"checkpoint): pass --model PRESET to name its architecture")
        return get_architecture(preset), None
    if preset is not None and get_architecture(preset) != info.architecture:
        raise CheckpointError(f"--model {preset} does not match the architecture recorded in "
                              f"{directory!r}; drop --model")
    return info.architecture, info


def save_checkpoint(model: torch.nn.Module, directory: str, info: CheckpointInfo,
                    overwrite: bool = False) -> None:
    """Save `model` (this rank's part; every rank calls) to `directory` atomically."""
    from megatron.core import dist_checkpointing

    directory = os.path.abspath(directory)
    tmp = None
    if _rank() == 0:
        if os.path.exists(directory) and not overwrite:
            tmp = f"error: {directory} exists; pass --overwrite to replace it"
        else:
            parent = os.path.dirname(directory)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{os.getpid()}-"
                                       f"{int(time.time())}")
            os.makedirs(tmp)
    tmp = _broadcast_path(tmp)
    if tmp.startswith("error: "):
        raise CheckpointError(tmp[len("error: "):])
    try:
        dist_checkpointing.save(model.sharded_state_dict(), tmp)
        _barrier()
        if _rank() == 0:
            with open(os.path.join(tmp, METADATA_FILE), "w") as f:
                json.dump(info.to_json(), f, indent=2)
            if os.path.exists(directory):
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        _barrier()
    except BaseException:
        if _rank() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(model: torch.nn.Module, directory: str) -> None:
    """Load `directory` into `model` at the model's own layout (every rank calls).

    Raises CheckpointError naming the problem when the folder is incomplete or corrupt, or
    when its tensors do not fit the model (architecture mismatch).
    """
    from megatron.core import dist_checkpointing

    check_loadable(directory)
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), directory)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        raise CheckpointError(f"cannot load {directory!r} into this model: {_describe(e)} (is "
                              f"the checkpoint complete, and does --model / the architecture "
                              f"match it?)") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{directory!r} does not match the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")


def _describe(error: BaseException) -> str:
    """One line for a load failure; unwraps torch.distributed.checkpoint's per-rank errors
    (CheckpointException.failures maps rank -> (exception, traceback))."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {_describe(inner)}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}" + (f": {text[0][:300]}" if text else " (truncated file?)")
