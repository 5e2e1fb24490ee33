"""Dense -> MoE upcycling: every FFN of a dense GPTModel becomes E ordinary experts.

Methods:
- 'replicate' (sparse upcycling): each expert is a copy of the dense FFN. With
  combine='renormalized' the selected experts' weights sum to 1, so the upcycled model IS
  the dense model for any routing (k x the dense FFN compute for k experts per token).
- 'split-importance': the FFN's neurons are dealt into E equal groups in serpentine order of
  calibration importance (E|act_n| x ||fc2[:, n]||, `dynamoe.shells`), so every expert holds
  an equal share of important neurons.
- 'split-coactivation': balanced k-means over the neurons' |activation| patterns on
  calibration tokens, so neurons that fire together share an expert (MoEfication-style)
  and a token's few selected experts hold most of its activation mass.

An FFN is a sum over its neurons, so the E neuron groups sum to the dense FFN: with
combine='softmax' and scale=E (set by `upcycled_gating`), a uniform router gives every
expert weight exactly 1 and a token routed to all E experts reproduces the dense output.
Top-2 of E cannot; the router is initialised to pick the experts that carry most of each
token's output: a float64 ridge regression from the FFN input to each expert's share of
the dense output, <E_e(x), FFN(x)> / ||FFN(x)||^2, measured on calibration tokens and scaled
to small logits (standard deviation 0.1 by default, so the weights E x p stay near 1; on
SmolLM2 a scale of 0.5 instead of 0.1 multiplies the top-2 perplexity by 12).
`bench/bench_upcycle.py` reports the closeness.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, Optional

import torch

from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.dynamoe.moefy import split_ffn_weights
from megatron_dynamoe.dynamoe.shells import (
    activation_importance,
    ffn_hidden_activations,
    importance_order,
    weight_importance,
)

UPCYCLE_METHODS = ("replicate", "split-importance", "split-coactivation")


def upcycled_gating(gating: AdaptiveGatingConfig, method: str,
                    ffn_hidden_size: int) -> AdaptiveGatingConfig:
    """The gating config an upcycled model is built with: `gating` with the expert size,
    combine weights and scale that make the upcycled model start at (or near) dense."""
    if method not in UPCYCLE_METHODS:
        raise ValueError(f"unknown upcycling method {method!r}: choose one of {UPCYCLE_METHODS}")
    if method == "replicate":
        return dataclasses.replace(gating, expert_ffn_hidden_size=ffn_hidden_size,
                                   combine="renormalized", scale=1.0)
    gating.expert_size(ffn_hidden_size)  # raises when F is not divisible by E
    return dataclasses.replace(gating, expert_ffn_hidden_size=None, combine="softmax",
                               scale=float(gating.num_experts))


@torch.no_grad()
def capture_ffn_inputs(model, batches: Iterable[dict], max_tokens: int = 4096
                       ) -> Dict[int, torch.Tensor]:
    """FFN inputs (after the pre-MLP norm) of every layer of a dense GPTModel (TP = PP = 1).

    Args:
        model: dense GPTModel; batches: dicts with tokens, position_ids, attention_mask.
        max_tokens: keep at most this many tokens per layer (the first ones).
    Returns:
        {0-based layer index: [N, H] float32}.
    """
    captured: Dict[int, list] = {}
    counts: Dict[int, int] = {}

    def hook_for(index):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            room = max_tokens - counts.get(index, 0)
            if room > 0:
                captured.setdefault(index, []).append(x[:room].float().clone())
                counts[index] = counts.get(index, 0) + min(room, x.shape[0])
        return hook

    hooks = [layer.mlp.register_forward_pre_hook(hook_for(layer.layer_number - 1))
             for layer in model.decoder.layers]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
            if counts and min(counts.values()) >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not captured:
        raise ValueError("calibration produced no tokens: give at least one batch")
    return {index: torch.cat(parts) for index, parts in captured.items()}


def importance_balanced_groups(importance: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Deal neurons into equal groups by decreasing importance, serpentine (0..E-1, E-1..0),
    so every group's total importance is nearly equal.

    Args:
        importance: [F] scores; F divisible by `num_experts`.
    Returns:
        [E, F / E] int64 neuron indices, ascending within each group.
    """
    ffn = importance.numel()
    if ffn % num_experts:
        raise ValueError(f"{ffn} neurons cannot be split into {num_experts} equal experts")
    order = importance_order(importance)
    rank = torch.arange(ffn)
    round_, pos = rank // num_experts, rank % num_experts
    group = torch.where(round_ % 2 == 0, pos, num_experts - 1 - pos)
    return torch.stack([order[group == e].sort().values for e in range(num_experts)])


