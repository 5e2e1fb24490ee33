"""Layout planner: divisibility, per-GPU memory and per-step communication of a training
layout, before anything is launched. Pure arithmetic (no torch.distributed, no GPU).

Memory follows Megatron's accounting. Static bytes per parameter: the weights (2 in bf16,
4 in fp32), the fp32 main gradients (the trainer reduces gradients in fp32), and Adam's state:
bf16 keeps fp32 main params + two fp32 moments (12 bytes), fp32 keeps the two moments (8
bytes); the distributed optimizer shards that state over the data-parallel group (the
expert-data-parallel group for expert weights). Activations per layer and micro-batch follow
Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022),
term by term, so that a GPT layer (FFN 4h, multi-head attention, dropout) gives their
`s*b*h*(34 + 5*a*s/h)` bytes, while GQA, SwiGLU, no dropout (our fine-tuning) and DynaMoE shell
dispatch change the terms that they change. Stage r of a 1F1B pipeline keeps min(PP - r, M)
micro-batches in flight; the interleaved schedule keeps 2(PP - r - 1) + (VPP - 1) PP + 1
model chunks (Megatron 0.16.1 `get_pp_rank_microbatches`). The estimate is the most loaded
stage's; it must fit `gpu_memory_gib` after a safety margin (allocator fragmentation
FRAGMENTATION and a fixed RESERVED_GIB for the CUDA context, NCCL buffers and workspaces).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megatron_dynamoe.models.architectures import ModelArchitecture
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.runtime.parallel import ParallelLayout

GIB = 2 ** 30
FRAGMENTATION = 0.10   # caching-allocator fragmentation on top of live tensors
RESERVED_GIB = 4.0     # CUDA context + cuBLAS workspaces + NCCL communicator buffers
GRAD_BYTES = 4         # main gradients are fp32 (trainer: grad_reduce_in_fp32=True)
RECOMPUTE_COST = {None: 0.0, "selective": 0.05, "full": 0.33}  # extra compute per step


@dataclass(frozen=True)
class PlanRequest:
    """A model, a cluster and a layout to check. The TP / PP / VPP / EP / expert-TP sizes are
    `layout` (the `ParallelLayout` that `initialize_parallel` takes; read them as `tp`, `pp`,
    `vpp`, `ep`, `etp`, with VPP / ETP None: off / same as TP); context parallelism, which
    `ParallelLayout` does not have, is `cp`."""

    model: str
    arch: ModelArchitecture
    dynamoe: Optional[DynaMoEConfig]
    num_gpus: int
    gpus_per_node: Optional[int] = None
    layout: ParallelLayout = ParallelLayout()
    cp: int = 1
    micro_batch: int = 1
    global_batch: int = 8
    seq_length: int = 256
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    recompute: Optional[str] = None          # None | 'selective' | 'full'
    recompute_method: str = "uniform"        # full only: 'uniform' | 'block'
    recompute_num_layers: int = 1
    bf16: bool = False
    dropout: bool = False                    # our fine-tuning config has no dropout
    # SDPA (our default attention) / TE: no s^2 tensors are kept; False: Megatron's local
    # DotProductAttention (--attention-backend local).
    flash_attention: bool = True
    distill: bool = False                    # a frozen dense teacher on every GPU
    gpu_memory_gib: float = 80.0
    reserved_gib: float = RESERVED_GIB       # per-process memory outside the model's tensors

    def __post_init__(self):
        if not isinstance(self.layout, ParallelLayout):
            raise ValueError(f"plan: layout = {self.layout!r} must be a ParallelLayout")
        # Sizes the request can have (the divisibility rules come later, one message each);
        # the layout's sizes were checked by ParallelLayout itself.
        counts = dict(num_gpus=self.num_gpus, cp=self.cp, micro_batch=self.micro_batch,
                      global_batch=self.global_batch, seq_length=self.seq_length,
                      recompute_num_layers=self.recompute_num_layers,
                      gpus_per_node=self.gpus_per_node)
        for name, value in counts.items():
            if value is None and name == "gpus_per_node":
                continue  # unknown
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"plan: {name} = {value!r} must be an integer >= 1")
        if not (math.isfinite(self.gpu_memory_gib) and self.gpu_memory_gib > 0):
            raise ValueError(f"plan: GPU memory {self.gpu_memory_gib} GiB must be a finite "
                             f"number > 0")
        if not (math.isfinite(self.reserved_gib) and 0 <= self.reserved_gib
                < self.gpu_memory_gib):
            raise ValueError(f"plan: reserved memory {self.reserved_gib} GiB must be in [0, "
                             f"GPU memory {self.gpu_memory_gib})")

    @property
    def tp(self) -> int:
        return self.layout.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.layout.pipeline_model_parallel_size

    @property
    def vpp(self) -> Optional[int]:
        return self.layout.virtual_pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.layout.expert_model_parallel_size

    @property
    def etp(self) -> Optional[int]:
        return self.layout.expert_tensor_parallel_size

    def with_layout(self, **sizes) -> PlanRequest:
        """This request with some `ParallelLayout` sizes changed, by their field names
        (`r.with_layout(virtual_pipeline_model_parallel_size=None)`)."""
        return dataclasses.replace(self, layout=dataclasses.replace(self.layout, **sizes))

    @property
    def expert_tp(self) -> int:
        return self.layout.expert_tensor_parallel

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    @property
    def dp(self) -> int:
        return self.num_gpus // (self.tp * self.pp * self.cp)

    @property
    def edp(self) -> int:
        return self.num_gpus // (self.expert_tp * self.ep * self.pp)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    @property
    def param_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def optimizer_bytes(self) -> int:
        return 12 if self.bf16 else 8


def divisibility_problems(r: PlanRequest) -> List[str]:
    """Every rule the layout breaks, each naming the fix (empty: the layout is well formed)."""
    a, p = r.arch, []
    heads, groups = a.num_attention_heads, a.query_groups
    if min(r.tp, r.pp, r.ep, r.expert_tp, r.cp, r.micro_batch, r.num_gpus) < 1:
        return ["TP, PP, EP, expert TP, CP, the micro batch and the GPU count must all be >= 1"]
    if r.num_gpus % (r.tp * r.pp * r.cp):
        p.append(f"{r.num_gpus} GPUs are not divisible by TP x PP x CP = {r.tp} x {r.pp} x "
                 f"{r.cp}: use a multiple of {r.tp * r.pp * r.cp} GPUs or smaller TP / PP")
    if r.gpus_per_node and r.gpus_per_node % r.tp:
        p.append(f"TP={r.tp} does not divide the {r.gpus_per_node} GPUs of a node: a TP group "
                 f"must stay inside a node (NVLink)")
    if heads % r.tp or groups % r.tp:
        p.append(f"TP={r.tp} must divide the {heads} attention heads and {groups} query groups")
    if a.ffn_hidden_size % r.tp or a.vocab_size % r.tp:
        p.append(f"TP={r.tp} must divide the FFN size {a.ffn_hidden_size} and the vocabulary "
                 f"{a.vocab_size}")
    if r.vpp is not None and (r.vpp < 2 or r.pp < 2):
        p.append("the interleaved schedule needs PP > 1 and VPP > 1: unset VPP")
    if a.num_layers % (r.pp * r.chunks):
        p.append(f"PP x VPP = {r.pp} x {r.chunks} must divide the {a.num_layers} layers")
    if r.num_gpus % (r.expert_tp * r.ep * r.pp):
        p.append(f"{r.num_gpus} GPUs are not divisible by expert TP x EP x PP = {r.expert_tp} x "
                 f"{r.ep} x {r.pp} (Megatron's expert grid): lower EP or set expert TP to 1")
    if r.dynamoe is None and r.ep > 1:
        p.append("EP > 1 needs a DynaMoE model: a dense model has no experts")
    if r.dynamoe is not None:
        try:
            r.dynamoe.validate_for_model(a.ffn_hidden_size, a.num_layers, r.ep, r.expert_tp)
        except ValueError as e:
            p.append(str(e))
        if r.tp > 1 and not r.sequence_parallel:
            p.append("MoE layers with TP > 1 need --sequence-parallel (Megatron refuses to train "
                     "without it)")
    if r.sp and r.seq_length % (r.tp * r.cp):
        p.append(f"sequence parallelism splits the {r.seq_length} tokens over TP x CP = "
                 f"{r.tp * r.cp}: choose a multiple of it")
    if r.cp > 1 and r.seq_length % (2 * r.cp):
        p.append(f"context parallelism needs the sequence length divisible by 2 x CP = {2 * r.cp}")
    dp = r.dp
    if not dp or r.num_gpus % (r.tp * r.pp * r.cp):
        pass  # the batch rules need a data-parallel size
    elif r.global_batch % (r.micro_batch * dp):
        p.append(f"global batch {r.global_batch} is not divisible by micro batch x DP = "
                 f"{r.micro_batch} x {dp}: choose a multiple of {r.micro_batch * dp}")
    elif r.vpp and r.num_microbatches % r.pp:
        p.append(f"the interleaved schedule needs the {r.num_microbatches} micro-batches per step "
                 f"to be a multiple of PP={r.pp}: raise the global batch or unset VPP")
    if r.recompute not in RECOMPUTE_COST or r.recompute_method not in ("uniform", "block") \
            or r.recompute_num_layers < 1:
        p.append("recompute must be none / selective / full (method uniform|block, layers >= 1)")
    return p


# ---------------------------------------------------------------------------------------------
# Parameters and memory
# ---------------------------------------------------------------------------------------------
def layer_parameters(arch: ModelArchitecture, dyn: Optional[DynaMoEConfig], moe: bool
                     ) -> Tuple[int, int, int]:
    """(TP-split, TP-replicated, expert) parameters of one decoder layer."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    kv = arch.query_groups * (h // arch.num_attention_heads)
    split, replicated = h * (h + 2 * kv) + h * h, 2 * h
    ffn = 3 * h * f if arch.gated else 2 * h * f
    if arch.family == "gpt2":  # biases: QKV and fc1 split, projection and fc2 replicated;
        split, replicated = split + h + 2 * kv + f, replicated + 2 * h + 2 * h  # LN biases
    if moe:
        return split, replicated + dyn.num_levels * (h + 1), ffn  # + the [K, H] router
    return split + ffn, replicated, 0


