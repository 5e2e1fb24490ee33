"""Held-out perplexity of a GPTModel on fixed token windows.

Every window is scored on its own (no context carried between windows): position p predicts
token p + 1, so a window of s tokens contributes s - 1 predictions. Perplexity is
exp(total negative log-likelihood / predictions); per-token losses are summed in float64.
At any TP / PP layout: batches go through Megatron's forward-only schedule and the losses
come from the vocabulary-parallel logits (`runtime.forward_only`); every rank returns the
same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_dynamoe.runtime.forward_only import pipeline_forward, vocab_parallel_logprobs


@dataclass(frozen=True)
class PerplexityResult:
    """Summed negative log-likelihood (nats), number of predicted tokens, perplexity."""

    nll: float
    tokens: int

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood per predicted token)."""
        return math.exp(self.nll / self.tokens)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, recorder=None,
               progress=None) -> PerplexityResult:
    """Perplexity of `model` (this rank's GPTModel, any TP / PP) on `windows` [n, s] int64.

    `recorder` (an installed `FFNComputeRecorder`) is given every window's tokens as valid;
    `progress(n)` is told how many windows each batch finished.
    """
    from megatron_dynamoe.utils.parity import model_batches

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, s >= 2], got {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in model_batches(windows, batch_size):
            targets = b["tokens"][:, 1:]

            def batch_nll(logits, targets=targets):
                # Per-token log-probabilities in fp32 (a float64 copy of the logits would
                # double the memory traffic), summed in float64.
                logprobs, _ = vocab_parallel_logprobs(logits[:, :-1], targets, torch.float32)
                return (-logprobs.double().sum()).reshape(1),

            (nll,) = pipeline_forward(model, b, batch_nll, [((1,), torch.float64)])
            total += float(nll)  # one host copy per batch
            count += b["tokens"][:, 1:].numel()
            if recorder is not None:
                recorder.commit(torch.ones_like(b["tokens"], dtype=torch.bool))
            if progress is not None:
                progress(b["tokens"].shape[0])
    finally:
        model.train(was_training)
    return PerplexityResult(total, count)
