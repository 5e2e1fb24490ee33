"""Fit the difficulty routers to their labels on calibration text (at MoEfy time).

A router reads the detached FFN input and learns from labels that depend only on its own
layer's FFN weights and residual stream, so on fixed weights its training problem is a convex
softmax regression. The routers leave MoEfication zero-initialised (uniform levels: theta
maps linearly to compute but says nothing about which tokens are hard), and a short
fine-tune moves them little. Fitting them here, on the dense model's own activations, gives a
MoEfied checkpoint that already routes by difficulty, and the fine-tune starts from it.

Flow: `collect_router_data` runs the model once over calibration batches with every
DynaMoE layer in label-collecting mode at theta = 1 (the dense function, so each layer sees
the dense model's inputs); `fit_router` minimises the router cross-entropy on one layer's
(input, target) pairs by full-batch Adam; `fit_routers` does both for every layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from megatron_dynamoe.dynamoe import routing


@dataclass(frozen=True)
class RouterFit:
    """How well one layer's router fits its labels.

    `loss` is the mean cross-entropy against the targets and `target_entropy` its lower
    bound (their mean entropy; equal when the router reproduces the targets exactly);
    `accuracy` compares median levels (the hard label at the middle tolerance);
    `mean_target` is the mean target distribution over levels 1..K.
    """

    layer: int
    tokens: int
    initial_loss: float
    loss: float
    target_entropy: float
    accuracy: float
    mean_target: Tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON-able form for checkpoint metadata."""
        d = asdict(self)
        d["mean_target"] = list(self.mean_target)
        return d


@torch.no_grad()
def collect_router_data(model, batches: Iterable[dict]
                        ) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Router inputs and label targets of every DynaMoE layer of `model` (TP = PP = 1).

    Args:
        model: DynaMoE GPTModel; batches: dicts with `tokens` [b, s], `position_ids`,
            `attention_mask`.
    Returns:
        {global layer index: (inputs [N, H] fp32, targets [N, K] fp32)} over all N tokens.
    """
    from megatron_dynamoe.dynamoe.control import dynamoe_layers

    layers = dynamoe_layers(model)
    if not layers:
        raise ValueError("the model has no DynaMoE layers to fit routers for")
    saved = [(layer.router.sensitivity, layer.router.static_level) for layer in layers]
    inputs: Dict[int, List[torch.Tensor]] = {layer.layer_number - 1: [] for layer in layers}
    targets: Dict[int, List[torch.Tensor]] = {index: [] for index in inputs}
    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            layer.collect_router_data = True
            # theta = 1: every layer computes the dense function, so downstream layers see
            # the dense model's activations whatever the routers say.
            layer.router.set_sensitivity(1.0)
            layer.router.set_static_level(None)
        for batch in batches:
            model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
            for layer in layers:
                index = layer.layer_number - 1
                inputs[index].append(layer.last_stats["router_inputs"])
                targets[index].append(layer.last_stats["label_targets"])
    finally:
        for layer, (theta, static) in zip(layers, saved):
            layer.collect_router_data = False
            layer.router.set_sensitivity(theta)
            layer.router.set_static_level(static)
        model.train(was_training)
    if not any(inputs.values()):
        raise ValueError("router fitting got no calibration batches")
    return {index: (torch.cat(inputs[index]), torch.cat(targets[index])) for index in inputs}


def fit_router(router, inputs: torch.Tensor, targets: torch.Tensor, layer: int,
               steps: int = 300, lr: float = 1e-2) -> RouterFit:
    """Fit `router` (a DifficultyRouter: weight [K, H], bias [K]) to `targets` in place.

    Full-batch Adam from the router's current parameters on the mean of
    `routing.router_cross_entropy`; the problem is convex, so a few hundred steps converge
    (the report's loss vs target entropy shows how close).

    Args:
        inputs: [N, H] fp32 router inputs; targets: [N, K] probabilities over levels.
    """
    if steps < 0:
        raise ValueError(f"router fit steps must be >= 0, got {steps}")
    x = inputs.float()
    weight = router.weight.detach().float().clone().requires_grad_(True)
    bias = router.bias.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    count = x.shape[0]

    def loss_fn():
        logits = torch.nn.functional.linear(x, weight, bias)
        return routing.router_cross_entropy(logits, targets) / count

    with torch.enable_grad():
        initial = float(loss_fn().detach())
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        router.weight.copy_(weight.to(router.weight.dtype))
        router.bias.copy_(bias.to(router.bias.dtype))
        logits = torch.nn.functional.linear(x, weight, bias)
        final = float(routing.router_cross_entropy(logits, targets) / count)
        p = targets.double()
        entropy = float(-(p * p.clamp_min(1e-30).log()).sum(dim=-1).mean())
        predicted = routing.median_levels(torch.softmax(logits, dim=-1))
        accuracy = float((predicted == routing.median_levels(targets)).double().mean())
        mean_target = tuple(round(float(v), 4) for v in p.mean(dim=0))
    return RouterFit(layer, count, initial, final, entropy, accuracy, mean_target)


def fit_routers(model, batches: Iterable[dict], steps: int = 300, lr: float = 1e-2,
                progress: Optional[Callable[[Iterable], Iterable]] = None) -> List[RouterFit]:
    """Collect labels on `batches` and fit every DynaMoE router of `model` to them.

    `progress` wraps the per-layer loop (e.g. a progress bar). Returns one RouterFit per
    layer, in layer order.
    """
    from megatron_dynamoe.dynamoe.control import dynamoe_layers

    data = collect_router_data(model, batches)
    routers = {layer.layer_number - 1: layer.router for layer in dynamoe_layers(model)}
    indices = sorted(data)
    fits = []
    for index in (progress(indices) if progress is not None else indices):
        x, t = data.pop(index)
        fits.append(fit_router(routers[index], x, t, index, steps=steps, lr=lr))
    return fits
