"""Training checkpoints at scale: `--keep-last-n` retention (a resume after pruning is
bit-identical) and Megatron's fully parallel save / load over the data-parallel ranks."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_dynamoe.checkpoint.save_folder import iteration_folders, prune_checkpoints
from tests.multiproc import run_processes
from tests.test_training import BASE, INFO, _run


def _iterations(folder) -> list:
    return [it for it, _ in iteration_folders(str(folder))]


@pytest.mark.usefixtures("single_rank")
def test_resume_after_pruning_is_bit_identical(tmp_path):
    full = _run(train_iters=12)
    save = str(tmp_path / "run")
    first = _run(train_iters=12, save=save, save_interval=2, keep_last_n=2, exit_after_iters=7)
    assert first.iteration == 7
    assert _iterations(save) == [6, 7]  # 2, 4 deleted; 7 saved by the early exit
    assert not [n for n in os.listdir(save) if n.startswith(".")]  # no temporaries left
    rest = _run(train_iters=12, model=None, load=save, save=save, save_interval=2,
                keep_last_n=2)
    assert {**first.losses, **rest.losses} == full.losses  # bit-identical on CPU
    assert _iterations(save) == [10, 12]


@pytest.mark.usefixtures("single_rank")
def test_async_save_resumes_bit_identically(tmp_path, monkeypatch):
    """--async-save: the background writes are finalized (model.json, checksums, rename,
    latest, pruning) after later iterations and at the end, and a resume from them equals
    the uninterrupted run bit for bit."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_dynamoe.checkpoint.torch_dist import verify_checkpoint_files
    from megatron_dynamoe.checkpoint.save_folder import latest_checkpoint

    scheduled = []
    original = AsyncCallsQueue.schedule_async_request
    monkeypatch.setattr(AsyncCallsQueue, "schedule_async_request",
                        lambda queue, request: scheduled.append(1) or original(queue, request))
    full = _run(train_iters=8)
    save = str(tmp_path / "run")
    first = _run(train_iters=8, save=save, save_interval=2, keep_last_n=2, async_save=True,
                 exit_after_iters=5)
    assert first.iteration == 5 and len(scheduled) == 3  # iterations 2, 4 and 5
    assert _iterations(save) == [4, 5]  # 2 pruned once 4 was finalized; 5 by the early exit
    assert latest_checkpoint(save) == (5, os.path.join(save, "iter_0000005"))
    assert not [n for n in os.listdir(save) if n.startswith(".")]  # every write finalized
    for it in (4, 5):
        verify_checkpoint_files(os.path.join(save, f"iter_{it:07d}"), verify_checksums=True)
    rest = _run(train_iters=8, model=None, load=save, save=save, save_interval=2,
                async_save=True)
    assert {**first.losses, **rest.losses} == full.losses
    assert _iterations(save)[-1] == 8


def test_pruning_keeps_the_latest_and_newer(tmp_path, monkeypatch):
    """Only folders older than the one the latest pointer names are deleted; keep counts it."""
    import megatron_dynamoe.checkpoint.save_folder as save_folder

    for it in (1, 2, 3, 5):
        (tmp_path / f"iter_{it:07d}").mkdir()
    (tmp_path / save_folder.LATEST_FILE).write_text("3\n")
    # check_loadable wants a real checkpoint; the pointer logic is what is under test.
    monkeypatch.setattr(save_folder, "check_loadable", lambda folder: None)
    assert prune_checkpoints(str(tmp_path), 2) == [str(tmp_path / "iter_0000001")]
    assert _iterations(tmp_path) == [2, 3, 5]
    assert prune_checkpoints(str(tmp_path), 1) == [str(tmp_path / "iter_0000002")]
    assert _iterations(tmp_path) == [3, 5]  # the latest (3) and the newer 5 stay
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(str(tmp_path), 0)


def test_keep_last_n_needs_save():
    from megatron_dynamoe.training.config import parse_train_args

    with pytest.raises(ValueError, match="--keep-last-n needs --save DIR"):
        parse_train_args(["--model", "tiny-llama", "--keep-last-n", "2"])
    with pytest.raises(ValueError, match="--keep-last-n"):
        parse_train_args(["--model", "tiny-llama", "--save", "x", "--keep-last-n", "0"])


def _parallel_worker(rank, world_size, save, parallel_save, parallel_load, out,
                     async_save=False):
    from megatron_dynamoe.runtime.parallel import initialize_parallel
    from megatron_dynamoe.training.config import TrainConfig
    from megatron_dynamoe.training.trainer import train
    from tests.builders import synthetic_source

    common = {**BASE, "train_iters": 4, "save": save, "ckpt_fully_parallel_save": parallel_save,
              "ckpt_fully_parallel_load": parallel_load, "async_save": async_save}
    cfg = TrainConfig(**{**common, "exit_after_iters": 2})
    initialize_parallel(cfg.layout, seed=cfg.seed)
    first = train(cfg, INFO, synthetic_source())
    rest = train(TrainConfig(**{**common, "model": None, "load": save}), INFO,
                 synthetic_source())
    torch.save({**first.losses, **rest.losses}, f"{out}.rank{rank}.pt")


@pytest.mark.multiproc
def test_fully_parallel_save_and_load_resume_exactly(tmp_path, single_rank):
    """2 data-parallel ranks: a run saved and resumed with Megatron's fully parallel
    strategies reproduces the plain save and load's losses bit for bit (that one equals the
    uninterrupted run, test_training), also when the saves are asynchronous (finalized by
    both ranks together); the second rank writes model shards too (the replicas split the
    work). The default (parallel save, plain load) is every other resume test."""
    runs = {}
    for name, save_flag, load_flag, async_save in (("plain", False, False, False),
                                                   ("parallel", True, True, False),
                                                   ("parallel-async", True, True, True)):
        save = str(tmp_path / name)
        run_processes(_parallel_worker, 2, save, save_flag, load_flag, save, async_save)
        runs[name] = [torch.load(f"{save}.rank{r}.pt") for r in range(2)]
        if name == "parallel":
            sizes = [os.path.getsize(os.path.join(save, "iter_0000004", f"__{r}_0.distcp"))
                     for r in range(2)]
            plain = [os.path.getsize(os.path.join(str(tmp_path / "plain"), "iter_0000004",
                                                  f"__{r}_0.distcp")) for r in range(2)]
            # The plain strategy has rank 0 write every replicated model shard.
            assert sizes[1] > plain[1] and sizes[0] < plain[0], (sizes, plain)
    reference = runs["plain"][0]
    assert sorted(reference) == [1, 2, 3, 4]
    for name, per_rank in runs.items():
        for losses in per_rank:
            assert losses == reference, name
