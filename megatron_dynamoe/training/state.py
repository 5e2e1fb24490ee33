"""Resumable training checkpoints: model, optimizer, LR schedule, RNG and data position.

Layout of a `--save` folder:

    SAVE/iter_0000020/            torch_dist (model + optimizer shards, common state) + model.json
    SAVE/latest_checkpointed_iteration.txt    "20", rewritten atomically after the folder

Each iteration folder is written through `checkpointing.save_checkpoint` (temporary sibling,
renamed when every rank finished) and the pointer file is replaced only afterwards, so a job
killed mid-save leaves the previous checkpoint as the latest and `--load` never picks an
incomplete one. The model part is an ordinary model checkpoint: tools and `--load` of other
layouts read it.

A training checkpoint resumes at another data-parallel size (as Megatron-LM's): the RNG state
is stored once per model-parallel position, with the data-parallel ranks as replicas, and the
distributed optimizer's state 'dp_reshardable'. That optimizer format is tied to the TP / PP /
EP / expert-TP / VPP sizes it was written at (recorded in the checkpoint's `training` state and
model.json): at other sizes the trainer refuses it with one line (`--pretrained-checkpoint`
starts from its weights). A checkpoint whose optimizer state is in model space (saved
'fully_reshardable', or by the non-distributed optimizer) also resumes at other TP / PP / VPP
sizes (not EP); at other model-parallel sizes its RNG state is dropped for the seeded one, as
in Megatron-LM.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_dynamoe.checkpoint.save_folder import (
    iteration_folder,
    prune_checkpoints,
    write_latest_pointer,
)
from megatron_dynamoe.checkpoint.torch_dist import (
    CheckpointError,
    CheckpointInfo,
    read_info,
    remove_stale_temporaries,
    save_checkpoint,
    verify_checkpoint_files,
)

RNG_KEY = "rng_state"
# How the distributed optimizer's state is saved (Megatron's `distrib_optim_sharding_type`).
# 'dp_reshardable' (Megatron-LM's default) writes each rank's buffer shards in parallel and
# resumes at another DP size; its keys and buckets follow the model-parallel layout.
# 'fully_reshardable' (Megatron-LM's --dist-ckpt-optim-fully-reshardable) also resumes at
# other TP / PP / VPP sizes, but gathers each model-parallel shard's whole optimizer state
# (12 bytes per parameter) onto every data-parallel rank at each save, and loads it whole on
# each rank: too much memory at scale for the default.
# megatron-core 0.16.1's own default ('fully_sharded_model_space') builds, without Apex / TE,
# flattened ShardedTensors that its dist_checkpointing rejects.
OPTIMIZER_SHARDING = "dp_reshardable"
# The model-parallel sizes of a run (short names for messages); DP may change on resumption.
_TP, _PP, _EP, _ETP, _VPP = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "virtual_pipeline_model_parallel_size")
FIXED_SIZES = ((_TP, "TP"), (_PP, "PP"), (_EP, "EP"), (_ETP, "ETP"), (_VPP, "VPP"))


def current_layout() -> dict:
    """This run's parallel sizes (Megatron's groups must exist), as a checkpoint records them
    in its `training` state: the FIXED_SIZES (VPP 1 without virtual pipelining) plus the
    data-parallel and world sizes."""
    from megatron.core import parallel_state as ps

    return dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        virtual_pipeline_model_parallel_size=(
            ps.get_virtual_pipeline_model_parallel_world_size() or 1),
        data_parallel_size=ps.get_data_parallel_world_size(),
        world_size=dist.get_world_size())


def python_rng_to_plain(state: tuple) -> dict:
    """`random.getstate()` (version, 625 ints, gauss or None) as a dict of an int, an int64
    tensor and a float / None: loadable with `torch.load(weights_only=True)`."""
    version, internal, gauss = state
    return dict(version=int(version), gauss=None if gauss is None else float(gauss),
                state=torch.tensor(internal, dtype=torch.int64, device="cpu"))


def python_rng_from_plain(plain: dict) -> tuple:
    """Inverse of `python_rng_to_plain`: a state for `random.setstate`."""
    return plain["version"], tuple(plain["state"].tolist()), plain["gauss"]


def numpy_rng_to_plain(state: tuple) -> dict:
    """`np.random.get_state()` (name, uint32 keys, pos, has_gauss, cached_gaussian) as a dict
    of a string, an int64 tensor, ints and a float (no NumPy array: weights_only loads it)."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return dict(name=str(name), keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                pos=int(pos), has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian))


