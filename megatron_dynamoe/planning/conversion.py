"""What a conversion job needs: host memory, GPU memory and time of streaming conversion,
distributed MoEfy and distributed evaluation, before the job starts (slurm/convert_70b.sh and
slurm/evaluate_70b.sh print it; `tools/plan_layout.py --job convert|evaluate`).

The model of each step (every number is an estimate; the assumptions are fields of
`JobAssumptions`, printed with the result):
- streaming HF -> Megatron (`convert_checkpoint.py hf-to-megatron --streaming`, one CPU
  process): host memory = 3 x the largest tensor group held at once (one decoder layer, or
  the embedding / output matrix: the source tensor, the converted tensor, the copy converted
  back for the exactness check), or the layer-by-layer check's two fp32 one-layer models and
  the layer's stored tensors of both sides, whichever is more, + the interpreter; time =
  reading the source, writing the checkpoint and reading it again for checksums, and the
  layer check reading both, at `disk_bytes_per_s`. The optional final
  logit check builds both whole models in fp32 (8 bytes per parameter + the interpreter).
- distributed MoEfy (`moefy.py` at TP x PP, `--bf16` or fp32): per GPU, the dense and the
  DynaMoE model's parameters of the busiest stage (`planner.stage_parameters`), one layer's
  full FFN gathered over TP (gathered, permuted, re-split: 3 copies), the router data bound
  (`--router-fit-memory-gib`, TP rank 0), calibration activations and logits, plus the
  planner's reserve and fragmentation. Time = loading + calibration forward + one forward per
  router-fit group (each also computes every level's FFN output of its layers) + the parity
  forwards of both models + saving; forwards run one batch through the pipeline at a time
  (no pipelining: the stages take turns), at `efficiency` x the GPU's peak x TP.
- distributed evaluation (`evaluate.py` at TP x PP): per GPU, two models at once (the
  checkpoint and one baseline); time per evaluated row = its tokens' forward FLOPs at the same
  rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.models.architectures import ModelArchitecture
from megatron_dynamoe.planning.planner import (
    FRAGMENTATION,
    GIB,
    RESERVED_GIB,
    PlanRequest,
    layer_parameters,
    stage_parameters,
)
from megatron_dynamoe.runtime.gpus import GpuSpec
from megatron_dynamoe.runtime.parallel import ParallelLayout

INTERPRETER_BYTES = 1.5 * GIB  # python + torch + Megatron-Core + transformers, resident


@dataclass(frozen=True)
class JobAssumptions:
    """The rates and sizes the estimates assume (printed with them)."""

    disk_bytes_per_s: float = 1.0e9   # sustained sequential read / write of the checkpoint FS
    efficiency: float = 0.25          # achieved / peak FLOP/s of forward-only batches
    calibration_tokens: int = 64 * 512
    parity_tokens: int = 2 * 512
    router_fit_bytes: float = 4.0 * GIB
    batch_tokens: int = 4 * 512       # tokens of one calibration / evaluation batch


@dataclass(frozen=True)
class ConversionEstimate:
    """Bytes and seconds of the three steps (see the module docstring)."""

    source_bytes: float
    convert_host_bytes: float
    convert_seconds: float
    logit_check_host_bytes: float
    moefy_gpu_bytes: float
    moefy_router_groups: int
    moefy_seconds: float
    evaluate_gpu_bytes: float
    evaluate_seconds_per_million_tokens: float


def _layout(tp: int, pp: int) -> ParallelLayout:
    return ParallelLayout(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _busiest_stage_parameters(arch: ModelArchitecture, dyn: Optional[DynaMoEConfig], tp: int,
                              pp: int) -> float:
    request = PlanRequest("estimate", arch, dyn, num_gpus=tp * pp, layout=_layout(tp, pp))
    return max(sum(stage_parameters(request, stage)) for stage in range(pp))


def estimate(arch: ModelArchitecture, dyn: DynaMoEConfig, gpu: GpuSpec, tp: int, pp: int,
             bf16: bool = True, source_bytes_per_param: int = 2,
             assume: JobAssumptions = JobAssumptions()) -> ConversionEstimate:
    """Estimate the conversion job of `arch` (source checkpoint in `source_bytes_per_param`
    bytes per parameter) MoEfied and evaluated at TP = `tp`, PP = `pp` on `gpu`s, the models
    in bf16 (else fp32)."""
    params = arch.num_parameters()
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    split, replicated, _ = layer_parameters(arch, None, False)
    layer = split + replicated
    largest = max(layer, v * h)
    source = params * source_bytes_per_param
    layer_check = 2 * layer * 4 + 2 * layer * source_bytes_per_param
    convert_host = max(3 * largest * source_bytes_per_param, layer_check) + INTERPRETER_BYTES
    convert_seconds = 5 * source / assume.disk_bytes_per_s
    logit_host = 8 * params + INTERPRETER_BYTES

    width = 2 if bf16 else 4
    dense_gpu = _busiest_stage_parameters(arch, None, tp, pp)
    dynamoe_gpu = _busiest_stage_parameters(arch, dyn, tp, pp)
    ffn = (3 if arch.gated else 2) * h * f
    gathered = 3 * ffn * width
    activations = assume.batch_tokens * (16 * h * width + 2 * 4 * v / tp)
    reserve = RESERVED_GIB * GIB
    moefy_gpu = ((dense_gpu + dynamoe_gpu) * width + gathered + activations
                 + assume.router_fit_bytes) * (1 + FRAGMENTATION) + reserve

    per_layer_data = assume.calibration_tokens * (h + dyn.num_levels) * 4
    per_group = max(1, int(assume.router_fit_bytes // per_layer_data))
    layers_per_stage = math.ceil(sum(dyn.is_moefied(i) for i in range(arch.num_layers)) / pp)
    groups = math.ceil(layers_per_stage / per_group)
    peak = (gpu.bf16_flops if bf16 else gpu.fp32_flops) * tp * assume.efficiency
    forward = 2 * params * assume.calibration_tokens
    labels = 2 * ffn * arch.num_layers * assume.calibration_tokens / pp  # level outputs
    model_bytes = params * width
    moefy_seconds = (source / assume.disk_bytes_per_s
                     + (forward * (1 + groups) + labels) / peak
                     + 2 * 2 * params * assume.parity_tokens / peak
                     + 2 * model_bytes / assume.disk_bytes_per_s)
    evaluate_gpu = ((dense_gpu + dynamoe_gpu) * width + activations) * (1 + FRAGMENTATION) \
        + reserve
    evaluate_seconds = 2 * params * 1e6 / peak
    return ConversionEstimate(source, convert_host, convert_seconds, logit_host, moefy_gpu,
                              groups, moefy_seconds, evaluate_gpu, evaluate_seconds)
