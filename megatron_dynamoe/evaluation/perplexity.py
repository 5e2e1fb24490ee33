"""Held-out perplexity of a GPTModel on fixed token windows.

Every window is scored on its own (no context carried between windows): position p predicts
token p + 1, so a window of s tokens contributes s - 1 predictions. Perplexity is
exp(total negative log-likelihood / predictions); per-token losses are summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """Perplexity of `model` (TP = PP = 1 GPTModel) on `windows` [n, s] int64.

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
            logits = model(b["tokens"], b["position_ids"], b["attention_mask"])
            # Per-token losses in fp32 (a float64 copy of the logits would double the memory
            # traffic), summed in float64.
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                  b["tokens"][:, 1:].reshape(-1), reduction="none")
            total += float(nll.double().sum())  # one host copy per batch
            count += b["tokens"][:, 1:].numel()
            if recorder is not None:
                recorder.commit(torch.ones_like(b["tokens"], dtype=torch.bool))
            if progress is not None:
                progress(b["tokens"].shape[0])
    finally:
        model.train(was_training)
    return PerplexityResult(total, count)
