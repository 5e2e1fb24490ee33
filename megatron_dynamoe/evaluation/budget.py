"""Budget solver: a target mean FFN compute fraction -> the sensitivity that meets it.

The mean FFN compute fraction of a model is the mean over decoder layers of the fraction of
FFN neurons its tokens use (layers have equal FFNs, so it is FFN FLOPs spent / dense FFN
FLOPs), measured on calibration text. Routing semantics (dynamoe/routing.py): a token's level
is the smallest e with q_e >= theta, so for fixed router inputs a token's level, hence the
fraction, is non-decreasing in theta; theta = 0 puts every token at level 1 and theta = 1 at
level K. Through the network the inputs of later layers move with theta too, so the solver
measures real forwards and never trusts a prediction it has not measured.

- global: one theta for every layer. Safeguarded bisection on theta: each forward measures
  the fraction and records every token's cumulative level probabilities q; the next theta is
  the one that would hit the target if those q did not move (exact on the recorded q, found by
  bisection offline), accepted when it lies inside the current bracket, else the bracket's
  midpoint. It usually converges in 2-4 forwards, and never slower than plain bisection.
  A target inside a jump of the (step) function is met as closely as the jump allows.
- per layer: one theta per DynaMoE layer, each layer spending the same fraction (dense layers
  count as 1, so DynaMoE layers aim at the fraction that makes the model's mean hit the
  target). Fixed-point iteration: every layer's theta is re-solved on its recorded q, then
  measured again, until every layer is within tolerance (or the forwards run out; the best
  measured solution is returned).

At any TP / PP layout every rank runs the same solver on the same numbers: the recorder
gathers every layer's fractions and q over the pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_dynamoe.dynamoe import routing
from megatron_dynamoe.dynamoe.control import set_layer_sensitivities
from megatron_dynamoe.evaluation.recorder import FFNComputeRecorder, model_layer_info
from megatron_dynamoe.runtime.forward_only import pipeline_forward

BUDGET_MODES = ("global", "per-layer")
# Thetas closer than this spend the same compute on any realistic calibration set; a bracket
# this narrow means the target sits in a jump (e.g. an untrained router: uniform levels).
THETA_RESOLUTION = 1e-4


@dataclass
class BudgetSolution:
    """What the solver found: the sensitivities (one per DynaMoE layer, all equal in global
    mode), the fraction measured with them on the calibration text, per layer too."""

    target: float
    mode: str
    sensitivities: List[float]
    achieved: float
    layer_fractions: List[float]
    forwards: int
    history: List[Tuple[float, float]] = field(default_factory=list)  # (theta, fraction)

    @property
    def theta(self) -> float:
        """The global theta (global mode), or the mean of the per-layer thetas."""
        return sum(self.sensitivities) / len(self.sensitivities)

    def to_dict(self) -> dict:
        """JSON-able record."""
        return dict(target=self.target, mode=self.mode, theta=self.theta,
                    sensitivities=self.sensitivities, achieved=self.achieved,
                    layer_fractions=self.layer_fractions, forwards=self.forwards)


def fraction_at(q: torch.Tensor, level_fractions: torch.Tensor, theta: float) -> float:
    """Mean FFN fraction of tokens with cumulative level probabilities q [T, K] at theta."""
    levels = routing.levels_at_sensitivity(q, theta)
    return float(level_fractions.to(levels.device)[levels - 1].double().mean())


def theta_for_target(qs: Sequence[torch.Tensor], level_fractions: Sequence[torch.Tensor],
                     target: float, lo: float = 0.0, hi: float = 1.0,
                     steps: int = 40) -> float:
    """theta in [lo, hi] whose mean fraction over the given layers' recorded q equals
    `target` (bisection on the monotone step function; the crossing to 2^-steps)."""
    def mean_fraction(theta: float) -> float:
        return sum(fraction_at(q, f, theta) for q, f in zip(qs, level_fractions)) / len(qs)

    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if mean_fraction(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def measure(model, windows: torch.Tensor, batch_size: int = 4
            ) -> Tuple[List[float], List[Optional[torch.Tensor]]]:
    """Per-decoder-layer FFN fractions on `windows` [n, s] at the model's current settings,
    and each DynaMoE layer's recorded q [n * s, K] (None for other layers)."""
    from megatron_dynamoe.utils.parity import model_batches

    was_training = model.training
    model.eval()
    try:
        with FFNComputeRecorder(model, keep_router_probs=True) as recorder, torch.no_grad():
            chunks: List[List[torch.Tensor]] = [[] for _ in recorder.layer_info]
            for b in model_batches(windows, batch_size):
                pipeline_forward(model, b)
                recorder.commit(torch.ones_like(b["tokens"], dtype=torch.bool))
                for i, q in enumerate(recorder.last_q):
                    if q is not None:
                        chunks[i].append(q.reshape(-1, q.shape[-1]))
            qs = [torch.cat(c) if c else None for c in chunks]
            return recorder.layer_fractions(), qs
    finally:
        model.train(was_training)