def numpy_rng_from_plain(plain: dict) -> tuple:
    """Inverse of `numpy_rng_to_plain`: a state for `np.random.set_state`."""
    return (plain["name"], plain["keys"].numpy().astype(np.uint32), plain["pos"],
            plain["has_gauss"], plain["cached_gaussian"])


def _rng_state() -> dict:
    """Every generator a resumed run must continue: Python, NumPy, torch's CPU generator,
    this rank's GPU generator when it runs on one (as Megatron-LM's `cuda_rng_state`), and
    Megatron's model-parallel tracker. Only tensors, strings and numbers, so that the
    checkpoint loads with `torch.load(weights_only=True)`."""
    from megatron.core import tensor_parallel

    from megatron_dynamoe.runtime import device as runtime_device

    state = dict(python=python_rng_to_plain(random.getstate()),
                 numpy=numpy_rng_to_plain(np.random.get_state()),
                 torch=torch.get_rng_state(),
                 tracker=dict(tensor_parallel.get_cuda_rng_tracker().get_states()))
    if runtime_device.current().is_cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    from megatron_dynamoe.runtime import device as runtime_device

    # Checkpoints of older versions hold the raw tuples (a NumPy array among them).
    python, numpy = state["python"], state["numpy"]
    random.setstate(python_rng_from_plain(python) if isinstance(python, dict) else python)
    np.random.set_state(numpy_rng_from_plain(numpy) if isinstance(numpy, dict) else numpy)
    torch.set_rng_state(state["torch"])
    # A checkpoint written on the CPU resumes on a GPU (and back): a generator the
    # checkpoint does not hold keeps its seeded state.
    if "cuda" in state and runtime_device.current().is_cuda:
        torch.cuda.set_rng_state(state["cuda"].cpu())
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _gather_positions() -> list:
    """Every rank's (pipeline, tensor, expert, expert-tensor) parallel ranks, by global rank
    (a collective: every rank calls). Megatron seeds the tracker from the TP, EP and expert-TP
    ranks (`model_parallel_cuda_manual_seed`), the trainer torch's generators from --seed
    alone, so the ranks of one position hold the same torch states: the data-parallel rank
    plays no part. (Python's and NumPy's generators are left unseeded, so they differ between
    ranks; nothing in training draws from them, and a resumed rank gets its position's.)"""
    from megatron.core import parallel_state as ps

    from megatron_dynamoe.runtime.device import comm_device

    mine = torch.tensor([ps.get_pipeline_model_parallel_rank(),
                         ps.get_tensor_model_parallel_rank(),
                         ps.get_expert_model_parallel_rank(),
                         ps.get_expert_tensor_parallel_rank()],
                        dtype=torch.int64, device=comm_device())
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [tuple(t.tolist()) for t in everyone]


def _rng_shard() -> Tuple[tuple, tuple, int]:
    """(offset, global shape, replica id) of this rank's RNG entry (a collective).

    The entry's offset is (pipeline stage, index of this rank's (TP, EP, expert-TP) ranks
    among those of its stage): TP and expert TP need not vary independently, so a grid over
    all four would have holes, which dist_checkpointing rejects. Without expert parallelism
    the index is the TP rank (Megatron-LM's (PP, TP) entries) and the replica id the
    data-parallel rank; in general it counts the lower ranks at the same position (0 writes).
    """
    from megatron.core import parallel_state as ps

    everyone = _gather_positions()
    mine = everyone[dist.get_rank()]
    stage = sorted({p[1:] for p in everyone if p[0] == mine[0]})
    replica = sum(p == mine for p in everyone[:dist.get_rank()])
    return ((mine[0], stage.index(mine[1:])),
            (ps.get_pipeline_model_parallel_world_size(), len(stage)), replica)


