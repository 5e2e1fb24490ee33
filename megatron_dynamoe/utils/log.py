"""Progress output of long work: timestamped lines and progress bars on stderr, from rank 0 only
(the rank of torch.distributed when it runs, else $RANK)."""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, Optional


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def log(message: str) -> None:
    """A timestamped progress line on stderr (rank 0 only)."""
    if _rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def progress(iterable: Iterable, desc: str, total: Optional[int] = None) -> Iterator:
    """tqdm progress bar on stderr (rank 0 only; plain iteration elsewhere)."""
    if _rank() != 0:
        return iter(iterable)
    from tqdm import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False,
                     dynamic_ncols=True))


def progress_counter(total: int, desc: str):
    """A tqdm bar on stderr that the caller advances with `.update(n)` and `.close()`s (rank 0
    only; a silent stand-in elsewhere)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=_rank() != 0)
