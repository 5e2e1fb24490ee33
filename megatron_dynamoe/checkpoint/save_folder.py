"""The layout of a training `--save` folder, which the trainer writes and every tool reads:

    SAVE/iter_0000020/                        a complete checkpoint (renamed into place)
    SAVE/latest_checkpointed_iteration.txt    "20", replaced atomically after the folder

(Megatron-LM's names, so its tooling finds the latest iteration too.)
"""

from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional, Tuple

from megatron_dynamoe.checkpoint.torch_dist import CheckpointError, check_loadable
from megatron_dynamoe.utils.outputs import atomic_file, temporary_sibling

LATEST_FILE = "latest_checkpointed_iteration.txt"
_ITER_NAME = re.compile(r"iter_(\d+)")


def iteration_folder(save_dir: str, iteration: int) -> str:
    """SAVE/iter_0000020 for iteration 20."""
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_checkpoint(save_dir: str) -> Optional[Tuple[int, str]]:
    """(iteration, folder) of the latest complete checkpoint in `save_dir`, or None."""
    pointer = os.path.join(save_dir, LATEST_FILE)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{pointer} is corrupt ({text!r}); it should hold an iteration "
                              f"number: fix or delete it")
    folder = iteration_folder(save_dir, int(text))
    check_loadable(folder)
    return int(text), folder


def write_latest_pointer(save_dir: str, iteration: int) -> None:
    """Point `save_dir`'s latest pointer at `iteration` (one rank calls, after the iteration's
    folder is complete): written to a temporary file and renamed, so a reader never sees a
    half-written number."""
    with atomic_file(os.path.join(save_dir, LATEST_FILE)) as tmp, open(tmp, "w") as f:
        f.write(f"{iteration}\n")


def iteration_folders(save_dir: str) -> List[Tuple[int, str]]:
    """(iteration, folder) of every `iter_N` folder in `save_dir`, by iteration."""
    found = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        match = _ITER_NAME.fullmatch(name)
        if match and os.path.isdir(os.path.join(save_dir, name)):
            found.append((int(match.group(1)), os.path.join(save_dir, name)))
    return sorted(found)


def prune_checkpoints(save_dir: str, keep: int) -> List[str]:
    """Delete all but the `keep` newest `iter_N` folders of `save_dir` (one rank calls, after
    the latest pointer names a complete folder); returns the folders deleted. The one the
    pointer names (what a resume needs) is never deleted, nor anything newer than it. Each
    folder is first renamed to a hidden temporary, so a deletion cut short leaves no
    half-deleted `iter_N` behind (the next save removes the temporary)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    latest = latest_checkpoint(save_dir)
    if latest is None:
        return []
    older = [(it, path) for it, path in iteration_folders(save_dir) if it < latest[0]]
    doomed = older[:max(0, len(older) - (keep - 1))]
    deleted = []
    for _, path in doomed:
        hidden = temporary_sibling(path)
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
        deleted.append(path)
    return deleted
