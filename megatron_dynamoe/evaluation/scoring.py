"""Batched log-likelihood of continuations given contexts, on a Megatron-Core GPTModel.

A request is (context, continuation). Tokenisation follows lm-eval-harness
(`_encode_pair`): trailing spaces of the context move to the continuation, the pair is
tokenised as one string and the continuation's tokens are what follows the context's own
tokens. The model reads `(context + continuation)[:-1]`, truncated on the left to
`max_length`, and the continuation's log-likelihood is the sum of
`log softmax(logits[p - 1])[token p]` over its positions p (computed in float64); it is greedy
when every such token is also the argmax.

Speed on CPU: requests are sorted by length (longest first) and packed into right-padded
batches of at most `tokens_per_batch` tokens (padding included). Right padding is exact: the
causal mask keeps real tokens from seeing the padding after them, and padding positions are
never scored (nor counted by an `FFNComputeRecorder`).

At any TP / PP layout: batches go through Megatron's forward-only schedule, the scores come
from the vocabulary-parallel logits (`runtime.forward_only.vocab_parallel_logprobs`, nothing
gathers the vocabulary) and every rank returns the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_dynamoe.runtime.forward_only import pipeline_forward, vocab_parallel_logprobs

Encoded = Tuple[List[int], List[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of a continuation, whether it is the greedy one, and its length."""

    loglik: float
    greedy: bool
    num_tokens: int


def encode_request(tokenizer, context: str, continuation: str) -> Encoded:
    """lm-eval-harness's pair encoding (no special tokens); the continuation gets >= 1 token."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    # A merge across the boundary can make the pair shorter than the context alone: keep at
    # least one continuation token so that every request is scored.
    split = min(len(context_ids), len(whole) - 1)
    return list(whole[:split]), list(whole[split:])


def continuation_logprobs(logits: torch.Tensor, targets: torch.Tensor, ends: torch.Tensor,
                          lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities and greedy flag of each row's continuation.

    Args:
        logits: [b, s, V / TP] next-token logits (position p predicts token p + 1), this
            tensor-parallel rank's vocabulary columns (all of them at TP = 1).
        targets: [b, s] int64, targets[r, p] = the token that position p should predict.
        ends: [b] int64, number of real (unpadded) positions of each row.
        lengths: [b] int64, continuation tokens of each row: positions ends - lengths .. ends - 1.
    Returns:
        ([b] float64 log-likelihoods, [b] float64 count of continuation tokens that are not
        the greedy choice: 0 means the continuation is the greedy one).
    """
    rows, positions = [], []
    for r, (end, length) in enumerate(zip(ends.tolist(), lengths.tolist())):
        rows.extend([r] * length)
        positions.extend(range(end - length, end))
    device = logits.device
    rows_t = torch.tensor(rows, device=device)
    positions_t = torch.tensor(positions, device=device)
    picked = logits[rows_t, positions_t]                              # [n, V / TP]
    wanted = targets.to(device)[rows_t, positions_t]                  # [n]
    token_lp, hit = vocab_parallel_logprobs(picked, wanted, torch.float64)
    batch = logits.shape[0]
    loglik = torch.zeros(batch, dtype=torch.float64, device=device).index_add_(0, rows_t,
                                                                              token_lp)
    misses = torch.zeros(batch, dtype=torch.float64, device=device).index_add_(
        0, rows_t, (~hit).double())
    return loglik, misses


def pack_batches(lengths: Sequence[int], tokens_per_batch: int) -> Iterator[List[int]]:
    """Indices grouped into batches: longest first, each batch at most `tokens_per_batch`
    tokens once padded to its longest row (a row longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: List[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) + 1) * width > tokens_per_batch:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def score_requests(model, requests: Sequence[Encoded], *, max_length: int,
                   tokens_per_batch: int = 2048, recorder=None, pad_id: int = 0,
                   progress=None) -> List[ContinuationScore]:
    """Score encoded requests with `model` (this rank's GPTModel at any TP / PP, put in
    eval mode; every rank passes the same requests).

    Args:
        requests: (context ids, continuation ids) pairs; contexts must be non-empty,
            continuations non-empty and at most `max_length` tokens.
        max_length: model input length limit; longer inputs lose their oldest tokens.
        recorder: optional `FFNComputeRecorder` installed on `model`; each batch's valid
            tokens are committed to it.
        progress: optional callable(n) told how many requests each batch finished.
    Returns:
        One ContinuationScore per request, in the input order.
    """
    from megatron_dynamoe.models.builder import causal_attention_mask
    from megatron_dynamoe.runtime.device import place_batch

    sequences, cont_lengths = [], []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a request has an empty continuation")
        if not context:
            # Its first token would be "predicted" from the last position (index -1 wraps).
            raise ValueError("a request has an empty context: start it with the BOS / EOS "
                             "token, as lm-eval's Hugging Face model does")
        if len(continuation) > max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds "
                             f"--seq-length {max_length}")
        sequences.append((context + continuation)[-(max_length + 1):])
        cont_lengths.append(len(continuation))
    was_training = model.training
    model.eval()
    results: List[Optional[ContinuationScore]] = [None] * len(requests)
    try:
        for batch in pack_batches([len(s) - 1 for s in sequences], tokens_per_batch):
            width = len(sequences[batch[0]]) - 1
            tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
            targets = torch.full((len(batch), width), pad_id, dtype=torch.long)
            ends = torch.tensor([len(sequences[i]) - 1 for i in batch])
            for row, i in enumerate(batch):
                seq = torch.tensor(sequences[i])
                tokens[row, :len(seq) - 1] = seq[:-1]
                targets[row, :len(seq) - 1] = seq[1:]
            # Built on the host, moved to the model's device in one place.
            b = place_batch(dict(tokens=tokens, positions=torch.arange(width).expand(
                len(batch), width), mask=causal_attention_mask(width),
                valid=torch.arange(width).unsqueeze(0) < ends.unsqueeze(1)))
            lengths = torch.tensor([cont_lengths[i] for i in batch])
            loglik, misses = pipeline_forward(
                model, dict(tokens=b["tokens"], position_ids=b["positions"],
                            attention_mask=b["mask"]),
                lambda logits: continuation_logprobs(logits, targets, ends, lengths),
                [((len(batch),), torch.float64)] * 2)
            greedy = misses == 0
            if recorder is not None:
                recorder.commit(b["valid"])
            # One device-to-host copy per batch.
            for row, (ll, hit) in enumerate(zip(loglik.tolist(), greedy.tolist())):
                i = batch[row]
                results[i] = ContinuationScore(ll, hit, cont_lengths[i])
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return results
