"""Resumable training checkpoints: model, optimizer, LR schedule, RNG and data position.

Layout of a `--save` folder:

    SAVE/iter_0000020/            torch_dist (model + optimizer shards, common state) + dynamoe.json
    SAVE/latest_checkpointed_iteration.txt    "20", rewritten atomically after the folder

Each iteration folder is written through `checkpointing.save_checkpoint` (temporary sibling,
renamed when every rank finished) and the pointer file is replaced only afterwards, so a job
killed mid-save leaves the previous checkpoint as the latest and `--load` never picks an
incomplete one. The model part is an ordinary model checkpoint: tools and `--load` of other
layouts read it.
"""

from __future__ import annotations

import os
import random
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_dynamoe.checkpointing import (
    CheckpointError,
    CheckpointInfo,
    check_loadable,
    remove_stale_temporaries,
    save_checkpoint,
)

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


def _rng_state() -> dict:
    """Every generator a resumed run must continue: Python, NumPy, torch's CPU generator,
    this rank's GPU generator when it runs on one (as Megatron-LM's `cuda_rng_state`), and
    Megatron's model-parallel tracker. States are host tensors (checkpoint common state)."""
    from megatron.core import tensor_parallel

    from megatron_dynamoe.runtime import device as runtime_device

    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state(),
                 tracker=tensor_parallel.get_cuda_rng_tracker().get_states())
    if runtime_device.current().is_cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    from megatron_dynamoe.runtime import device as runtime_device

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    # A checkpoint written on the CPU resumes on a GPU (and back): a generator the
    # checkpoint does not hold keeps its seeded state.
    if "cuda" in state and runtime_device.current().is_cuda:
        torch.cuda.set_rng_state(state["cuda"].cpu())
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class _TrainingState(torch.nn.Module):
    """Adapter so that save_checkpoint / dist_checkpointing see one sharded state dict
    holding the model, the optimizer and the rest of the training state."""

    def __init__(self, model, optimizer, scheduler, extra: dict, is_loading: bool):
        super().__init__()
        self._model, self._optimizer = model, optimizer
        self._scheduler, self._extra, self._is_loading = scheduler, extra, is_loading

    def sharded_state_dict(self):
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        model_sd = self._model.sharded_state_dict()
        rank, world = dist.get_rank(), dist.get_world_size()
        return {
            "model": model_sd,
            # 'dp_reshardable': resumes at another DP size (TP / PP changes reload the
            # weights, not the optimizer state). In megatron-core 0.16.1 without Apex / TE,
            # the default ('fully_sharded_model_space') builds flattened ShardedTensors that
            # its own dist_checkpointing rejects, and 'fully_reshardable' fails to load the
            # torch Adam 'step'.
            "optimizer": self._optimizer.sharded_state_dict(
                model_sd, is_loading=self._is_loading,
                metadata={"distrib_optim_sharding_type": "dp_reshardable"}),
            "scheduler": self._scheduler.state_dict(),
            "training": dict(self._extra),
            # One RNG state per rank (each rank's generators differ).
            "rng_state": ShardedObject("rng_state", _rng_state(), (world,), (rank,),
                                       replica_id=0),
        }


def save_training_state(save_dir: str, iteration: int, model, optimizer, scheduler,
                        consumed_samples: int, info: CheckpointInfo) -> str:
    """Write SAVE/iter_N (all ranks call) and then point `latest` at it; returns the folder."""
    extra = dict(iteration=iteration, consumed_samples=consumed_samples)
    folder = iteration_folder(save_dir, iteration)
    if dist.get_rank() == 0:
        # A save killed mid-write (preemption past the grace period, a node failure) leaves
        # its hidden temporary folder; only this run writes to --save, so it is stale.
        for path in remove_stale_temporaries(save_dir, "iter_*"):
            print(f"removed the incomplete checkpoint {path} of an interrupted save",
                  flush=True)
    state = _TrainingState(model, optimizer, scheduler, extra, is_loading=False)
    save_checkpoint(state, folder, CheckpointInfo(info.architecture, info.dynamoe,
                                                  {**info.extra, **extra}), overwrite=True)
    if dist.get_rank() == 0:
        tmp = os.path.join(save_dir, f".{LATEST_FILE}.tmp")
        with open(tmp, "w") as f:
            f.write(f"{iteration}\n")
        os.replace(tmp, os.path.join(save_dir, LATEST_FILE))
    dist.barrier()
    return folder


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state entries a loaded one will have.

    Megatron's DistributedOptimizer builds its loading template from `state_dict()`, which
    without Apex / Transformer Engine reads each torch Adam state's 'step' and so fails
    before the first step. These zero-filled entries (Megatron's own `init_state_fn` plus a
    step) serve the template only: they are cleared again before `load_state_dict`, which
    allocates and fills the real state (`_clear_optimizer_state`).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if opt.init_state_fn is not None:
            opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.tensor(0.0))


def _clear_optimizer_state(optimizer) -> None:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.optimizer.state.clear()


def _restore_adam_steps(optimizer) -> None:
    """Set each torch Adam parameter state's 'step' from its param group.

    megatron-core 0.16.1 without Apex / TE restores 'step' wrongly: its dp_reshardable
    parameter-state loader overwrites it (0 here), and its non-Apex path shares ONE tensor
    between all parameters, which torch then increments once per parameter. The param
    groups keep the right count (Megatron saves it there), so give every parameter its own
    tensor with that value; Adam's bias correction then continues exactly.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if param in inner.state:
                    inner.state[param]["step"] = torch.tensor(float(group["step"]))


def load_training_state(folder: str, model, optimizer, scheduler) -> Tuple[int, int]:
    """Restore everything from `folder`; returns (iteration, consumed_samples)."""
    from megatron.core import dist_checkpointing

    from megatron_dynamoe.checkpointing import describe_load_failure

    check_loadable(folder)
    _materialise_optimizer_state(optimizer)
    state = _TrainingState(model, optimizer, scheduler, {}, is_loading=True)
    try:
        template = state.sharded_state_dict()
        _clear_optimizer_state(optimizer)  # load_state_dict allocates its own
        loaded = dist_checkpointing.load(template, folder)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise CheckpointError(f"cannot resume from {folder!r}: {describe_load_failure(e)} (was it written "
                              f"by this trainer, for this model and layout family?)") from e
    model.load_state_dict(loaded["model"])
    with torch.no_grad():  # Megatron's dp_reshardable loader copies into parameters
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    _set_rng_state(loaded["rng_state"])
    return int(loaded["training"]["iteration"]), int(loaded["training"]["consumed_samples"])