def stage_layers(r: PlanRequest, stage: int) -> List[int]:
    """Decoder layer indices held by pipeline stage `stage` (all of its chunks)."""
    per_chunk = r.arch.num_layers // (r.pp * r.chunks)
    return [(c * r.pp + stage) * per_chunk + i for c in range(r.chunks) for i in range(per_chunk)]


def stage_parameters(r: PlanRequest, stage: int) -> Tuple[float, float]:
    """(non-expert, expert) parameters on one GPU of `stage`."""
    a, dense, expert = r.arch, 0.0, 0.0
    for layer in stage_layers(r, stage):
        moe = r.dynamoe is not None and r.dynamoe.is_moefied(layer)
        split, replicated, experts = layer_parameters(a, r.dynamoe, moe)
        dense += split / r.tp + replicated
        expert += experts / (r.ep * r.expert_tp)
    embedding = a.vocab_size * a.hidden_size / r.tp
    if stage == 0:
        dense += embedding + (a.max_position_embeddings * a.hidden_size
                              if a.family == "gpt2" else 0)
    if stage == r.pp - 1:
        dense += a.hidden_size * (2 if a.family == "gpt2" else 1)  # final norm
        # The output layer: its own matrix, or the tied copy Megatron keeps on the last stage.
        if not a.tie_embeddings or r.pp > 1:
            dense += embedding
    return dense, expert


