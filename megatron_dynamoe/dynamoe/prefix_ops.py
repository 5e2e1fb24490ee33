"""Prefix views and prefix sums with one buffer in the backward (level-sorted experts).

With tokens sorted by level, highest first, each shell reads a prefix of the tokens and adds
its output into a prefix of the layer output. Written with slicing, autograd gives every
shell's input slice a full-size zero gradient (a fill, a copy and an accumulation per shell)
and every in-place prefix add a full-size clone: three passes over the whole token tensor
per shell. These two functions do the same forward and write the backward once into one
buffer, so the extra work is one pass plus the prefixes themselves.

Shapes: T tokens, H hidden size; `sizes[j]` <= T is shell j's prefix length.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


class _PrefixViews(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, sizes: Tuple[int, ...]):
        ctx.sizes, ctx.shape = sizes, tokens.shape
        return tuple(tokens[:n] for n in sizes)

    @staticmethod
    def backward(ctx, *grads):
        grad = None
        for n, g in zip(ctx.sizes, grads):
            if g is None:
                continue
            if grad is None:
                grad = g.new_zeros(ctx.shape)
            grad[:n] += g
        return grad, None


class _PrefixSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, total: int, *parts: torch.Tensor):
        ctx.sizes = tuple(p.shape[0] for p in parts)
        out = parts[0].new_zeros((total, *parts[0].shape[1:]))
        for p in parts:
            out[:p.shape[0]] += p
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *(grad[:n] for n in ctx.sizes))


def prefix_views(tokens: torch.Tensor, sizes: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """[T, H] -> one [sizes[j], H] view of the first rows per entry; the backward sums the
    views' gradients into one [T, H] buffer."""
    return _PrefixViews.apply(tokens, tuple(int(n) for n in sizes))


def prefix_sum(total: int, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, H] with parts[j] ([n_j, H], n_j <= T) added into its first n_j rows (zeros where
    no part reaches); the backward hands each part the matching rows of the gradient."""
    return _PrefixSum.apply(int(total), *parts)
