"""Run Megatron-Core 0.16.1 on a CPU-only PyTorch build over the gloo backend.

Megatron-Core assumes CUDA in a bounded set of places. This module meets each of them, and
nothing else, so that the real Megatron-Core code (GPTModel, tensor/pipeline/expert
parallelism, token dispatchers, schedules, DDP, optimizers, dist_checkpointing) runs
unchanged on CPU. It is the ONLY place in megatron_dynamoe that knows about the CPU path:
library code never branches on the device.

Rules:
- `apply()` is explicit: `runtime.device.activate()` calls it when the process's device
  policy is the CPU (`--device cpu`, or `auto` without a GPU), and only then. It is chosen
  because the device is the CPU, not because CUDA is absent: on a GPU node `--device cpu`
  needs the same accommodations, since Megatron would otherwise allocate on `cuda:0`.
- Every accommodation replaces a CUDA entry point or literal with its CPU meaning (on a
  CPU-only build each of them would raise), and nothing else.
- The `device="cuda"` literals are rewritten only inside the Megatron modules that contain
  them (a per-module `torch` proxy), not through a process-wide TorchFunctionMode, which
  would add Python overhead to every tensor op of the model.

`ACCOMMODATIONS` lists what was applied, for logs and tests.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
import types
from typing import Callable, Dict, List

import torch

__all__ = ["apply", "is_applied", "ACCOMMODATIONS", "CpuRNGStatesTracker"]

# name -> one line saying what it replaces; filled by apply().
ACCOMMODATIONS: Dict[str, str] = {}
_APPLIED = False

# Megatron modules with `device="cuda"` / `device='cuda'` literals in code paths we run:
# token counters (schedules), found-inf / norm buffers (optimizers, the multi-tensor fallbacks
# in utils), grad-buffer warm-up, MoE aux-loss tracker, attention masks, data broadcast,
# rerun state machine, checkpoint save verification and exchange.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)

# Functions that accept only 'torch.cuda.*Tensor' type strings for fp32/fp16/bf16 params.
_CUDA_TYPE_STRING_CHECKS = (
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     "_build_model_and_main_param_groups"),
)


def is_applied() -> bool:
    """True once `apply()` installed the CPU accommodations in this process."""
    return _APPLIED


def _note(name: str, what: str) -> None:
    ACCOMMODATIONS[name] = what


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


# --------------------------------------------------------------------------------------------
# 1. torch.cuda entry points that Megatron calls for devices, streams, events and syncs.
# --------------------------------------------------------------------------------------------
class _CpuEvent:
    """Stands in for torch.cuda.Event: CPU ops are synchronous, so events are always done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


