"""A training run's micro-batches read ahead by DataLoader worker processes.

The trainer reads data through a `BatchSource`, `source(position, micro_batch_size)`, a pure
function of the global sample position. Every position this rank will read is therefore
known when the run starts (iteration k of a run resumed at `consumed_samples` c reads
`micro_batch_starts(c + k x global_batch_size, ...)`), so worker processes can read them
ahead of the step that uses them, in that order, as Megatron-LM's `--num-workers` data
loader does. The batches reach the model through pinned memory on a GPU (the DataLoader's
pin-memory thread), and the same batch serves both the distillation teacher's and the
student's pass of one iteration (one read per micro-batch, not two).

`BatchLoader` is itself a `BatchSource`: the trainer swaps it in for the source and nothing
else changes; the batches are the source's, bit for bit, so a run with workers trains
exactly as one without (`tests/test_training.py::test_data_loader_workers_equal_direct_reads`).
"""

from __future__ import annotations

import multiprocessing
from typing import Callable, Dict, Iterator, List, Optional

import torch

from megatron_dynamoe.data.errors import DataError
from megatron_dynamoe.data.sampling import micro_batch_starts

__all__ = ["BatchLoader", "run_positions"]


def run_positions(consumed_samples: int, global_batch_size: int, iterations: int,
                  micro_batch_size: int, micro_batches: int, dp_rank: int,
                  dp_size: int) -> Iterator[int]:
    """The micro-batch start positions DP rank `dp_rank` reads in the run's next `iterations`
    iterations from `consumed_samples` on, in the order the trainer reads them (iteration by
    iteration, `micro_batch_starts` within one)."""
    for k in range(iterations):
        yield from micro_batch_starts(consumed_samples + k * global_batch_size,
                                      micro_batch_size, micro_batches, dp_rank, dp_size)


class _Positions(torch.utils.data.Sampler):
    """Sampler over a run's positions (a generator, not a list: a long run has millions)."""

    def __init__(self, make: Callable[[], Iterator[int]], length: int):
        self._make, self._length = make, length

    def __iter__(self) -> Iterator[int]:
        return self._make()

    def __len__(self) -> int:
        return self._length


class _PositionReads(torch.utils.data.Dataset):
    """Map-style dataset: item `position` is (position, the source's micro-batch there)."""

    def __init__(self, source: Callable[[int, int], Dict], micro_batch_size: int):
        self._source, self._mbs = source, micro_batch_size

    def __getitem__(self, position: int):
        return position, self._source(position, self._mbs)


def _shielded_worker(worker_id: int) -> None:
    """DataLoader worker start-up: a job's preemption signal (SLURM and torchrun signal the
    whole process group) must not kill the workers while their rank finishes the step and
    saves; they die with the rank instead (runtime.helper_processes)."""
    from megatron_dynamoe.runtime.helper_processes import shield_helper_process

    shield_helper_process()


class BatchLoader:
    """A `BatchSource` whose micro-batches `num_workers` worker processes read ahead.

    `positions` (`run_positions`) are the positions the trainer will ask for, in order;
    `loader(position, micro_batch_size)` returns the source's batch there. Batches read but
    not yet asked for wait in memory (at most `prefetch_factor` per worker ahead, plus the
    current iteration's until `release_before` drops them, so a second reader of the same
    iteration, the distillation teacher, gets them again without a read). A position that
    is not the next one planned (and not held) is an error: the run and its plan disagree.
    `pin_memory` (set for GPU runs) pins the batches in the DataLoader's pin-memory thread.

    Workers are forked (a BatchSource is a closure over memory-mapped datasets; forking
    shares them instead of pickling them), so worker processes need Linux's fork start
    method; they read only host memory and never touch the GPU. They ignore the job's
    preemption signals (the rank reads on while it finishes the step and saves) and die
    with their rank.
    """

    def __init__(self, source: Callable[[int, int], Dict], micro_batch_size: int,
                 positions: Callable[[], Iterator[int]], num_positions: int, num_workers: int,
                 pin_memory: bool = False, prefetch_factor: int = 2):
        if num_workers < 1:
            raise DataError(f"a BatchLoader needs at least one worker, got {num_workers}: "
                            f"read the source directly for --num-workers 0")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise DataError("--num-workers > 0 needs the 'fork' start method (Linux): use "
                            "--num-workers 0 on this platform")
        self._mbs = micro_batch_size
        self._held: Dict[int, Dict] = {}
        self._loader = torch.utils.data.DataLoader(
            _PositionReads(source, micro_batch_size), batch_size=None,
            sampler=_Positions(positions, num_positions), num_workers=num_workers,
            pin_memory=pin_memory, prefetch_factor=prefetch_factor,
            worker_init_fn=_shielded_worker,
            multiprocessing_context=multiprocessing.get_context("fork"))
        self._iterator: Optional[Iterator] = None

    def __call__(self, position: int, micro_batch_size: int) -> Dict:
        if micro_batch_size != self._mbs:
            raise DataError(f"the data loader reads micro-batches of {self._mbs} samples, "
                            f"not {micro_batch_size}")
        if position in self._held:
            return self._held[position]
        self.start()
        for read, batch in self._iterator:
            self._held[read] = batch
            if read == position:
                return batch
            if read > position:
                break
        raise DataError(f"the data loader was asked for sample position {position}, which "
                        f"is not the next one it planned to read (it holds "
                        f"{sorted(self._held)}): the run read out of its planned order")

    def start(self) -> None:
        """Start the worker processes (they read ahead from the first planned position);
        the first read does it when nobody did."""
        if self._iterator is None:
            self._iterator = iter(self._loader)

    def release_before(self, position: int) -> None:
        """Drop the held batches of positions below `position` (the iteration that starts
        there no longer needs them)."""
        for read in [p for p in self._held if p < position]:
            del self._held[read]

    def held_positions(self) -> List[int]:
        """Positions read and held now (for tests and debugging)."""
        return sorted(self._held)

    def close(self) -> None:
        """Stop the worker processes and drop what they read ahead."""
        # Dropping the (non-persistent) iterator shuts its workers down.
        self._iterator = None
        self._held.clear()
