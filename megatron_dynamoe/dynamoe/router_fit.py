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

At any TP / PP layout: batches go through Megatron's forward-only schedule, each pipeline
stage fits its own layers' routers, tensor-parallel rank 0 fits and broadcasts (a router is
replicated over TP), and every rank returns every layer's RouterFit in layer order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_dynamoe.dynamoe import routing
from megatron_dynamoe.runtime.forward_only import pipeline_forward, pipeline_group, tensor_group


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
def collect_router_data(model, batches: Iterable[dict], layers: Optional[Sequence[int]] = None,
                        keep: bool = True) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Router inputs and label targets of DynaMoE layers of `model` (this rank's pipeline
    stage; any TP size: the router inputs are the full hidden states).

    Args:
        model: DynaMoE GPTModel; batches: dicts with `tokens` [b, s], `position_ids`,
            `attention_mask`, the same on every rank.
        layers: global indices of this stage's layers to collect (default: all of them);
            the others run at theta = 1 without computing labels.
        keep: False runs the forwards (a collective at TP / PP > 1) and keeps nothing.
    Returns:
        {global layer index: (inputs [N, H] fp32, targets [N, K] fp32)} over all N tokens,
        for the collected layers ({} with keep=False).
    """
    from megatron_dynamoe.dynamoe.control import dynamoe_layers

    every = dynamoe_layers(model)
    wanted = None if layers is None else set(layers)
    collected = [layer for layer in every
                 if wanted is None or layer.layer_number - 1 in wanted]
    saved = [(layer.router.sensitivity, layer.router.static_level) for layer in every]
    inputs: Dict[int, List[torch.Tensor]] = {layer.layer_number - 1: [] for layer in collected}
    targets: Dict[int, List[torch.Tensor]] = {index: [] for index in inputs}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for layer in every:
            # theta = 1: every layer computes the dense function, so downstream layers see
            # the dense model's activations whatever the routers say.
            layer.router.set_sensitivity(1.0)
            layer.router.set_static_level(None)
        for layer in collected:
            layer.collect_router_data = True
        for batch in batches:
            pipeline_forward(model, batch)
            count += 1
            for layer in collected:
                index = layer.layer_number - 1
                if keep:
                    inputs[index].append(layer.last_stats["router_inputs"])
                    targets[index].append(layer.last_stats["label_targets"])
                layer.last_stats = {}  # nothing of a discarded batch stays referenced
    finally:
        for layer, (theta, static) in zip(every, saved):
            layer.collect_router_data = False
            layer.router.set_sensitivity(theta)
            layer.router.set_static_level(static)
        model.train(was_training)
    if not count:
        raise ValueError("router fitting got no calibration batches")
    if not keep:
        return {}
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
                progress: Optional[Callable[[Iterable], Iterable]] = None,
                max_bytes: Optional[float] = None) -> List[RouterFit]:
    """Collect labels on `batches` and fit every DynaMoE router of `model` to them.

    The router data of a layer is [N, H + K] fp32 for N calibration tokens (1 GiB for 32k
    tokens of a 70B model); `max_bytes` bounds what one rank holds at once: the layers are
    collected and fitted in groups, one forward pass over the batches per group (every
    pipeline stage runs as many passes as the stage that needs most). Only tensor-parallel
    rank 0 keeps the data and fits; it broadcasts each fitted router over TP.
    `progress` wraps the loop over passes (e.g. a progress bar). Returns one RouterFit per
    DynaMoE layer of the whole model (every pipeline stage), in layer order, on every rank.
    """
    from megatron_dynamoe.dynamoe.control import dynamoe_layers

    batches = list(batches)  # token batches: small, and every pass reads them again
    if not batches:
        raise ValueError("router fitting got no calibration batches")
    routers = {layer.layer_number - 1: layer.router for layer in dynamoe_layers(model)}
    indices = sorted(routers)
    tp_group = tensor_group()
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    groups = _layer_groups([routers[i] for i in indices], indices, batches, max_bytes)
    fits = []
    passes = range(len(groups))
    for group in (progress(passes) if progress is not None else passes):
        data = collect_router_data(model, batches, groups[group], keep=tp_rank == 0)
        for index in groups[group]:
            router = routers[index]
            if tp_rank == 0:
                x, t = data.pop(index)
                fits.append(fit_router(router, x, t, index, steps=steps, lr=lr))
                del x, t
            if tp_group is not None:
                # Replicas of one router must stay bit-identical: rank 0's fit is the fit.
                src = parallel_state.get_tensor_model_parallel_src_rank()
                dist.broadcast(router.weight.data, src=src, group=tp_group)
                dist.broadcast(router.bias.data, src=src, group=tp_group)
    return _gather_fits(fits)


def _layer_groups(routers: list, indices: List[int], batches: List[dict],
                  max_bytes: Optional[float]) -> List[List[int]]:
    """This stage's DynaMoE layer indices in groups whose router data fits `max_bytes`
    (at least one layer per group), padded with empty groups to the number of groups of the
    pipeline stage that needs most (every stage takes part in every pass's forwards)."""
    if not indices:
        per_pass = 1
    elif max_bytes is None:
        per_pass = len(indices)
    else:
        tokens = sum(int(b["tokens"].numel()) for b in batches)
        levels, hidden = routers[0].weight.shape
        per_layer = tokens * (hidden + levels) * 4  # fp32 inputs [N, H] + targets [N, K]
        per_pass = max(1, int(max_bytes // per_layer))
    groups = [indices[i:i + per_pass] for i in range(0, len(indices), per_pass)]
    count = len(groups)
    stages = pipeline_group()
    if stages is not None:
        most = torch.tensor([count], dtype=torch.int64, device=batches[0]["tokens"].device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=stages)
        count = int(most.item())
    return groups + [[] for _ in range(count - len(groups))]


def _gather_fits(fits: List[RouterFit]) -> List[RouterFit]:
    """Every stage's fits (held by its TP rank 0) on every rank, in layer order: a small
    Python object exchange once per MoEfy, not a hot path."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        everyone = [fits]
    else:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, fits)
    merged = {fit.layer: fit for part in everyone for fit in (part or [])}
    if not merged:
        raise ValueError("the model has no DynaMoE layers to fit routers for")
    return [merged[index] for index in sorted(merged)]