class _CpuStream:
    """Stands in for torch.cuda.Stream: one implicit in-order CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        return None

    def query(self):
        return True

    def __eq__(self, other):
        # The alltoall dispatcher compares the current stream with its side stream.
        return isinstance(other, _CpuStream)

    def __hash__(self):
        return 0


_CPU_STREAM = _CpuStream()


def _install_torch_cuda_stand_ins() -> None:
    cuda = torch.cuda
    # ~130 allocation sites use device=torch.cuda.current_device().
    cuda.current_device = lambda: torch.device("cpu")
    _note("torch.cuda.current_device", "returns the CPU device for Megatron's allocations")
    # p2p batch sync, DDP buffer (de)allocation.
    cuda.synchronize = lambda *args, **kwargs: None
    _note("torch.cuda.synchronize", "no-op: CPU ops are synchronous")
    # MoE alltoall dispatcher D2H side stream, DDP communication stream.
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.current_stream = lambda *args, **kwargs: _CPU_STREAM
    cuda.default_stream = lambda *args, **kwargs: _CPU_STREAM
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    _note("torch.cuda.Stream/Event/stream", "inert single-stream stand-ins")
    # Optimizer state loading and a few buffers call .cuda() on tensors.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _note("torch.Tensor.cuda", "identity: tensors stay on the CPU")


# --------------------------------------------------------------------------------------------
# 2. device="cuda" literals, rewritten only inside the Megatron modules that contain them.
# --------------------------------------------------------------------------------------------
class _CpuTorchProxy(types.ModuleType):
    """A `torch` look-alike for one Megatron module: functions called through it get
    `device="cuda"` rewritten to the CPU; every other attribute is torch's own."""

    def __init__(self):
        super().__init__("torch")
        self._wrapped: Dict[str, Callable] = {}

    def __getattr__(self, name):
        value = getattr(torch, name)
        if not (inspect.isbuiltin(value) or inspect.isfunction(value)):
            return value  # classes (isinstance checks), dtypes, submodules: untouched
        # Cached per function object, not per name: if torch's attribute is replaced later
        # (a profiler, a test's monkeypatch and its undo), the proxy follows it instead of
        # calling a stale function forever.
        cached = self._wrapped.get(name)
        if cached is not None and cached.__wrapped__ is value:
            return cached

        @functools.wraps(value)
        def wrapped(*args, __fn=value, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return __fn(*args, **kwargs)

        self._wrapped[name] = wrapped
        return wrapped


def _rewrite_cuda_literals() -> None:
    for module_name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(module_name)
        module.torch = _CpuTorchProxy()
        _note(f"{module_name}.torch", 'device="cuda" literals allocate on the CPU')


# --------------------------------------------------------------------------------------------
# 2b. Uneven all_gather / reduce_scatter in tensor-parallel mappings (gloo needs equal sizes).
# --------------------------------------------------------------------------------------------
def _uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
    """torch.distributed.all_gather that accepts outputs of different first-dim sizes.

    Gloo requires equal sizes; NCCL does not. The MoE alltoall dispatcher gathers a varying
    number of tokens per TP rank, so pad to the largest, gather, and copy the real rows out.
    """
    if all(t.shape == tensor.shape for t in tensor_list):
        return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    longest = max(t.shape[0] for t in tensor_list)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    buffers = [tensor.new_empty(padded.shape) for _ in tensor_list]
    torch.distributed.all_gather(buffers, padded, group=group)
    for out, buf in zip(tensor_list, buffers):
        out.copy_(buf[: out.shape[0]])
    return None


def _uneven_reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None,
                           async_op=False):
    """torch.distributed.reduce_scatter (list form, possibly uneven) for gloo, which lacks it:
    all-reduce the concatenation and keep this rank's slice. Same result, more traffic."""
    full = torch.cat([t.contiguous() for t in input_list])
    torch.distributed.all_reduce(full, op=op, group=group)
    rank = torch.distributed.get_rank(group)
    start = sum(t.shape[0] for t in input_list[:rank])
    output.copy_(full[start: start + output.shape[0]])
    return None


class _GlooCollectives(types.ModuleType):
    """`torch.distributed` for one Megatron module, with gloo-capable uneven collectives."""

    def __init__(self):
        super().__init__("torch.distributed")

    all_gather = staticmethod(_uneven_all_gather)
    reduce_scatter = staticmethod(_uneven_reduce_scatter)

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


class _MappingsTorchProxy(_CpuTorchProxy):
    """`torch` for megatron.core.tensor_parallel.mappings: uneven collectives on gloo."""

    distributed = _GlooCollectives()


def _install_uneven_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    mappings.torch = _MappingsTorchProxy()
    _note("tensor_parallel.mappings.torch.distributed",
          "uneven all_gather / reduce_scatter emulated on gloo (MoE alltoall with TP > 1)")


# --------------------------------------------------------------------------------------------
# 3. 'torch.cuda.FloatTensor' type checks in clip_grads and the mixed-precision optimizers.
# --------------------------------------------------------------------------------------------
_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_string(self, dtype=None, non_blocking=False, **kwargs):
    result = _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)
    if dtype is None and not self.is_cuda and result.startswith("torch."):
        return "torch.cuda." + result[len("torch."):]
    return result


@contextlib.contextmanager
def _tensors_report_cuda_types():
    """While active, `tensor.type()` of a CPU tensor reads 'torch.cuda.FloatTensor' etc."""
    previous = torch.Tensor.type
    torch.Tensor.type = _cuda_type_string
    try:
        yield
    finally:
        torch.Tensor.type = previous


def _with_cuda_type_strings(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensors_report_cuda_types():
            return fn(*args, **kwargs)

    wrapper.__dynamoe_cpu_compat__ = True
    return wrapper


def _rebind_everywhere(old, new) -> List[str]:
    """Point every already-imported megatron module attribute that is `old` at `new`."""
    rebound = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)
                rebound.append(f"{name}.{attr}")
    return rebound


def _scope_cuda_type_checks() -> None:
    for module_name, class_name, fn_name in _CUDA_TYPE_STRING_CHECKS:
        module = importlib.import_module(module_name)
        if class_name is None:
            old = getattr(module, fn_name)
            _rebind_everywhere(old, _with_cuda_type_strings(old))
        else:
            cls = getattr(module, class_name)
            raw = inspect.getattr_static(cls, fn_name)
            if isinstance(raw, staticmethod):
                new = staticmethod(_with_cuda_type_strings(raw.__func__))
            elif isinstance(raw, classmethod):
                new = classmethod(_with_cuda_type_strings(raw.__func__))
            else:
                new = _with_cuda_type_strings(raw)
            setattr(cls, fn_name, new)
        _note(f"{module_name}.{class_name or ''}.{fn_name}".replace("..", "."),
              "CPU float tensors pass the 'torch.cuda.*Tensor' type check")


