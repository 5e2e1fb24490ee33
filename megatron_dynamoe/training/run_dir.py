"""One run per `--save` folder.

A second run pointed at a folder that holds another run's checkpoints would overwrite them
and move `latest` backwards; two runs writing to one folder at once interleave their
checkpoints. Both used to exit 0. `claim_save_dir` (rank 0, before any work) takes an
exclusive lock on `SAVE/.dynamoe-run.lock` for the life of the process (released by the
kernel however the process ends, so a killed job never leaves a stale lock) and refuses a
folder with checkpoints unless this run resumes it (`--load` is the same folder) or
`--overwrite` asks to start over there.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import socket
from typing import IO, Optional, Tuple

from megatron_dynamoe.checkpoint.save_folder import LATEST_FILE, latest_checkpoint

LOCK_FILE = ".dynamoe-run.lock"


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return f"host {socket.gethostname()}, pid {os.getpid()}" + (f", job {job}" if job else "")


def claim_save_dir(save: str, load: Optional[str], overwrite: bool
                   ) -> Tuple[Optional[IO], Optional[str]]:
    """(open lock file to keep, None) when this run may write to `save`, or (None or the lock,
    a one-line reason) when it may not. With `overwrite`, another run's checkpoints in `save`
    are deleted first."""
    from megatron_dynamoe.utils.outputs import describe_os_error

    if os.path.exists(save) and not os.path.isdir(save):
        return None, f"--save {save} is a file, not a folder: choose a folder for checkpoints"
    try:
        # Creating the folder and its lock file also proves --save is writable, before any
        # work (a read-only or full file system would otherwise fail at the first save).
        os.makedirs(save, exist_ok=True)
        lock = open(os.path.join(save, LOCK_FILE), "a+")
    except OSError as e:
        return None, f"--save: {describe_os_error(e)}"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        return None, (f"--save {save} is in use by another run ({holder}): give each run its "
                      f"own --save folder")
    lock.seek(0)
    lock.truncate()
    lock.write(_holder() + "\n")
    lock.flush()
    latest = latest_checkpoint(save)
    resumes = load is not None and os.path.realpath(load) == os.path.realpath(save)
    if latest is not None and not resumes:
        if not overwrite:
            return lock, (f"--save {save} holds another run's checkpoints (latest iteration "
                          f"{latest[0]}): resume it with --load {save}, or pass --overwrite to "
                          f"start a new run there (its checkpoints are deleted)")
        for folder in glob.glob(os.path.join(save, "iter_*")):
            shutil.rmtree(folder)
        os.remove(os.path.join(save, LATEST_FILE))
    return lock, None
