"""MoEfication of one dense FFN: neuron importance, a function-preserving permutation, the
split into S equal shells, and the placement of shells on expert-parallel ranks.

Pure tensor functions on full (unsharded) weights in Megatron's layout:
- fc1 weight [F, H], or [2F, H] for a gated unit (SwiGLU): rows [0, F) are the gate half,
  rows [F, 2F) the up half (Megatron's `linear_fc1` at TP=1);
- fc2 weight [H, F].
An FFN is a sum over its F hidden neurons, FFN(x) = sum_n fc2[:, n] * act_n(x), so permuting
neurons (rows of both fc1 halves, columns of fc2 alike) leaves it unchanged, and slicing the
permuted neurons into shells makes each shell an ordinary smaller FFN whose outputs sum to
the dense output.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def ffn_hidden_activations(x: torch.Tensor, fc1_weight: torch.Tensor, activation,
                           gated: bool) -> torch.Tensor:
    """Hidden activations act_n(x) of a dense FFN.

    Args:
        x: [N, H] inputs to the FFN (after the pre-MLP norm).
        fc1_weight: [F, H], or [2F, H] when `gated` (gate rows first, then up rows).
        activation: elementwise function (e.g. F.silu, F.gelu).
        gated: whether the FFN is a gated linear unit (SwiGLU: act(gate) * up).
    Returns:
        [N, F] activations.
    """
    h = x @ fc1_weight.t()
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return activation(gate) * up
    return activation(h)


def activation_importance(activation_scale: torch.Tensor,
                          fc2_weight: torch.Tensor) -> torch.Tensor:
    """Calibration importance of each hidden neuron: scale(act_n) x ||fc2[:, n]||_2.

    With scale = E|act_n(x)| this is the expected magnitude of neuron n's contribution to the
    FFN output; with scale = sqrt(E[act_n(x)^2]) its root-mean-square (the square is the
    neuron's share of the output's energy when neurons are uncorrelated).

    Args:
        activation_scale: [F] mean |act_n(x)| or RMS act_n(x) over calibration tokens.
        fc2_weight: [H, F].
    Returns:
        [F] importance scores (float64).
    """
    if activation_scale.shape != (fc2_weight.shape[1],):
        raise ValueError(f"activation_scale has shape {tuple(activation_scale.shape)}, "
                         f"expected [{fc2_weight.shape[1]}] (one value per FFN neuron)")
    return activation_scale.double() * fc2_weight.double().norm(dim=0)


def weight_importance(fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
                      gated: bool) -> torch.Tensor:
    """Data-free importance: ||fc1 row(s) of n|| x ||fc2[:, n]|| (gate and up norms multiply
    for a gated unit), the scale of neuron n's output for a unit-norm input.

    Args:
        fc1_weight: [F, H] or [2F, H] (gated).
        fc2_weight: [H, F].
    Returns:
        [F] importance scores (float64).
    """
    ffn = fc2_weight.shape[1]
    rows = fc1_weight.double().norm(dim=1)
    if gated:
        if rows.numel() != 2 * ffn:
            raise ValueError(f"gated fc1 has {rows.numel()} rows, expected 2 x {ffn}")
        in_norm = rows[:ffn] * rows[ffn:]
    else:
        if rows.numel() != ffn:
            raise ValueError(f"fc1 has {rows.numel()} rows, expected {ffn}")
        in_norm = rows
    return in_norm * fc2_weight.double().norm(dim=0)


def output_error_order(second_moment: torch.Tensor, fc2_weight: torch.Tensor) -> torch.Tensor:
    """Neuron order whose every prefix keeps the FFN output close to the dense one.

    Dropping a set D of neurons changes the output by e_D(x) = sum_{n in D} fc2[:, n] act_n(x),
    and over calibration tokens E||e_D||^2 = sum_{i, j in D} M_ij with M = (fc2^T fc2) *
    E[act act^T] (elementwise). Per-neuron scores see only the diagonal M_nn; neurons whose
    contributions cancel (M_ij < 0) or duplicate each other (M_ij > 0) are what the pairwise
    terms add. Greedy backward elimination drops, one at a time, the neuron that raises that
    error least given those already dropped; the reverse drop order ranks the neurons, so
    every shell boundary is a prefix chosen with the correlations counted. O(F^2) work and
    memory per layer.

    Args:
        second_moment: [F, F] E[act act^T] over calibration tokens (symmetric).
        fc2_weight: [H, F].
    Returns:
        [F] int64 permutation; element 0 is the most important neuron (dropped last).
    """
    ffn = fc2_weight.shape[1]
    if second_moment.shape != (ffn, ffn):
        raise ValueError(f"second_moment has shape {tuple(second_moment.shape)}, expected "
                         f"[{ffn}, {ffn}] (E[act act^T] over the FFN's neurons)")
    w = fc2_weight.double()
    error = (w.t() @ w) * second_moment.double()  # M: [F, F]
    # cost[n] = M_nn + 2 sum_{j in D} M_nj: the error added by dropping n next.
    cost = error.diagonal().clone()
    dropped = torch.zeros(ffn, dtype=torch.bool, device=cost.device)
    order = torch.empty(ffn, dtype=torch.long, device=cost.device)
    for step in range(ffn):
        n = int(torch.argmin(cost.masked_fill(dropped, float("inf"))))
        order[ffn - 1 - step] = n
        dropped[n] = True
        cost += 2 * error[:, n]
    return order


def order_scores(order: torch.Tensor) -> torch.Tensor:
    """Scores that `importance_order` turns back into `order`: F for order[0], ..., 1 last.

    Args:
        order: [F] permutation, most important first.
    Returns:
        [F] float64 scores.
    """
    scores = torch.empty(order.numel(), dtype=torch.float64, device=order.device)
    scores[order] = torch.arange(order.numel(), 0, -1, dtype=torch.float64, device=order.device)
    return scores


def importance_order(importance: torch.Tensor) -> torch.Tensor:
    """Neuron indices by decreasing importance; ties broken by index, so deterministic.

    Args:
        importance: [F] scores.
    Returns:
        [F] int64 permutation; element 0 is the most important neuron.
    """
    # Stable sort on the negated scores keeps equal scores in index order.
    return torch.sort(-importance.double(), stable=True).indices


def permute_ffn(fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, order: torch.Tensor,
                gated: bool, fc1_bias: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Reorder an FFN's hidden neurons by `order`; the FFN's function is unchanged.

    Args:
        fc1_weight: [F, H] or [2F, H] (gated: both halves permuted alike).
        fc2_weight: [H, F].
        order: [F] permutation (e.g. from `importance_order`).
        fc1_bias: optional [F] or [2F].
    Returns:
        (fc1_weight, fc2_weight, fc1_bias) permuted.
    """
    ffn = fc2_weight.shape[1]
    if sorted(order.tolist()) != list(range(ffn)):
        raise ValueError(f"order is not a permutation of the {ffn} FFN neurons")
    rows = torch.cat([order, order + ffn]) if gated else order
    bias = fc1_bias[rows] if fc1_bias is not None else None
    return fc1_weight[rows], fc2_weight[:, order], bias