# --------------------------------------------------------------------------------------------
# 4. Model-parallel RNG tracker on the CPU generator.
# --------------------------------------------------------------------------------------------
def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's tracker (TP-rank seeds for dropout and weight init) over the CPU
        generator: `add` seeds a private state without disturbing the current one."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

    return CpuRNGStatesTracker


CpuRNGStatesTracker = None  # the class, once apply() has run


def _install_cpu_rng_tracker() -> None:
    global CpuRNGStatesTracker
    from megatron.core.tensor_parallel import random as mrandom

    # fork(), activation checkpointing and get_all_rng_states() go through these two.
    mrandom._get_cuda_rng_state = _get_cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    CpuRNGStatesTracker = _make_cpu_tracker_class()
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)
    _note("tensor_parallel.random", "RNG tracker forks the CPU generator")


# --------------------------------------------------------------------------------------------
# 5. MoE alltoall dispatcher: split sizes handed to all_to_all_single.
# --------------------------------------------------------------------------------------------
def _install_split_sizes_as_numpy() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Megatron converts split sizes to numpy only for CUDA tensors; gloo's
        # all_to_all_single rejects tensor split sizes, so convert CPU tensors as well.
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().numpy().copy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    _note("token_dispatcher.maybe_move_tensor_to_cpu", "CPU split sizes become numpy arrays")


# --------------------------------------------------------------------------------------------
# 6. Pipeline outputs are not pseudo-freed after their send.
# --------------------------------------------------------------------------------------------
def _keep_pipeline_outputs() -> None:
    """`deallocate_pipeline_outputs` (on in our configs, as in Megatron-LM) replaces a stage's
    output `.data` right after `isend`. NCCL has captured the buffer on its stream by then;
    gloo sends from a background thread that reads the tensor later, so the next stage would
    receive the replacement (a wrong loss with the interleaved schedule's overlapped p2p).
    On the CPU the memory it saves does not matter: keep the outputs, and let the schedule's
    direct autograd call (which asserts the output was freed) accept a kept one."""
    from torch.autograd import Variable

    from megatron.core.pipeline_parallel import schedules

    def custom_backward(output, grad_output):
        if grad_output is None:
            grad_output = torch.ones_like(output, memory_format=torch.preserve_format)
        Variable._execution_engine.run_backward(
            tensors=(output,), grad_tensors=(grad_output,), keep_graph=False,
            create_graph=False, inputs=tuple(), allow_unreachable=True, accumulate_grad=True)

    schedules.deallocate_output_tensor = lambda out, deallocate_pipeline_outputs=False: None
    schedules.custom_backward = custom_backward
    _note("schedules.deallocate_output_tensor",
          "no-op: gloo's asynchronous isend still reads the output after the call")
    _note("schedules.custom_backward", "accepts the kept (not pseudo-freed) stage output")


# --------------------------------------------------------------------------------------------
# Not CPU-specific: Transformer Engine absent.
# --------------------------------------------------------------------------------------------
def fix_missing_transformer_engine() -> None:
    """megatron-core 0.16.1 only defines `moe_utils.te_general_gemm` when Transformer Engine
    imports; the router's gating then raises NameError. None selects its torch matmul path.
    Safe on any machine, so it is applied with or without CUDA."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        _note("moe_utils.te_general_gemm", "None without Transformer Engine (torch gating)")


def apply() -> bool:
    """Install the CPU accommodations, once per process (idempotent; returns True).

    Called by `runtime.device.activate()` for a CPU policy, before any Megatron model or
    optimizer is built. Never call it in a process that runs on a GPU: it redirects
    `torch.cuda.current_device()` and `Tensor.cuda()` to the CPU for the rest of the process.
    """
    global _APPLIED
    fix_missing_transformer_engine()
    if _APPLIED:
        return True
    _install_torch_cuda_stand_ins()
    _rewrite_cuda_literals()
    _install_uneven_collectives()
    _scope_cuda_type_checks()
    _install_cpu_rng_tracker()
    _install_split_sizes_as_numpy()
    _keep_pipeline_outputs()
    _APPLIED = True
    return True
