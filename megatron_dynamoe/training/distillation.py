"""Distillation from the frozen dense model: vocab-parallel KL and the teacher's forward pass.

MoEfying changes nothing at theta = 1, but training at lower sensitivities moves the shared
weights away from the dense model. Distilling from the frozen dense model (the checkpoint the
DynaMoE model was made from) keeps every sensitivity close to the dense model's predictive
distribution, not only to the data's next token:

    loss = (1 - w) * LM loss + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

per token, masked like the LM loss (Hinton et al.'s T^2 keeps gradient scales comparable
across temperatures).

Logits are vocabulary-parallel (each tensor-parallel rank holds V / TP columns), so the
softmax normalisers are reduced over the TP group; nothing gathers the full vocabulary. The
teacher runs as its own forward-only pipeline schedule over the iteration's micro-batches
before the student's forward/backward schedule, so it works at any PP / VPP layout without
changing the tensors the student's pipeline sends; its logits wait on the last pipeline stage
(one [b, s, V/TP] tensor per micro-batch, in the teacher's parameter dtype).
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, group=None) -> torch.Tensor:
    """Per-token KL(p_teacher || p_student) at `temperature` from vocab-parallel logits.

    student_logits, teacher_logits: [..., V / TP] (this rank's vocabulary columns; the same
    columns on both). Returns [...] in fp32, differentiable w.r.t. `student_logits` only.
    `group`: the tensor-parallel group (None or size 1: the full vocabulary is local).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the teacher must have the "
                         f"student's vocabulary and tensor-parallel layout")
    parallel = group is not None and dist.get_world_size(group) > 1
    s = student_logits.float() / temperature
    with torch.no_grad():
        t = teacher_logits.float() / temperature
        t_max = t.max(dim=-1, keepdim=True).values
        s_max = s.detach().max(dim=-1, keepdim=True).values
        if parallel:
            dist.all_reduce(t_max, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(s_max, op=dist.ReduceOp.MAX, group=group)
        t_exp = torch.exp(t - t_max)
        t_sum = t_exp.sum(dim=-1, keepdim=True)
        if parallel:
            dist.all_reduce(t_sum, group=group)
        p_t = t_exp / t_sum
        log_p_t = t - t_max - torch.log(t_sum)
    # KL = sum_v p_t (log p_t - s_v + s_max) + log S with S = sum_v exp(s_v - s_max), using
    # sum_v p_t = 1. Both terms are TP sums whose result every rank then uses identically,
    # which is what makes an identity backward of the sums correct.
    cross = (p_t * (log_p_t - (s - s_max))).sum(dim=-1)
    s_sum = torch.exp(s - s_max).sum(dim=-1)
    if parallel:
        cross = _all_reduce_sum_identity_backward(cross, group)
        s_sum = _all_reduce_sum_identity_backward(s_sum, group)
    return cross + torch.log(s_sum)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group forward, identity backward: every rank computes the same loss
    from the reduced value, so each rank's share of the gradient is the incoming one
    (Megatron's `reduce_from_tensor_model_parallel_region`, for an explicit group)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_reduce_sum_identity_backward(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def distillation_loss(per_token_lm_loss: torch.Tensor, student_logits: torch.Tensor,
                      teacher_logits: torch.Tensor, loss_mask: torch.Tensor, *, weight: float,
                      temperature: float, group=None):
    """(loss, report) of one micro-batch: the masked mean of (1 - w) * LM + w * T^2 * KL.

    per_token_lm_loss [b, s]; student_logits / teacher_logits [b, s, V / TP]; loss_mask
    [b, s]. The report holds detached 'lm loss' and 'distill kl' (masked means).
    """
    kl = vocab_parallel_kl(student_logits, teacher_logits, temperature, group)
    mask = loss_mask.float()
    count = mask.sum().clamp_min(1.0)
    lm = (per_token_lm_loss.float() * mask).sum() / count
    kl_mean = (kl * mask).sum() / count
    loss = (1.0 - weight) * lm + weight * temperature ** 2 * kl_mean
    return loss, {"lm loss": lm.detach().clone(), "distill kl": kl_mean.detach().clone()}


class FrozenTeacher:
    """The frozen dense model, built at the student's layout, that supplies logits.

    `chunks` is a `ModelChunks` of the dense model (loaded, eval mode, no gradients).
    `logits_for(batches, ...)` runs Megatron's forward-only schedule over one iteration's
    micro-batches and returns their logits on the last pipeline stage ([] elsewhere).
    """

    def __init__(self, chunks):
        self.chunks = chunks
        for p in chunks.parameters():
            p.requires_grad_(False)
        chunks.eval()

    @torch.no_grad()
    def logits_for(self, make_iterators, num_microbatches: int, seq_length: int,
                   micro_batch_size: int) -> List[torch.Tensor]:
        """Teacher logits [b, s, V / TP] per micro-batch, in order (last stage only).

        `make_iterators()` returns one fresh micro-batch iterator per model chunk, over the
        same micro-batches the student will see.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

            def keep(output_tensor, non_loss_data=False):
                return output_tensor

            return output, keep

        iterators = make_iterators()
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators if len(iterators) > 1
            else iterators[0], model=list(self.chunks), num_microbatches=num_microbatches,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True,
            collect_non_loss_data=True)
        return list(out)
