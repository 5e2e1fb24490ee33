"""Output paths of the tools: never over an input, never half-written (a temporary sibling
renamed into place), checked for a writable file system with room before the work starts."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
from typing import Iterable, Optional

from megatron_dynamoe.utils.errors import ToolError


def describe_os_error(error: OSError) -> str:
    """One line for a failed file operation: what failed, on which path, and what to do."""
    import errno

    where = f"{error.filename}: " if error.filename else ""
    reason = error.strerror or str(error) or type(error).__name__
    hint = {errno.ENOSPC: "free space there or write elsewhere",
            errno.EDQUOT: "free space in your quota or write elsewhere",
            errno.EROFS: "the file system is read-only: write elsewhere",
            errno.EACCES: "check the permissions or write elsewhere",
            errno.EPERM: "check the permissions or write elsewhere"}.get(
        error.errno, "check the path")
    return f"{where}{reason}; {hint}"


def check_output_path(path: str, overwrite: bool, inputs: Iterable[Optional[str]] = (),
                      needed_bytes: int = 0) -> None:
    """Refuse to clobber an existing output unless --overwrite, and always refuse an output
    that is, contains or lies inside one of `inputs` (the paths the tool reads; names that
    are not paths, such as 'smollm2', are ignored): replacing it would destroy the input,
    with --overwrite or without. Before any work, the output's file system must also accept
    a file (not read-only, a folder where one is needed) and have `needed_bytes` free (the
    tool's estimate of what it writes; 0: not checked)."""
    out = os.path.realpath(path)
    for source in inputs:
        if not source or not os.path.exists(source):
            continue
        src = os.path.realpath(source)
        relation = ("is" if out == src else
                    "contains" if src.startswith(out.rstrip(os.sep) + os.sep) else
                    "lies inside" if out.startswith(src.rstrip(os.sep) + os.sep) else None)
        if relation:
            raise ToolError(f"output {path} {relation} the input {source}: writing it would "
                            f"destroy the input; choose an output outside it")
    if os.path.exists(path) and not overwrite:
        raise ToolError(f"output {path} exists; pass --overwrite to replace it")
    check_writable(path, needed_bytes)


def check_writable(path: str, needed_bytes: int = 0) -> None:
    """Raise ToolError unless a file or folder can be created at `path`: its nearest existing
    ancestor must be a folder on a writable file system (proved by creating and removing a
    temporary file there) with at least `needed_bytes` free."""
    import tempfile

    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ToolError(f"output {path}: {ancestor} is a file, not a folder; choose another "
                        f"output path")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ToolError(f"output {path} cannot be written: {describe_os_error(e)}") from None
    free = shutil.disk_usage(ancestor).free
    if needed_bytes and free < needed_bytes:
        raise ToolError(f"output {path} needs about {needed_bytes / 2**30:.2f} GiB, but its file "
                        f"system has {free / 2**30:.2f} GiB free: free space there or write "
                        f"elsewhere")


def tree_size(path: Optional[str]) -> int:
    """Bytes in the files under `path` (a file's own size; 0 for None or a missing path):
    the estimate of an output made from this input (a converted or rewritten checkpoint)."""
    if not path or not os.path.exists(path):
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, files in os.walk(path) for name in files)


# ---------------------------------------------------------------------------------------------
# Atomic writes: the one way this package writes an output (a file, a folder, a checkpoint)
# ---------------------------------------------------------------------------------------------
def temporary_sibling(path: str) -> str:
    """The hidden temporary name `path` is written under before it is renamed into place:
    `.NAME.tmp-PID-TIME` in the same folder (the same file system, so the rename is atomic;
    `stale_temporaries` finds the ones a killed writer left)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path),
                        f".{os.path.basename(path)}.tmp-{os.getpid()}-{time.time_ns()}")


def stale_temporaries(parent: str, name_pattern: str) -> list:
    """Paths of the temporaries (`temporary_sibling`) of outputs named like the glob
    `name_pattern` in `parent`."""
    return sorted(glob.glob(os.path.join(parent, f".{name_pattern}.tmp-*")))


def replace_with(tmp: str, path: str) -> None:
    """Move the finished temporary `tmp` to `path`, replacing what is there (a folder is
    removed first: a rename cannot replace a non-empty folder)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path to write the file `path` under; when the block ends normally
    the file is flushed to disk and renamed into place, otherwise removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        replace_with(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool, inputs: Iterable[Optional[str]] = ()):
    """Yield a temporary sibling folder; on success it replaces `path`, on error it is removed.
    `inputs` as for `check_output_path`."""
    check_output_path(path, overwrite, inputs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_sibling(path)
    os.makedirs(tmp)
    try:
        yield tmp
        replace_with(tmp, path)
    finally:
        _remove(tmp)