def layer_activation_bytes(r: PlanRequest, moe: bool, recompute: Optional[str]) -> float:
    """Bytes one layer keeps for backward per micro-batch: Korthikanti et al.'s terms."""
    a, h = r.arch, r.arch.hidden_size
    s, t, e = r.seq_length // r.cp, r.tp, (2 if r.bf16 else 4)
    sbh = s * r.micro_batch * h
    rep = 1 / t if r.sp else 1.0               # tensors TP replicates unless SP shards them
    drop = 1 if r.dropout else 0
    gate = 2 if a.gated else 1
    # Attention: norm + QKV input, Q/K/V (GQA shrinks K and V), projection input, mask.
    attn = 2 * e * rep + e * (1 + 2 * a.query_groups / a.num_attention_heads) / t + e / t \
        + drop * rep
    # Core attention (softmax output, dropout mask + output): the s^2 terms.
    core = 0.0 if recompute == "selective" or r.flash_attention else \
        (e + drop * (1 + e)) * a.num_attention_heads * r.seq_length / h / t
    f = a.ffn_hidden_size / h
    if not moe:
        mlp = 2 * e * rep + e * gate * f / t + e * f / t + drop * rep
    else:
        # Every token can reach all S shells (theta = 1, label steps): k = S copies of its
        # hidden state enter the experts and k leave them; the expert-TP all-gather gives each
        # GPU etp / t of the TP group's tokens. fp32 router input.
        k = r.dynamoe.num_shells
        copies = k * r.expert_tp / t if r.sp else k
        mlp = e * rep + 4 * rep + 2 * e * copies + (e * gate * f + e * f) / t + drop * rep
    return sbh * (attn + core + mlp)


