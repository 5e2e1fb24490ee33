"""Process-group set-up: torch.distributed + Megatron-Core model-parallel groups.

One function, `initialize_parallel`, brings a process from "launched" to "ready to build a
model": it activates the device policy (`runtime.device`: the GPU and NCCL, or the CPU, gloo
and the CPU accommodations), starts torch.distributed from the usual RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT environment, creates Megatron's TP / PP / EP / DP groups and seeds
the model-parallel RNG. `destroy_parallel` tears it down (entry points call it at exit, so
NCCL communicators are released rather than leaked into interpreter shutdown).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from megatron_dynamoe.runtime import device as runtime_device

DEFAULT_TIMEOUT_MINUTES = 10


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the parallel dimensions; data parallel is what remains of the world."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None  # None: same as TP (Megatron's default)
    # Model chunks per pipeline stage (interleaved 1F1B schedule); None: one chunk.
    virtual_pipeline_model_parallel_size: int | None = None

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "expert_tensor_parallel_size",
                     "virtual_pipeline_model_parallel_size"):
            value = getattr(self, name)
            optional = name in ("expert_tensor_parallel_size",
                                "virtual_pipeline_model_parallel_size")
            if value is None and optional:
                continue
            # bool is an int subclass; 2.0 or "2" would reach Megatron's group arithmetic.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got "
                                 f"{value!r}")
        if (self.virtual_pipeline_model_parallel_size is not None
                and self.pipeline_model_parallel_size == 1):
            raise ValueError("--virtual-pipeline-model-parallel-size needs "
                             "--pipeline-model-parallel-size > 1 (the interleaved schedule "
                             "splits each pipeline stage into chunks)")

    @property
    def expert_tensor_parallel(self) -> int:
        """The expert layers' TP size: --expert-tensor-parallel-size, else TP (Megatron)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for `world_size` ranks; raises when TP x PP does not divide the world."""
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP = {model_parallel}: "
                f"launch a multiple of {model_parallel} ranks or change the layout")
        return world_size // model_parallel


def initialize_parallel(layout: ParallelLayout, seed: int = 1234,
                        timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, device="auto"):
    """Start torch.distributed (if needed) and Megatron's parallel groups for `layout`.

    `device` is a `--device` choice ('auto', 'cuda', 'cpu') or a `DevicePolicy`; it is
    activated first (once per process). Reads RANK / WORLD_SIZE (default 0 / 1) and, for
    several processes, MASTER_ADDR / MASTER_PORT (default 127.0.0.1 / 29500); a single process
    uses an in-process store. `timeout_minutes` bounds every collective of the default group
    and of Megatron's TP / PP / EP / DP groups (--distributed-timeout-minutes). Calling it again re-creates the Megatron groups; returns
    the ProcessGroupCollection.
    """
    from datetime import timedelta

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if timeout_minutes <= 0:
        raise ValueError(f"--distributed-timeout-minutes must be > 0, got {timeout_minutes}")
    policy = (device if isinstance(device, runtime_device.DevicePolicy)
              else runtime_device.resolve(device))
    runtime_device.activate(policy)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        kwargs = dict(rank=rank, world_size=world_size,
                      timeout=timedelta(minutes=timeout_minutes))
        if policy.is_cuda:
            # Eager NCCL communicator creation bound to this rank's GPU (as Megatron-LM's
            # maybe_force_nccl_backend_init): a wrong device shows up here, not mid-step.
            kwargs["device_id"] = policy.device
        if world_size == 1:
            # One process needs no rendezvous: an in-process store never binds a port, so
            # tools run side by side (or inside a test that holds a port) do not collide.
            kwargs["store"] = dist.HashStore()
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(policy.backend, **kwargs)
    elif dist.get_backend() != policy.backend:
        raise ValueError(f"torch.distributed already runs {dist.get_backend()}, but the device "
                         f"policy ({policy.device}) needs {policy.backend}")
    layout.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        _destroy_megatron_groups(parallel_state)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        # Every Megatron group gets the same bound as the default group (Megatron's own
        # default is 30 minutes, whatever --distributed-timeout-minutes says).
        distributed_timeout_minutes=timeout_minutes,
    )
    # Megatron-Core 0.16.1 creates the expert data-parallel gloo group without a timeout
    # (30 minutes): a stalled rank would hang the distributed optimizer's checkpoint gathers.
    expert_gloo = getattr(parallel_state, "_EXPERT_DATA_PARALLEL_GROUP_GLOO", None)
    if expert_gloo is not None:
        expert_gloo.set_timeout(timedelta(minutes=timeout_minutes))
    # Every generator from --seed, as Megatron-LM: data-parallel ranks then hold identical
    # Python / NumPy states too, so a checkpoint's one copy per model-parallel position
    # resumes them exactly at any data-parallel size.
    random.seed(seed)
    np.random.seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def _megatron_groups(parallel_state) -> list:
    """The process groups Megatron's parallel_state holds now, each once, in the module's
    (rank-independent) order."""
    found = []
    for value in list(vars(parallel_state).values()):
        values = value.values() if isinstance(value, dict) else \
            value if isinstance(value, (list, tuple)) else (value,)
        for group in values:
            if isinstance(group, dist.ProcessGroup) and all(group is not g for g in found):
                found.append(group)
    return found


def _destroy_megatron_groups(parallel_state) -> None:
    """Megatron's destroy_model_parallel, plus the process groups it only forgets: otherwise
    every re-initialisation in a process leaks its communicators (NCCL's GPU buffers, gloo's
    two threads per group; a test session reached 3,000 threads)."""
    groups = _megatron_groups(parallel_state)
    parallel_state.destroy_model_parallel()
    for group in groups:
        if group is dist.group.WORLD:
            continue
        try:
            dist.destroy_process_group(group)
        except ValueError:  # destroyed already (Megatron destroys its gloo groups itself)
            pass


def destroy_parallel() -> None:
    """Tear down Megatron's groups and torch.distributed (end of a run or a test)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