def _rng_entry(kind: str):
    """The RNG ShardedObject: per model-parallel position ('positions'), or per world rank
    ('world', the key of checkpoints written before elastic resumption)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if kind == "world":
        return ShardedObject(RNG_KEY, _rng_state(), (dist.get_world_size(),),
                             (dist.get_rank(),), replica_id=0)
    offset, shape, replica = _rng_shard()
    return ShardedObject(RNG_KEY, _rng_state(), shape, offset, replica_id=replica)


class _TrainingState(torch.nn.Module):
    """Adapter so that save_checkpoint / dist_checkpointing see one sharded state dict
    holding the model, the optimizer and the rest of the training state. `rng` is the RNG
    entry's kind (`_rng_entry`), or None to leave the RNG state out (a load that keeps the
    seeded generators); `sharding` the distributed optimizer's format."""

    def __init__(self, model, optimizer, scheduler, extra: dict, is_loading: bool,
                 sharding: str, rng: Optional[str] = "positions"):
        super().__init__()
        self._model, self._optimizer = model, optimizer
        self._scheduler, self._extra, self._is_loading = scheduler, extra, is_loading
        self._sharding, self._rng = sharding, rng

    def sharded_state_dict(self):
        model_sd = self._model.sharded_state_dict()
        state = {
            "model": model_sd,
            # No 'chained_N.' key prefix in the fully_reshardable format (a ChainedOptimizer
            # of dense and expert parameters): the keys then hold at another EP size too.
            "optimizer": self._optimizer.sharded_state_dict(
                model_sd, is_loading=self._is_loading,
                metadata={"distrib_optim_sharding_type": self._sharding,
                          "chained_optim_avoid_prefix": True}),
            "scheduler": self._scheduler.state_dict(),
            "training": dict(self._extra),
        }
        if self._rng is not None:
            state["rng_state"] = _rng_entry(self._rng)
        return state


def save_training_state(save_dir: str, iteration: int, model, optimizer, scheduler,
                        consumed_samples: int, info: CheckpointInfo,
                        optimizer_sharding: Optional[str] = None,
                        keep_last_n: Optional[int] = None,
                        parallel_group=None, async_queue=None) -> str:
    """Write SAVE/iter_N (all ranks call) and then point `latest` at it; returns the folder.
    `optimizer_sharding` is the distributed optimizer's format (default OPTIMIZER_SHARDING;
    'fully_reshardable' lets the checkpoint resume at other TP / PP / VPP sizes too).
    `keep_last_n`: then delete all but the newest N iter_N folders (`prune_checkpoints`).
    `parallel_group`: the ranks holding replicas (data parallel), which split the writing
    (`save_checkpoint`). `async_queue`: write in the background (`save_checkpoint`); the
    pointer moves and old folders are pruned only when the queue finalizes the save, so
    `latest` never names an unfinished checkpoint and pruning never deletes the one a
    resume needs."""
    # The layout goes into the common `training` state and model.json (readable without
    # unpickling anything), so that a resume at another layout is refused up front.
    extra = dict(iteration=iteration, consumed_samples=consumed_samples,
                 layout=current_layout())
    folder = iteration_folder(save_dir, iteration)
    if dist.get_rank() == 0:
        # A save killed mid-write (preemption past the grace period, a node failure) leaves
        # its hidden temporary folder; only this run writes to --save, so it is stale.
        for path in remove_stale_temporaries(save_dir, "iter_*"):
            print(f"removed the incomplete checkpoint {path} of an interrupted save",
                  flush=True)
    state = _TrainingState(model, optimizer, scheduler, extra, is_loading=False,
                           sharding=optimizer_sharding or OPTIMIZER_SHARDING)

    def point_and_prune() -> None:
        if dist.get_rank() == 0:
            write_latest_pointer(save_dir, iteration)
            if keep_last_n is not None:
                for path in prune_checkpoints(save_dir, keep_last_n):
                    print(f"deleted {path} (--keep-last-n {keep_last_n})", flush=True)
        dist.barrier()

    save_checkpoint(state, folder, CheckpointInfo(info.architecture, info.dynamoe,
                                                  {**info.extra, **extra}), overwrite=True,
                    parallel_group=parallel_group, async_queue=async_queue,
                    then=point_and_prune)
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
    parameter-state loader overwrites it (0 here), its fully_reshardable one leaves it out
    (`_copy_present_states`), and its non-Apex path shares ONE tensor
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


