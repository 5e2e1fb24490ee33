"""The global sample order cut into micro-batches per data-parallel rank, and batch collation.

- **Position = consumed_samples.** A run's position in the data is one integer, the number of
  samples consumed by all data-parallel ranks together (iteration x global batch size). That is
  what checkpoints store; `micro_batches(..., consumed_samples=k)` resumes exactly at global
  sample k, whatever the DP size of the resumed run.
- **DP rank.** `dp_rank` / `dp_size` are the data-parallel rank and size
  (`parallel_state.get_data_parallel_rank()` / `..._world_size()`), not the global rank: every
  TP / PP / EP rank of one model replica must read the same micro-batches.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import torch

from megatron_dynamoe.data.errors import DataError

__all__ = ["MicroBatchSampler", "micro_batch_starts", "collate_samples", "micro_batches"]


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