def _dynamoe_targets(model, target: float):
    """(DynaMoE layer indices among decoder layers, their level fractions, the per-DynaMoE-
    layer target that makes the model mean hit `target`); ValueError when unreachable."""
    info = model_layer_info(model)
    moe = [i for i, layer in enumerate(info) if layer.kind == "dynamoe"]
    if not moe:
        raise ValueError("the model has no DynaMoE layer: an FFN budget needs a DynaMoE "
                         "checkpoint")
    from megatron_dynamoe.runtime.device import model_device

    fractions = [torch.tensor(info[i].level_fractions, dtype=torch.float64,
                              device=model_device()) for i in moe]
    total, dense = len(info), len(info) - len(moe)
    lowest = (dense + sum(float(f[0]) for f in fractions)) / total
    if not lowest - 1e-9 <= target <= 1.0:
        raise ValueError(f"--ffn-budget {target} is out of reach: this model spends between "
                         f"{lowest:.3f} (every token at level 1) and 1.0 of its FFN")
    return moe, fractions, (target * total - dense) / len(moe)


def solve_global(model, windows: torch.Tensor, target: float, *, tolerance: float = 0.005,
                 max_forwards: int = 10, batch_size: int = 4) -> BudgetSolution:
    """One theta for all layers whose measured mean FFN fraction on `windows` is within
    `tolerance` of `target` (see the module docstring). Leaves the model at that theta."""
    moe, level_fractions, _ = _dynamoe_targets(model, target)
    count = len(moe)
    lo, hi = 0.0, 1.0
    theta = min(max(target, 0.0), 1.0)  # exact for an untrained (uniform) router
    best: Optional[BudgetSolution] = None
    history = []
    for forward in range(1, max_forwards + 1):
        set_layer_sensitivities(model, [theta] * count)
        layer_fractions, qs = measure(model, windows, batch_size)
        achieved = sum(layer_fractions) / len(layer_fractions)
        history.append((theta, achieved))
        if best is None or abs(achieved - target) < abs(best.achieved - target):
            best = BudgetSolution(target, "global", [theta] * count, achieved,
                                  layer_fractions, forward)
        if abs(achieved - target) <= tolerance or _at_end(theta, achieved, target):
            break
        if achieved < target:
            lo = theta
        else:
            hi = theta
        if hi - lo < THETA_RESOLUTION:
            break  # the target falls in a jump of the step function: nothing hits it closer
        # Prediction on the recorded q (dense layers do not move, so hitting the DynaMoE
        # layers' share of the target is the same as hitting the target).
        dense = len(layer_fractions) - count
        moe_target = (target * len(layer_fractions) - dense) / count
        proposal = theta_for_target([qs[i] for i in moe], level_fractions, moe_target, lo, hi)
        theta = proposal if lo < proposal < hi else 0.5 * (lo + hi)
    best.forwards, best.history = len(history), history
    set_layer_sensitivities(model, best.sensitivities)
    return best


def _at_end(theta: float, achieved: float, target: float) -> bool:
    """At theta = 0 (1) nothing spends less (more): stop when the target lies beyond."""
    return (theta == 0.0 and achieved >= target) or (theta == 1.0 and achieved <= target)


def solve_per_layer(model, windows: torch.Tensor, target: float, *, tolerance: float = 0.005,
                    max_forwards: int = 8, batch_size: int = 4) -> BudgetSolution:
    """One theta per DynaMoE layer, each layer spending the same fraction, so that the model's
    mean FFN fraction on `windows` meets `target` (see the module docstring). Converged when
    every DynaMoE layer is within `tolerance` of its share. Leaves the model at the solution."""
    moe, level_fractions, layer_target = _dynamoe_targets(model, target)
    thetas = [min(max(layer_target, 0.0), 1.0)] * len(moe)
    best: Optional[BudgetSolution] = None
    best_error = float("inf")
    history = []
    for forward in range(1, max_forwards + 1):
        set_layer_sensitivities(model, thetas)
        layer_fractions, qs = measure(model, windows, batch_size)
        achieved = sum(layer_fractions) / len(layer_fractions)
        history.append((sum(thetas) / len(thetas), achieved))
        error = max(abs(layer_fractions[i] - layer_target) for i in moe)
        if error < best_error:
            best_error = error
            best = BudgetSolution(target, "per-layer", list(thetas), achieved,
                                  layer_fractions, forward)
        if error <= tolerance:
            break
        thetas = [theta_for_target([qs[i]], [f], layer_target)
                  for i, f in zip(moe, level_fractions)]
    best.forwards, best.history = len(history), history
    set_layer_sensitivities(model, best.sensitivities)
    return best


def solve_budget(model, windows: torch.Tensor, target: float, mode: str = "global",
                 **kwargs) -> BudgetSolution:
    """`solve_global` or `solve_per_layer` by `mode` ('global' or 'per-layer')."""
    if mode not in BUDGET_MODES:
        raise ValueError(f"budget mode {mode!r}: choose one of {BUDGET_MODES}")
    solver = solve_global if mode == "global" else solve_per_layer
    return solver(model, windows, target, **kwargs)
