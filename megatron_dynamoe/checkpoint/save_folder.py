"""The layout of a training `--save` folder, which the trainer writes and every tool reads:

    SAVE/iter_0000020/                        a complete checkpoint (renamed into place)
    SAVE/latest_checkpointed_iteration.txt    "20", replaced atomically after the folder

(Megatron-LM's names, so its tooling finds the latest iteration too.)
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

from megatron_dynamoe.checkpoint.torch_dist import CheckpointError, check_loadable
from megatron_dynamoe.utils.outputs import atomic_file

LATEST_FILE = "latest_checkpointed_iteration.txt"


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