def _in_flight_chunks(r: PlanRequest, stage: int) -> int:
    m = r.num_microbatches
    if r.vpp is None:
        return min(r.pp - stage, m)
    return min(2 * (r.pp - stage - 1) + (r.vpp - 1) * r.pp + 1, m * r.vpp)


def stage_activation_bytes(r: PlanRequest, stage: int) -> float:
    """Activations stage `stage` holds at its peak (all in-flight micro-batches)."""
    layers = stage_layers(r, stage)
    moe_share = sum(r.dynamoe is not None and r.dynamoe.is_moefied(i) for i in layers) / len(layers)

    def per_layer(recompute):
        moe = moe_share * layer_activation_bytes(r, True, recompute) if moe_share else 0.0
        return moe + (1 - moe_share) * layer_activation_bytes(r, False, recompute)

    per_chunk = len(layers) // r.chunks
    e, sb = (2 if r.bf16 else 4), r.seq_length // r.cp * r.micro_batch
    layer_input = sb * r.arch.hidden_size * e / (r.tp if r.sp else 1)
    working = 0.0
    if r.recompute == "full":
        n = min(r.recompute_num_layers, per_chunk)
        if r.recompute_method == "uniform":
            chunk = math.ceil(per_chunk / n) * layer_input
        else:
            chunk = n * layer_input + (per_chunk - n) * per_layer(None)
        working = (n if r.recompute_method == "uniform" else 1) * per_layer(None)
    else:
        chunk = per_chunk * per_layer(r.recompute)
    total = _in_flight_chunks(r, stage) * chunk + working
    if stage == 0:
        total += 8 * sb * min(r.pp, r.num_microbatches)  # int64 token ids in flight
    if stage == r.pp - 1:
        # Final norm + output-layer inputs; the logits (fp32 softmax kept by the vocab-parallel
        # cross entropy, plus the transient logits tensor at the peak).
        total += 2 * layer_input + (4 + e) * sb * r.arch.vocab_size / r.tp
    return total


@dataclass
class StageMemory:
    """Per-GPU bytes of one pipeline stage."""

    stage: int
    params: float            # non-expert + expert parameters on this GPU
    weights: float
    grads: float
    optimizer: float
    activations: float
    teacher: float = 0.0     # distillation: the dense teacher's weights + the step's logits

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.teacher


def stage_memory(r: PlanRequest, stage: int) -> StageMemory:
    """Weights, gradients, optimizer state and activations of one GPU of `stage`."""
    dense, expert = stage_parameters(r, stage)
    opt_dense, opt_expert = dense * r.optimizer_bytes, expert * r.optimizer_bytes
    if r.distributed_optimizer:
        opt_dense, opt_expert = opt_dense / (r.dp * r.cp), opt_expert / r.edp
    return StageMemory(stage, dense + expert, (dense + expert) * r.param_bytes,
                       (dense + expert) * GRAD_BYTES, opt_dense + opt_expert,
                       stage_activation_bytes(r, stage), teacher_bytes(r, stage))


def teacher_bytes(r: PlanRequest, stage: int) -> float:
    """Distillation's cost on one GPU of `stage` (0 without): the frozen dense teacher at the
    student's TP / PP (weights only, no gradients or optimizer state) and, on the last stage,
    its logits [b, s, V / TP] for every micro-batch of the step, which the trainer computes
    before the student's forward and keeps until the step's last backward."""
    if not r.distill:
        return 0.0
    dense, _ = stage_parameters(dataclasses.replace(r, dynamoe=None), stage)
    total = dense * r.param_bytes
    if stage == r.pp - 1:
        total += (r.num_microbatches * r.micro_batch * r.seq_length // r.cp
                  * r.arch.vocab_size / r.tp * r.param_bytes)
    return total