def split_into_shells(fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, num_shells: int,
                      gated: bool) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Cut an (already permuted) FFN into `num_shells` equal shells, in neuron order.

    Shell s holds neurons [s*F/S, (s+1)*F/S). For a gated unit each shell's fc1 keeps
    Megatron's layout: its gate rows, then its up rows.

    Args:
        fc1_weight: [F, H] or [2F, H].
        fc2_weight: [H, F].
    Returns:
        S pairs (fc1 [F/S, H] or [2F/S, H], fc2 [H, F/S]).
    """
    ffn = fc2_weight.shape[1]
    if ffn % num_shells:
        raise ValueError(f"FFN hidden size {ffn} is not divisible into {num_shells} shells: "
                         f"choose a number of shells that divides {ffn}")
    size = ffn // num_shells
    shells = []
    for s in range(num_shells):
        cols = slice(s * size, (s + 1) * size)
        if gated:
            fc1 = torch.cat([fc1_weight[cols], fc1_weight[ffn + s * size: ffn + (s + 1) * size]])
        else:
            fc1 = fc1_weight[cols]
        shells.append((fc1.clone(), fc2_weight[:, cols].clone()))
    return shells


def shell_placement(num_shells: int, ep_size: int, strategy: str = "balanced") -> List[int]:
    """Logical shell held by each physical expert slot (Megatron's expert index).

    Megatron puts experts [r*L, (r+1)*L) on EP rank r (L = S / EP). Shell s is reached by every
    token whose level includes it, so lower shells carry more tokens. 'balanced' deals shells
    to ranks in a serpentine (0,1,..,EP-1,EP-1,..,0,...) so every rank gets a mix of heavy and
    light shells; with decreasing loads this evens each rank's expected total. 'contiguous' is
    the identity.

    Returns:
        list p -> logical shell held at physical slot p (a permutation of range(S)).
    """
    if num_shells % ep_size:
        raise ValueError(f"{num_shells} shells cannot be placed on {ep_size} expert-parallel "
                         f"ranks: the EP size must divide the number of shells")
    if strategy == "contiguous" or ep_size == 1:
        return list(range(num_shells))
    if strategy != "balanced":
        raise ValueError(f"unknown shell placement {strategy!r}: use 'balanced' or 'contiguous'")
    per_rank: List[List[int]] = [[] for _ in range(ep_size)]
    for s in range(num_shells):
        round_, pos = divmod(s, ep_size)
        rank = pos if round_ % 2 == 0 else ep_size - 1 - pos
        per_rank[rank].append(s)
    return [s for rank_shells in per_rank for s in rank_shells]
