"""Where this process runs: one device policy, chosen once, and the one way to get there.

`--device auto|cuda|cpu` (every tool and `launch/train.py`) resolves to a `DevicePolicy`:

- cuda: `cuda:(LOCAL_RANK % device count)` (the modulo keeps sites that bind one GPU per task
  working, where `cuda:LOCAL_RANK` would not exist), `torch.cuda.set_device`, NCCL. Models are
  built there the Megatron-LM way (`use_cpu_initialization=False`), then every module, buffer
  and plain tensor attribute that Megatron or we left on the host is moved by `place_model`.
- cpu: gloo plus the CPU accommodations of `cpu_compat`, applied because the CPU was chosen,
  not because CUDA happens to be absent (so `--device cpu` works on a GPU node).
- auto: cuda when torch sees a GPU, cpu otherwise.

`activate()` makes a policy this process's (`parallel.initialize_parallel` calls it); the rest
of the code asks `current()` / `model_device()` and moves things with `place_model` and
`place_batch`, never with `.cuda()`. `comm_device(group)` is where a tensor handed to a
collective of `group` must live (NCCL groups take CUDA tensors only).

For placement tests, `placement_target(device)` redirects `place_model` / `place_batch` (e.g.
to `meta`) without changing the process's policy: a walker can then prove that nothing is left
behind on the host, which a CPU target could not.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch

DEVICE_CHOICES = ("auto", "cuda", "cpu")

__all__ = ["DEVICE_CHOICES", "DevicePolicy", "resolve", "activate", "current", "model_device",
           "place_model", "place_batch", "comm_device", "any_rank", "placement_target",
           "misplaced_tensors"]


@dataclass(frozen=True)
class DevicePolicy:
    """The device models and batches live on, and the torch.distributed backend that goes
    with it (NCCL for CUDA, gloo for the CPU)."""

    device: torch.device
    backend: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        if self.is_cuda:
            return (f"device {self.device} ({torch.cuda.get_device_name(self.device)}), "
                    f"backend {self.backend}")
        return f"device cpu, backend {self.backend}"


def resolve(choice: str = "auto", env: Optional[Mapping[str, str]] = None) -> DevicePolicy:
    """The policy `--device choice` means on this machine (nothing is changed yet).

    Raises ValueError for an unknown choice, or for `cuda` without a usable GPU.
    """
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"--device {choice!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    env = os.environ if env is None else env
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return DevicePolicy(torch.device("cpu"), "gloo")
    if not torch.cuda.is_available():
        visible = env.get("CUDA_VISIBLE_DEVICES")
        why = (f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU" if visible is not None
               else f"torch {torch.__version__} sees no GPU"
               + ("" if torch.version.cuda else " (a CPU-only build)"))
        raise ValueError(f"--device cuda but {why}: run on a GPU node with a CUDA build of "
                         f"torch, or pass --device cpu")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    return DevicePolicy(torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl")


_ACTIVE: Optional[DevicePolicy] = None
_TARGET: Optional[torch.device] = None


def activate(policy: DevicePolicy) -> DevicePolicy:
    """Make `policy` this process's, once: select the GPU, or install the CPU accommodations.

    Activating the same policy again is a no-op; switching device inside a process raises,
    because the CPU accommodations cannot be taken back and NCCL binds its GPU at init.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        if _ACTIVE != policy:
            raise ValueError(f"this process already runs on {_ACTIVE.device}; it cannot switch "
                             f"to {policy.device} (start a new process)")
        return _ACTIVE
    from megatron_dynamoe.runtime import cpu_compat

    cpu_compat.fix_missing_transformer_engine()
    if policy.is_cuda:
        torch.cuda.set_device(policy.device)
    else:
        cpu_compat.apply()
    _ACTIVE = policy
    return policy


def current() -> DevicePolicy:
    """The active policy; before `activate()`, what `--device auto` would choose."""
    return _ACTIVE if _ACTIVE is not None else resolve("auto")


def model_device() -> torch.device:
    """Where models and batches go: the placement target if one is set, else the policy's."""
    return _TARGET if _TARGET is not None else current().device


@contextlib.contextmanager
def placement_target(device) -> Iterator[torch.device]:
    """Send `place_model` / `place_batch` to `device` inside the block (tests: `meta`)."""
    global _TARGET
    previous, _TARGET = _TARGET, torch.device(device)
    try:
        yield _TARGET
    finally:
        _TARGET = previous


def _plain_tensor_attributes(module: torch.nn.Module):
    """(name, tensor) of a module's tensors that are neither parameters nor buffers, e.g.
    Megatron's `RotaryEmbedding.inv_freq`: `Module.to` does not move them."""
    for name, value in vars(module).items():
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            yield name, value


def place_model(module: torch.nn.Module, device=None) -> torch.nn.Module:
    """Move `module` (parameters, buffers and plain tensor attributes) to `device` (default
    `model_device()`), in place; returns it. Parameters keep their identity and attributes
    (Megatron's `tensor_model_parallel`, `sequence_parallel`, ... flags), as with `.cuda()`."""
    device = model_device() if device is None else torch.device(device)
    module.to(device)
    for sub in module.modules():
        for name, value in list(_plain_tensor_attributes(sub)):
            if value.device != device:
                setattr(sub, name, value.to(device))
    return module


def place_batch(batch: Mapping[str, object], device=None) -> dict:
    """A copy of `batch` with every tensor on `device` (default `model_device()`).

    Host tensors bound for a GPU are pinned first, so the copy is asynchronous
    (`non_blocking`); the stream orders it before the kernels that read it.
    """
    device = model_device() if device is None else torch.device(device)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            if device.type == "cuda" and value.device.type == "cpu":
                value = value.pin_memory().to(device, non_blocking=True)
            else:
                value = value.to(device)
        out[key] = value
    return out


def comm_device(group=None) -> torch.device:
    """The device a tensor must be on for a collective over `group` (default: the world):
    the current GPU for NCCL, the CPU for gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank of the world (a collective: every
    rank calls it). The flag travels on the world group's communication device."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def misplaced_tensors(module: torch.nn.Module, device) -> list:
    """Names of the parameters, buffers and plain tensor attributes of `module` that are not
    on `device` (empty when placement is complete); used by tests and `check_gpu.py`."""
    device = torch.device(device)

    def off(t: torch.Tensor) -> bool:
        return t.device.type != device.type or (
            device.index is not None and t.device.index != device.index)

    names = [f"parameter {n}" for n, p in module.named_parameters() if off(p)]
    names += [f"buffer {n}" for n, b in module.named_buffers() if b is not None and off(b)]
    for mod_name, sub in module.named_modules():
        names += [f"attribute {mod_name}.{n}" for n, t in _plain_tensor_attributes(sub)
                  if off(t)]
    return names