def _balanced_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy assignment of rows to columns by decreasing similarity, `capacity` rows per
    column: [F, E] -> [F] column index."""
    rows, cols = similarity.shape
    order = torch.argsort(similarity.reshape(-1), descending=True, stable=True).tolist()
    assignment = [-1] * rows
    load = [0] * cols
    left = rows
    for flat in order:
        r, c = divmod(flat, cols)
        if assignment[r] < 0 and load[c] < capacity:
            assignment[r] = c
            load[c] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assignment)


def coactivation_groups(activations: torch.Tensor, num_experts: int, iterations: int = 30,
                        seed: int = 0) -> torch.Tensor:
    """Balanced k-means of neurons on their activation patterns (cosine similarity of
    |act_n| over calibration tokens): neurons that fire together share a group.

    Args:
        activations: [N, F] hidden activations on N calibration tokens.
        num_experts: E; F must be divisible by E. seed: centroid initialisation.
    Returns:
        [E, F / E] int64 neuron indices, ascending within each group.
    """
    ffn = activations.shape[1]
    if ffn % num_experts:
        raise ValueError(f"{ffn} neurons cannot be split into {num_experts} equal experts")
    # float32 suffices for a clustering; the features are unit rows, so dot = cosine.
    feats = torch.nn.functional.normalize(activations.float().abs().t(), dim=1)    # [F, N]
    gen = torch.Generator().manual_seed(seed)
    # k-means++ style seeding, deterministic from `seed`.
    centroids = [feats[torch.randint(ffn, (1,), generator=gen)].squeeze(0)]
    for _ in range(1, num_experts):
        distance = (1 - feats @ torch.stack(centroids).t()).min(dim=1).values.clamp_min(0)
        centroids.append(feats[torch.multinomial(distance + 1e-12, 1, generator=gen)].squeeze(0))
    centroids = torch.stack(centroids)
    assignment = None
    for _ in range(iterations):
        new = _balanced_assign(feats @ centroids.t(), ffn // num_experts)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        # Cluster means as one matmul (gathering rows per cluster is memory-bound).
        one_hot = torch.nn.functional.one_hot(assignment, num_experts).to(feats.dtype)
        centroids = torch.nn.functional.normalize(one_hot.t() @ feats, dim=1)
    return torch.stack([(assignment == e).nonzero().flatten() for e in range(num_experts)])


def expert_outputs(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, groups: torch.Tensor,
                   gated: bool, activation) -> torch.Tensor:
    """Each neuron group's FFN output on inputs x: [N, H] -> [N, E, H] (float64)."""
    act = ffn_hidden_activations(x.double(), fc1.double(), activation, gated)     # [N, F]
    fc2 = fc2.double()
    return torch.stack([act[:, g] @ fc2[:, g].t() for g in groups], dim=1)


def fit_router(x: torch.Tensor, outputs: torch.Tensor, logit_std: float = 0.1,
               ridge: float = 1e-3) -> torch.Tensor:
    """Router weight [E, H] whose logits rank experts by their share of the dense output.

    Targets are s_e(x) = <E_e(x), FFN(x)> / ||FFN(x)||^2 (they sum to 1 over e), centred per
    token (softmax ignores a per-token shift); the fit is ridge regression in float64 with
    penalty `ridge` x mean diagonal of X^T X, then scaled so the logits' standard deviation
    on the calibration tokens is `logit_std`: small logits keep the combine weights (E x the
    softmax probability) near 1 while preserving the ranking.

    Args:
        x: [N, H] FFN inputs; outputs: [N, E, H] per-expert outputs (`expert_outputs`).
    Returns:
        [E, H] float32.
    """
    full = outputs.sum(dim=1)
    share = (outputs * full.unsqueeze(1)).sum(dim=-1) / (full * full).sum(-1, keepdim=True
                                                                         ).clamp_min(1e-30)
    target = share - share.mean(dim=1, keepdim=True)
    xd = x.double()
    gram = xd.t() @ xd
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, xd.t() @ target).t()                          # [E, H]
    std = (xd @ weight.t()).std()
    if std > 0:
        weight = weight * (logit_std / std)
    return weight.float()


