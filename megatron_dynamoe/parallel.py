"""Process-group set-up: torch.distributed + Megatron-Core model-parallel groups.

One function, `initialize_parallel`, brings a process from "launched" to "ready to build a
model": it applies the CPU compatibility layer where CUDA is absent, starts torch.distributed
(NCCL on GPUs, gloo on CPU) from the usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
environment, creates Megatron's TP / PP / EP / DP groups and seeds the model-parallel RNG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_dynamoe import cpu_compat


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
                     "expert_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1:
                raise ValueError(f"--virtual-pipeline-model-parallel-size must be >= 1, got {vpp}")
            if self.pipeline_model_parallel_size == 1:
                raise ValueError("--virtual-pipeline-model-parallel-size needs "
                                 "--pipeline-model-parallel-size > 1 (the interleaved schedule "
                                 "splits each pipeline stage into chunks)")

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for `world_size` ranks; raises when TP x PP does not divide the world."""
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP = {model_parallel}: "
                f"launch a multiple of {model_parallel} ranks or change the layout")
        return world_size // model_parallel


def default_backend() -> str:
    """NCCL where CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_parallel(layout: ParallelLayout, seed: int = 1234, timeout_minutes: int = 10):
    """Start torch.distributed (if needed) and Megatron's parallel groups for `layout`.

    Reads RANK / WORLD_SIZE (default 0 / 1) and, for several processes, MASTER_ADDR /
    MASTER_PORT (default 127.0.0.1 / 29500); a single process uses an in-process store.
    Calling it again re-creates the Megatron groups; returns the ProcessGroupCollection.
    """
    from datetime import timedelta

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    cpu_compat.apply()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(minutes=timeout_minutes)
        if world_size == 1:
            # One process needs no rendezvous: an in-process store never binds a port, so
            # tools run side by side (or inside a test that holds a port) do not collide.
            dist.init_process_group(default_backend(), store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(default_backend(), rank=rank, world_size=world_size,
                                    timeout=timeout)
    layout.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_parallel() -> None:
    """Tear down Megatron's groups and torch.distributed (end of a run or a test)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
