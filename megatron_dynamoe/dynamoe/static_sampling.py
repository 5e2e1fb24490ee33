"""Static-sampled training, the Flextron-style baseline: every token of an iteration runs at
ONE nested level, drawn per iteration so that the expected FFN compute meets a target.

Pure functions of plain Python numbers. K levels, 1-based, with FFN fractions
f_1 < ... < f_K = 1 (`DynaMoEConfig.level_fractions`: level e computes f_e of the FFN).

- `max_entropy_level_probs`: the level distribution, the most even one (maximum entropy)
  whose mean FFN fraction is the target: p_e proportional to exp(lam * f_e).
- `uniform_router_fraction`: the default target, the FFN fraction a learned run spends over
  its sensitivity range while its router is untrained (uniform levels).
- `static_level`: the level of an iteration, by stratified sampling in blocks of `STRATUM`
  iterations, so that every block spends the target within (1 - f_1) / STRATUM.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch

# Iterations per stratified block: each block of 50 spends the target FFN compute within
# (1 - f_1) / 50 <= 0.02, so even a short run or one logged window follows the target.
STRATUM = 50


def expected_fraction(level_fractions: Sequence[float], probs: Sequence[float]) -> float:
    """Mean FFN fraction sum_e p_e f_e of a level distribution.

    Args:
        level_fractions: [K] FFN fraction of each level, increasing, ending at 1.
        probs: [K] probability of each level (sums to 1).
    Returns:
        The expected fraction of the FFN a token computes, in [f_1, 1].
    """
    return float(sum(p * f for p, f in zip(probs, level_fractions)))


def max_entropy_level_probs(level_fractions: Sequence[float], target: float) -> List[float]:
    """The maximum-entropy distribution over the K levels whose mean FFN fraction is `target`.

    It is p_e proportional to exp(lam * f_e), lam found by bisection: uniform when the target
    is the mean of the fractions, tilted towards the wide (or narrow) levels otherwise, and
    every level keeps some probability unless the target is an end point (f_1: all level 1;
    1: all level K). So a static baseline trains every width it will be evaluated at.

    Args:
        level_fractions: [K] FFN fraction of each level, strictly increasing, ending at 1.
        target: the mean fraction wanted, in [f_1, 1].
    Returns:
        [K] probabilities (floats summing to 1).
    Raises:
        ValueError: the target lies outside [f_1, 1].
    """
    f = [float(x) for x in level_fractions]
    low, high = f[0], f[-1]
    if not low - 1e-12 <= target <= high + 1e-12:
        raise ValueError(f"target FFN fraction {target} outside [{low}, {high}]")
    if len(f) == 1 or target >= high - 1e-12:
        return [0.0] * (len(f) - 1) + [1.0]
    if target <= low + 1e-12:
        return [1.0] + [0.0] * (len(f) - 1)

    def probs(lam: float) -> List[float]:
        top = max(lam * x for x in f)  # shift the exponents: no overflow at large |lam|
        w = [math.exp(lam * x - top) for x in f]
        total = sum(w)
        return [x / total for x in w]

    # The mean rises monotonically with lam; fractions differ by >= 1/num_shells, so
    # |lam| <= 1e5 reaches any target that is not an end point to double precision.
    lo, hi = -1e5, 1e5
    for _ in range(200):
        mid = (lo + hi) / 2
        if expected_fraction(f, probs(mid)) < target:
            lo = mid
        else:
            hi = mid
    return probs((lo + hi) / 2)


def uniform_router_fraction(level_fractions: Sequence[float], theta_min: float,
                            theta_max: float) -> float:
    """The mean FFN fraction of a learned run with an untrained router, over its theta range.

    A zero router predicts uniform levels, q_e = e / K, so theta picks level
    max(1, ceil(theta K)): thetas map linearly onto the levels. This is the expected f_e for
    theta uniform in [theta_min, theta_max] (the learned run's draws); for the default range
    [0, 1] it is the mean of the level fractions.

    Args:
        level_fractions: [K] FFN fraction of each level, increasing, ending at 1.
        theta_min, theta_max: the sensitivity range, 0 <= theta_min <= theta_max <= 1.
    Returns:
        The expected FFN fraction, in [f_1, 1].
    """
    f = [float(x) for x in level_fractions]
    k = len(f)
    if theta_max - theta_min <= 1e-12:
        # One theta: its level (1e-9 absorbs round-off in theta * K at a level boundary).
        return f[min(k, max(1, math.ceil(theta_min * k - 1e-9))) - 1]
    # Level e holds thetas in ((e - 1) / K, e / K]; weight each by its share of the range.
    total = 0.0
    for e, fraction in enumerate(f, start=1):
        overlap = min(theta_max, e / k) - max(theta_min, (e - 1) / k)
        total += fraction * max(0.0, overlap)
    return total / (theta_max - theta_min)


def level_of(probs: Sequence[float], u: float) -> int:
    """Inverse CDF: the level (1..K) of a uniform number `u` in [0, 1).

    Args:
        probs: [K] level probabilities.
        u: a number in [0, 1).
    Returns:
        The smallest level e with u < p_1 + ... + p_e (level K when round-off leaves the sum
        below 1); a level of probability 0 is never returned.
    """
    cumulative = 0.0
    for e, p in enumerate(probs, start=1):
        cumulative += p
        if p > 0 and u < cumulative:
            return e
    return max(e for e, p in enumerate(probs, start=1) if p > 0)


def static_level(probs: Sequence[float], seed: int, iteration: int,
                 stratum: int = STRATUM) -> int:
    """The level of `iteration` (0-based) in a static-sampled run: a pure function of the
    seed and the iteration, so every rank and a resumed run draw the same.

    Stratified sampling: iterations form blocks of `stratum`; block b draws a random offset
    o and a random permutation pi (a generator seeded by seed and b), and its j-th iteration
    gets level `level_of(probs, (pi[j] + o) / stratum)`. A whole block thus holds each
    level's share of the block to within one iteration (its mean FFN fraction is within
    (1 - f_1) / stratum of the target), in random order, and is unbiased over blocks.

    Args:
        probs: [K] level probabilities (`max_entropy_level_probs`).
        seed: the run's --seed.
        iteration: the 0-based training iteration.
        stratum: iterations per block.
    Returns:
        A level in 1..K.
    """
    block, index = divmod(int(iteration), stratum)
    g = torch.Generator().manual_seed(seed * 1_000_003 + block)
    order = torch.randperm(stratum, generator=g)
    offset = torch.rand((), generator=g, dtype=torch.float64).item()
    return level_of(probs, (int(order[index]) + offset) / stratum)
