"""Forward-only passes of a GPTModel at any TP / PP layout, for the tools (MoEfy, evaluation).

Training runs its micro-batches through Megatron's schedules; the tools that only read a model
(calibration statistics, router labels, logits for parity, log-likelihoods) run one batch at a
time the same way: `pipeline_forward` sends a batch through every pipeline stage as one
micro-batch of Megatron's forward-only schedule (the plain forward at PP = 1), applies a
`head` to the last stage's vocabulary-parallel logits, and broadcasts the head's tensors from
the last stage to every rank of the pipeline group, so every rank returns the same result.
Forward hooks on this stage's layers see the batch as in a one-process forward.

`vocab_parallel_logprobs` turns vocabulary-parallel logits (each tensor-parallel rank holds
V / TP columns) into the log-probability of given target tokens and whether each is the
greedy choice, reducing only [b, s] statistics over the TP group: nothing gathers the full
vocabulary.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state

TensorSpec = Tuple[Tuple[int, ...], torch.dtype]  # (shape, dtype) of one head output


def pipeline_group():
    """The pipeline-parallel group when the running world has more than one stage, else
    None (no world, or PP = 1)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_pipeline_model_parallel_group()


def tensor_group():
    """The tensor-parallel group when the running world has more than one TP rank, else
    None (nothing to reduce over)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


@torch.no_grad()
def pipeline_forward(model, batch: dict,
                     head: Optional[Callable[[torch.Tensor], Sequence[torch.Tensor]]] = None,
                     out_specs: Sequence[TensorSpec] = ()) -> Tuple[torch.Tensor, ...]:
    """Run `batch` through every pipeline stage of `model` and return `head`'s tensors.

    Args:
        model: this rank's GPTModel (one pipeline stage, no virtual stages), in eval mode.
        batch: `tokens` [b, s] int64, `position_ids` [b, s], `attention_mask` [1, 1, s, s],
            on the model's device, the same on every rank.
        head: on the last stage, logits [b, s, V / TP] -> tensors shaped like `out_specs`
            (None: the forward is run for its hooks only, nothing is returned).
        out_specs: (shape, dtype) of each head output; the other stages receive them there.
    Returns:
        The head's tensors on every rank (broadcast from the last pipeline stage).
    """
    if pipeline_group() is None:
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        return tuple(head(logits)) if head is not None else ()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, stage_model):
        b = next(data_iterator)
        output = stage_model(b["tokens"], b["position_ids"], b["attention_mask"])

        def collect(output_tensor, non_loss_data=False):
            return tuple(head(output_tensor)) if head is not None else ()

        return output, collect

    tokens = batch["tokens"]
    collected = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
        collect_non_loss_data=True)
    if head is None:
        return ()
    device = tokens.device
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        outputs = [t.contiguous() for t in collected[0]]
    else:
        outputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in out_specs]
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    group = pipeline_group()
    for tensor in outputs:
        dist.broadcast(tensor, src=src, group=group)
    return tuple(outputs)


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                            dtype: torch.dtype = torch.float64
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and greedy flags from vocabulary-parallel logits.

    Args:
        logits: [..., V / TP] this tensor-parallel rank's vocabulary columns (rank r holds
            ids [r V / TP, (r + 1) V / TP), Megatron's VocabParallelEmbedding split).
        targets: [...] int64 global token ids.
        dtype: the precision of the log-softmax (float64 for continuation scores, float32
            for perplexity over long texts).
    Returns:
        (log-probabilities [...] in `dtype`, greedy [...] bool: the target's logit is the
        maximum over the whole vocabulary).
    """
    group = tensor_group()
    x = logits.to(dtype)
    width = x.shape[-1]
    start = 0 if group is None else dist.get_rank(group) * width
    local = targets - start
    owned = (local >= 0) & (local < width)
    picked = x.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(owned, picked, torch.zeros_like(picked))
    top = x.max(dim=-1).values
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(x - top.unsqueeze(-1)).sum(dim=-1)
    if group is not None:
        # Two [...] sums in one collective: the normaliser and the target's own logit.
        both = torch.stack([total, picked])
        dist.all_reduce(both, group=group)
        total, picked = both[0], both[1]
    return picked - top - torch.log(total), picked >= top


def vocab_parallel_max_abs_diff(reference: torch.Tensor, candidate: torch.Tensor
                                ) -> torch.Tensor:
    """[2] fp32 on the logits' device: (max |candidate - reference|, max |reference|) over the
    whole vocabulary of two vocabulary-parallel logit tensors [..., V / TP] of the same layout
    (a NaN difference counts as infinite, so a broken model never passes)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logit shapes differ: {tuple(candidate.shape)} vs "
                         f"{tuple(reference.shape)}")
    diff = (candidate.float() - reference.float()).abs().nan_to_num(nan=float("inf"))
    stats = torch.stack([diff.max(), reference.float().abs().max()])
    group = tensor_group()
    if group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    return stats
