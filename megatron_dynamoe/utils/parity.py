"""Numeric parity of two models' logits, and the inputs that produce them: every conversion
ends with `check_parity` (a failure is a ParityError, exit code 3)."""

from __future__ import annotations

from typing import Iterator

import torch

from megatron_dynamoe.utils.errors import ToolError
from megatron_dynamoe.utils.log import log


class ParityError(ToolError):
    """A numeric parity check failed: exit code 3."""


def relative_logit_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |candidate - reference| / max |reference| (shapes must match), computed in fp32 on
    the host: the reference may come from another device (an HF model on the CPU)."""
    if reference.shape != candidate.shape:
        raise ParityError(f"logit shapes differ: {tuple(candidate.shape)} vs "
                          f"{tuple(reference.shape)}")
    reference, candidate = reference.float().cpu(), candidate.float().cpu()
    return ((candidate - reference).abs().max()
            / reference.abs().max().clamp_min(1e-12)).item()


def check_parity(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float,
                 what: str) -> float:
    """Raise ParityError unless relative_logit_error <= tolerance; return the error."""
    return check_error(relative_logit_error(reference, candidate), tolerance, what)


def check_error(error: float, tolerance: float, what: str) -> float:
    """Log a relative logit error; raise ParityError unless it is <= tolerance (NaN fails)."""
    log(f"parity ({what}): max |logit diff| / max |logit| = {error:.2e} "
        f"(tolerance {tolerance:.0e})")
    if not error <= tolerance:  # also catches NaN
        raise ParityError(f"{what}: relative logit error {error:.2e} > {tolerance:.0e}")
    return error


def model_batches(tokens: torch.Tensor, batch_size: int) -> Iterator[dict]:
    """Batches (tokens, position_ids, causal attention_mask) for GPTModel.forward, on the
    models' device (`runtime.device.place_batch`)."""
    from megatron_dynamoe.models.builder import causal_attention_mask
    from megatron_dynamoe.runtime.device import model_device, place_batch

    seq_length = tokens.shape[1]
    device = model_device()
    mask = causal_attention_mask(seq_length, device=device)
    positions = torch.arange(seq_length, device=device)
    for start in range(0, tokens.shape[0], batch_size):
        chunk = place_batch(dict(tokens=tokens[start:start + batch_size]))["tokens"]
        yield dict(tokens=chunk, position_ids=positions.expand_as(chunk), attention_mask=mask)


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """[n, s, V] logits of a (TP=1, PP=1) GPTModel in eval mode, on the host (one copy per
    batch; tools compare them with host references)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(b["tokens"], b["position_ids"], b["attention_mask"]).cpu()
                          for b in model_batches(tokens, batch_size)])
    finally:
        model.train(was_training)


@torch.no_grad()
def layout_logit_error(reference_model, candidate_model, tokens: torch.Tensor,
                       batch_size: int = 4) -> float:
    """`relative_logit_error` of two GPTModels built at the same layout (any TP / PP), on
    `tokens` [n, s]: max |candidate - reference| / max |reference| over every batch and the
    whole vocabulary, without gathering it; every rank returns the same number."""
    from megatron_dynamoe.runtime.forward_only import (
        pipeline_forward,
        vocab_parallel_max_abs_diff,
    )

    states = [(m, m.training) for m in (reference_model, candidate_model)]
    diff, scale = 0.0, 0.0
    try:
        for model, _ in states:
            model.eval()
        for b in model_batches(tokens, batch_size):
            kept = []
            pipeline_forward(reference_model, b, head=lambda logits: kept.append(logits) or ())
            (stats,) = pipeline_forward(
                candidate_model, b, head=lambda logits: (vocab_parallel_max_abs_diff(
                    kept.pop(), logits),), out_specs=[((2,), torch.float32)])
            batch_diff, batch_scale = stats.tolist()  # one host read per batch
            diff, scale = max(diff, batch_diff), max(scale, batch_scale)
    finally:
        for model, training in states:
            model.train(training)
    return diff / max(scale, 1e-12)
