"""Model FLOPs of a training step and the GPU's peak: TFLOP/s per GPU and MFU for the log.

A step's model FLOPs count the work the step's tokens really cause, as MFU is defined (no
recomputation): the student's forward and backward (3 x its forward FLOPs,
`models.flops.forward_flops_per_token`) with each DynaMoE layer at the FFN fraction it
ran (the measured routed fraction; on a step that computes difficulty labels every token
goes through every shell, a full FFN), plus the distillation teacher's forward (a dense
forward per token). Attention counts the causal mean context (s + 1) / 2.
"""

from __future__ import annotations

from typing import Optional

def peak_flops(device_name: str, bf16: bool) -> Optional[float]:
    """Peak FLOP/s of the GPU called `device_name` (torch.cuda.get_device_name) in bf16 or
    fp32 (runtime.gpus); None for a device it does not know (the log then shows no MFU)."""
    from megatron_dynamoe.runtime.gpus import spec_for_device

    spec = spec_for_device(device_name)
    if spec is None:
        return None
    return spec.bf16_flops if bf16 else spec.fp32_flops


def step_model_flops(arch, dynamoe, seq_length: int, tokens: int,
                     ffn_fraction: Optional[float], labelled: bool, teacher: bool) -> float:
    """Model FLOPs of one training step over `tokens` tokens of `seq_length`-token samples.

    arch: the dense architecture; dynamoe: the DynaMoE config (None: a dense model);
    ffn_fraction: the mean FFN fraction the DynaMoE layers ran at (None: 1); labelled: the
    step computed difficulty labels (a full FFN per token); teacher: add a dense forward."""
    from megatron_dynamoe.models.flops import causal_mean_context, forward_flops_per_token

    context = causal_mean_context(seq_length)
    fractions, routed, outputs = None, 0, 0
    if dynamoe is not None:
        moe = [dynamoe.is_moefied(i) for i in range(arch.num_layers)]
        ran = 1.0 if labelled or ffn_fraction is None else float(ffn_fraction)
        fractions = [ran if m else 1.0 for m in moe]
        routed, outputs = sum(moe), dynamoe.num_levels
    student = forward_flops_per_token(arch, fractions, context, outputs, routed).total
    total = 3 * student
    if teacher:
        total += forward_flops_per_token(arch, None, context).total
    return total * tokens