def _copy_present_states(opt, model_param, tensors: dict) -> None:
    """DistributedOptimizer._set_main_param_and_optimizer_states copying only the entries the
    checkpoint has: megatron-core 0.16.1's fully_reshardable loader passes no 'step' (kept in
    the param groups) yet copies every torch Adam state entry, 'step' included."""
    group_index, group_order = opt.model_param_group_index_map[model_param]
    main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
    targets = {"param": main_param, **opt.optimizer.state[main_param]}
    for key, target in targets.items():
        if key in tensors:
            target.copy_(tensors[key])


@contextlib.contextmanager
def _fully_reshardable_step_fix(optimizer, sharding: str):
    """While loading a 'fully_reshardable' checkpoint, route each plain-Adam
    DistributedOptimizer of `optimizer` through `_copy_present_states`; `_restore_adam_steps`
    sets 'step' afterwards."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
               if sharding == "fully_reshardable" and isinstance(opt, DistributedOptimizer)
               and not getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8",
                               False)]
    for opt in patched:
        opt._set_main_param_and_optimizer_states = functools.partial(_copy_present_states, opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _saved_rng_shape(metadata) -> Optional[tuple]:
    """Global shape of the checkpoint's RNG entries, from its torch_dist metadata keys
    ('rng_state/shard_OFFSET_SHAPE'): (world size,) for the per-rank key of older versions,
    (PP, positions per stage) now (`_rng_shard`); None when it holds no RNG state."""
    prefix = f"{RNG_KEY}/shard_"
    for key in metadata.state_dict_metadata:
        if key.startswith(prefix):
            return tuple(int(n) for n in key[len(prefix):].split("_")[1].split("."))
    return None


def _saved_sharding(metadata) -> str:
    """The distributed optimizer format of a checkpoint, from its torch_dist metadata keys:
    'dp_reshardable' keeps buffer shards ('optimizer.distributed.dp_group_idx_I.gbuf_idx_J...'),
    the model-space formats per-parameter tensors ('optimizer.state.exp_avg.<param>')."""
    keys = metadata.state_dict_metadata if metadata is not None else {}
    chained = r"(chained_\d+\.)?"  # a ChainedOptimizer's prefix
    if any(re.match(chained + r"optimizer\.distributed\..*\.gbuf_idx_", k) for k in keys):
        return "dp_reshardable"
    if any(re.match(chained + r"optimizer\.state\.", k) for k in keys):
        return "fully_reshardable"
    return OPTIMIZER_SHARDING


def _sizes_text(layout: dict, names) -> str:
    return " ".join(f"{label}={layout.get(name, 1)}" for name, label in FIXED_SIZES
                    if name in names)


def _changed_sizes(saved: dict, here: dict) -> list:
    """FIXED_SIZES names whose value differs (an expert-TP size that follows TP on both sides
    counts only as the TP change)."""
    changed = [name for name, _ in FIXED_SIZES if saved.get(name, 1) != here[name]]
    if {_TP, _ETP} <= set(changed) and saved.get(_ETP) == saved.get(_TP) \
            and here[_ETP] == here[_TP]:
        changed.remove(_ETP)
    return changed


def _unsupported(changed: list, sharding: str) -> Tuple[list, str]:
    """(the changed sizes a checkpoint of optimizer format `sharding` cannot follow, why)."""
    if sharding == "dp_reshardable":
        return changed, "its optimizer state is saved dp_reshardable"
    # The model-space formats follow TP / PP / VPP; an EP change also changes how Megatron
    # splits the optimizer (dense and expert parameters), which they do not follow.
    return ([n for n in changed if n in (_EP, _ETP)],
            "its optimizer state does not follow an EP or expert-TP change")


def _check_layout(folder: str, saved: Optional[dict], here: dict, sharding: str) -> list:
    """The model-parallel sizes that differ between `folder` (written at the layout `saved`,
    None when it did not record one) and this run; raises CheckpointError when its optimizer
    state (format `sharding`) cannot follow them."""
    changed = _changed_sizes(saved, here) if saved is not None else []
    unsupported, why = _unsupported(changed, sharding)
    if unsupported:
        shown = [_TP, _PP] + unsupported
        raise CheckpointError(
            f"{folder!r} was written at {_sizes_text(saved, shown)}; resuming at "
            f"{_sizes_text(here, unsupported)} is not supported ({why}): resume at "
            f"{_sizes_text(saved, shown)}, or start from its weights with "
            f"--pretrained-checkpoint {folder}")
    return changed


def _rng_kind(folder: str, metadata, rng_layout_changed: bool) -> Optional[str]:
    """Which RNG entry to load from `folder` (`_rng_entry` kinds; None keeps the seeded
    state). Checkpoints of older versions keyed it by world rank: they resume at their own
    world size only, and elsewhere raise CheckpointError."""
    shape = _saved_rng_shape(metadata) if metadata is not None else None
    if shape is not None and len(shape) == 1:
        if shape[0] != dist.get_world_size():
            raise CheckpointError(
                f"{folder!r} was written by an older version, which keyed its RNG state by "
                f"rank, at {shape[0]} ranks and resumes only there: launch {shape[0]} ranks, or "
                f"start from its weights with --pretrained-checkpoint {folder}")
        return "world"
    if metadata is not None and shape is None:
        return None
    if rng_layout_changed:
        # Other positions, other generators (Megatron-LM drops them too).
        if dist.get_rank() == 0:
            print(f"note: {folder} was written at other model-parallel sizes: its RNG state is "
                  f"not loaded, the generators keep their --seed state", flush=True)
        return None
    return "positions"


def load_training_state(folder: str, model, optimizer, scheduler,
                        verify_checksums: bool = True,
                        parallel_group=None) -> Tuple[int, int]:
    """Restore everything from `folder`; returns (iteration, consumed_samples).

    The data-parallel size may differ from the one the checkpoint was written at. TP, PP
    and VPP changes need its optimizer state in model space ('fully_reshardable', or the
    non-distributed optimizer's); other changes raise CheckpointError naming the sizes and
    `--pretrained-checkpoint` (weights only). The folder's files are verified first
    (`verify_checkpoint_files`; checksums unless `verify_checksums` is False).
    `parallel_group`: the ranks holding replicas split the reading (`parallel_load_strategy`).
    """
    from megatron.core import dist_checkpointing

    from megatron_dynamoe.checkpoint.torch_dist import (
        describe_load_failure,
        parallel_load_strategy,
    )

    metadata = verify_checkpoint_files(folder, verify_checksums=verify_checksums)
    info = read_info(folder)
    saved = info.extra.get("layout") if info is not None else None
    sharding = _saved_sharding(metadata)
    changed = _check_layout(folder, saved, current_layout(), sharding)
    # The generators belong to TP / PP / EP / expert-TP positions; VPP does not move them.
    rng = _rng_kind(folder, metadata, bool(set(changed) - {_VPP}))
    _materialise_optimizer_state(optimizer)
    state = _TrainingState(model, optimizer, scheduler, {}, is_loading=True,
                           sharding=sharding, rng=rng)
    try:
        template = state.sharded_state_dict()
        _clear_optimizer_state(optimizer)  # load_state_dict allocates its own
        loaded = dist_checkpointing.load(
            template, folder, sharded_strategy=parallel_load_strategy(folder, parallel_group))
        model.load_state_dict(loaded["model"])
        # Megatron's parameter-state loaders copy into parameters; they assert, e.g., that
        # the optimizer's buckets are the checkpoint's.
        with torch.no_grad(), _fully_reshardable_step_fix(optimizer, sharding):
            optimizer.load_state_dict(loaded["optimizer"])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise CheckpointError(f"cannot resume from {folder!r}: {describe_load_failure(e)} (was "
                              f"it written by this trainer, for this model and layout family?)"
                              ) from e
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if rng is not None:
        _set_rng_state(loaded["rng_state"])
    return int(loaded["training"]["iteration"]), int(loaded["training"]["consumed_samples"])