def upcycle_state_dict(dense_state: Dict[str, torch.Tensor], gating: AdaptiveGatingConfig,
                       method: str, gated: bool,
                       activation: Callable[[torch.Tensor], torch.Tensor],
                       inputs: Optional[Dict[int, torch.Tensor]] = None,
                       logit_std: float = 0.1, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Dense GPTModel state dict (TP = PP = 1) -> the upcycled MoE model's (EP = 1).

    Args:
        dense_state: `model.state_dict()` of the dense model.
        gating: the gating config the MoE model is built with (`upcycled_gating(...)`).
        method: one of UPCYCLE_METHODS.
        gated, activation: the FFN's form (architecture.gated / activation_func).
        inputs: {layer: [N, H] FFN inputs} from `capture_ffn_inputs`; without them the
            split is by weight-norm importance and routers are small random (seeded).
        logit_std, seed: router scale (`fit_router`) and the seed of random choices.
    Returns:
        A new state dict; tensors outside the MoE FFNs are the dense ones (shared storage).
    """
    if method not in UPCYCLE_METHODS:
        raise ValueError(f"unknown upcycling method {method!r}: choose one of {UPCYCLE_METHODS}")
    if method == "split-coactivation" and not inputs:
        raise ValueError("split-coactivation needs calibration inputs (capture_ffn_inputs)")
    out, ffn = split_ffn_weights(dense_state, gating.is_moe)
    gen = torch.Generator().manual_seed(seed)
    for index, (fc1, fc2) in ffn.items():
        size, experts = fc2.shape[1], gating.num_experts
        if gating.expert_size(size) != (size if method == "replicate" else size // experts):
            raise ValueError(f"the gating config does not match method {method!r}: build it "
                             f"with upcycled_gating(gating, {method!r}, {size})")
        x = inputs.get(index) if inputs else None
        prefix = f"decoder.layers.{index}.mlp."
        if method == "replicate":
            groups = torch.arange(size).expand(experts, size)
        elif method == "split-importance":
            scores = (weight_importance(fc1, fc2, gated) if x is None else activation_importance(
                ffn_hidden_activations(x.double(), fc1.double(), activation, gated
                                       ).abs().mean(dim=0), fc2))
            groups = importance_balanced_groups(scores, experts)
        else:
            act = ffn_hidden_activations(x.double(), fc1.double(), activation, gated)
            groups = coactivation_groups(act, experts, seed=seed + index)
        for e, g in enumerate(groups):
            rows = torch.cat([g, g + size]) if gated else g
            out[f"{prefix}experts.local_experts.{e}.linear_fc1.weight"] = fc1[rows].clone()
            out[f"{prefix}experts.local_experts.{e}.linear_fc2.weight"] = fc2[:, g].clone()
        if method == "replicate" or x is None:
            # Replicated experts keep the model dense under any router; a small random one
            # (Megatron's init scale) breaks their symmetry. Without calibration data there
            # is nothing to fit either.
            router = 0.02 * torch.randn(experts, fc1.shape[1], generator=gen)
        else:
            router = fit_router(x, expert_outputs(x, fc1, fc2, groups, gated, activation),
                                logit_std=logit_std)
        out[f"{prefix}router.weight"] = router.float()
    missing = [i for i in (gating.moe_layers or []) if i not in ffn]
    if missing:
        raise ValueError(f"MoE layers {missing} have no dense FFN weights in the checkpoint")
    return out