def required_gib(total_bytes: float, reserved_gib: float = RESERVED_GIB) -> float:
    """Device memory a rank with `total_bytes` of live tensors needs, with the safety margin."""
    return total_bytes * (1 + FRAGMENTATION) / GIB + reserved_gib


# ---------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------
def communication_bytes(r: PlanRequest) -> Dict[str, float]:
    """Bytes one GPU sends per training step, by kind: layers as on stage 0, data-parallel
    gradients of the largest stage (the slowest GPU sets the pace). Ring algorithms: all-reduce
    sends 2(g-1)/g of the data, all-gather / reduce-scatter / all-to-all (g-1)/g."""
    a, e = r.arch, (2 if r.bf16 else 4)
    s, b, h, t, m = r.seq_length // r.cp, r.micro_batch, a.hidden_size, r.tp, r.num_microbatches
    x = s * b * h * e                                  # one activation tensor of the layer
    layers = r.arch.num_layers // r.pp
    moe_layers = sum(r.dynamoe is not None and r.dynamoe.is_moefied(i)
                     for i in stage_layers(r, 0))
    refwd = 1 if r.recompute == "full" else 0          # full recompute repeats the forward
    ring = (t - 1) / t
    # Dense layer: SP does 4 gathers/scatters forward, 4 backward + 2 re-gathers of saved
    # inputs; without SP 2 all-reduces forward, 2 backward. MoE layers: attention half.
    per_dense = (4 * (1 + refwd) + 6) * ring * x if r.sp else (2 * (1 + refwd) + 2) * 2 * ring * x
    per_attn = per_dense / 2
    tp_bytes = m * ((layers - moe_layers) * per_dense + moe_layers * per_attn)
    out = {"tensor-parallel": tp_bytes}
    if moe_layers:
        k = r.dynamoe.num_shells
        copies = s * b * h * e * k / (t if r.sp else 1)  # token copies this GPU dispatches
        out["expert-parallel all-to-all"] = \
            m * moe_layers * (4 + 2 * refwd) * (r.ep - 1) / r.ep * copies
        out["expert-tensor-parallel"] = \
            m * moe_layers * (4 + 2 * refwd) * (r.expert_tp - 1) * copies  # ring: (g-1)/g of g x
    if r.cp > 1:
        kv = s * b * 2 * a.query_groups * (h // a.num_attention_heads) / t * e
        out["context-parallel"] = m * layers * (3 + refwd) * (r.cp - 1) * kv
    if r.pp > 1:
        out["pipeline p2p"] = m * 2 * r.chunks * x / (t if r.sp else 1)
    dense, expert = max((stage_parameters(r, i) for i in range(r.pp)), key=sum)
    d = r.dp * r.cp
    if r.distributed_optimizer:
        out["data-parallel"] = (d - 1) / d * dense * (GRAD_BYTES + r.param_bytes) \
            + (r.edp - 1) / r.edp * expert * (GRAD_BYTES + r.param_bytes)
    else:
        out["data-parallel"] = 2 * ((d - 1) / d * dense + (r.edp - 1) / r.edp * expert) * GRAD_BYTES
    return out


# ---------------------------------------------------------------------------------------------
# Verdict and search
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The planner's verdict on one request."""

    request: PlanRequest
    problems: List[str]
    stages: List[StageMemory]
    communication: Dict[str, float]

    @property
    def worst(self) -> Optional[StageMemory]:
        return max(self.stages, key=lambda m: m.total) if self.stages else None

    @property
    def required_gib(self) -> float:
        return required_gib(self.worst.total, self.request.reserved_gib) if self.stages \
            else math.inf

    @property
    def fits(self) -> bool:
        return not self.problems and self.required_gib <= self.request.gpu_memory_gib

    @property
    def in_flight(self) -> int:
        """Model chunks the most loaded stage keeps activations for."""
        return _in_flight_chunks(self.request, self.worst.stage)

    @property
    def overhead(self) -> float:
        """Relative extra time: pipeline bubble + recomputation (for ranking layouts)."""
        r = self.request
        return (r.pp - 1) / (r.chunks * r.num_microbatches) + RECOMPUTE_COST[r.recompute]


def plan(r: PlanRequest) -> Plan:
    """Check `r`; memory and communication only for a well-formed layout."""
    problems = divisibility_problems(r)
    if problems:
        return Plan(r, problems, [], {})
    return Plan(r, [], [stage_memory(r, i) for i in range(r.pp)], communication_bytes(r))
