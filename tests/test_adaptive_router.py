"""AdaptiveRouter against references: Megatron's own TopKRouter (T = 0 is top-1, T >= 1 is
top-2, topk mode is top-k), float64 brute force for the threshold, top-p and capacity
dropping, and a float64 recomputation of the load-balancing loss over top-1 decisions (value
and router gradient)."""

import math

import pytest
import torch

from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.models.architectures import get_architecture
from megatron_dynamoe.runtime.parallel import ParallelLayout

ARCH = get_architecture("tiny-llama")
E = 4
SEQ, BATCH = 96, 4   # 384 tokens


def _config(gating: AdaptiveGatingConfig, **overrides):
    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider

    return AdaptiveMoEProvider(ARCH, gating).transformer_config(ParallelLayout(), **overrides)


def _pg():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def _adaptive(gating: AdaptiveGatingConfig, weight: torch.Tensor):
    from megatron_dynamoe.adaptive.router import AdaptiveRouter

    router = AdaptiveRouter(_config(gating), pg_collection=_pg(), gating=gating)
    with torch.no_grad():
        router.weight.copy_(weight)
    return router.eval()


def _megatron(k: int, pre_softmax: bool, weight: torch.Tensor):
    """Megatron's TopKRouter with k experts per token and the same gate."""
    from megatron.core.transformer.moe.router import TopKRouter

    gating = AdaptiveGatingConfig(num_experts=E, gating="topk", topk=k,
                                  combine="softmax" if pre_softmax else "renormalized")
    router = TopKRouter(_config(gating, moe_aux_loss_coeff=0.0,
                                moe_router_load_balancing_type="none"), pg_collection=_pg())
    with torch.no_grad():
        router.weight.copy_(weight)
    return router.eval()


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, ARCH.hidden_size, generator=gen)
    weight = 0.3 * torch.randn(E, ARCH.hidden_size, generator=gen)
    return hidden, weight


def _sorted_probs64(hidden, weight):
    logits = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().t()
    return torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)


@pytest.mark.parametrize("combine", ["softmax", "renormalized"])
@pytest.mark.parametrize("threshold,k", [(0.0, 1), (1.0, 2), (7.5, 2)])
def test_threshold_extremes_equal_megatron_topk(single_rank, threshold, k, combine):
    hidden, weight = _inputs()
    values, _ = _sorted_probs64(hidden, weight)
    assert (values[:, 0] - values[:, 1]).min() > 1e-6   # no ties among the top-2
    ours = _adaptive(AdaptiveGatingConfig(num_experts=E, threshold=threshold, combine=combine),
                     weight)
    probs, routing_map = ours(hidden)
    # Megatron refuses renormalised top-1 (zero router gradient): compare maps with its
    # pre-softmax top-1, and the weights where both define them.
    reference_pre_softmax = combine == "softmax" or k == 1
    ref_probs, ref_map = _megatron(k, reference_pre_softmax, weight)(hidden)
    assert routing_map.dtype == torch.bool and routing_map.shape == (SEQ * BATCH, E)
    assert torch.equal(routing_map, ref_map)
    assert (routing_map.sum(dim=1) == k).all()
    if combine == "softmax" or k == 2:
        torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(probs, routing_map.float())   # one expert, weight 1


def test_exact_tie_keeps_two_experts_at_zero_threshold(single_rank):
    hidden, weight = _inputs()
    weight[1] = weight[0]   # experts 0 and 1 tie for every token
    ours = _adaptive(AdaptiveGatingConfig(num_experts=E, threshold=0.0), weight)
    _, routing_map = ours(hidden)
    tied = routing_map[:, 0] & routing_map[:, 1]
    top_is_tied = (hidden.reshape(-1, ARCH.hidden_size) @ weight.t()).argmax(dim=1) <= 1
    assert torch.equal(tied, top_is_tied)      # p1 - p2 = 0 is not > T = 0
    assert tied.any()


@pytest.mark.parametrize("threshold", [0.05, 0.2, 0.5])
def test_threshold_against_float64_brute_force(single_rank, threshold):
    hidden, weight = _inputs(seed=1)
    values, order = _sorted_probs64(hidden, weight)
    gap = values[:, 0] - values[:, 1]
    ours = _adaptive(AdaptiveGatingConfig(num_experts=E, threshold=threshold), weight)
    _, routing_map = ours(hidden)
    expected = torch.zeros_like(routing_map)
    rows = torch.arange(expected.shape[0])
    expected[rows, order[:, 0]] = True
    expected[rows, order[:, 1]] = gap <= threshold
    clear = (gap - threshold).abs() > 1e-6    # float32 vs float64 at the boundary
    assert torch.equal(routing_map[clear], expected[clear])
    share = float(ours.last_stats["two_expert_share"])
    assert share == pytest.approx((gap <= threshold).double().mean().item(), abs=2 / len(gap))
    assert 0.0 < share < 1.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_mode_equals_megatron(single_rank, k):
    hidden, weight = _inputs(seed=2)
    ours = _adaptive(AdaptiveGatingConfig(num_experts=E, gating="topk", topk=k), weight)
    probs, routing_map = ours(hidden)
    ref_probs, ref_map = _megatron(k, True, weight)(hidden)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_p,cap", [(0.5, None), (0.8, None), (0.95, 2), (1.0, None)])
def test_top_p_against_brute_force(single_rank, top_p, cap):
    hidden, weight = _inputs(seed=3)
    values, order = _sorted_probs64(hidden, weight)
    ours = _adaptive(AdaptiveGatingConfig(num_experts=E, gating="topp", top_p=top_p,
                                          max_experts=cap), weight)
    probs, routing_map = ours(hidden)
    limit = cap or E
    for t in range(values.shape[0]):
        mass, chosen = 0.0, set()
        for j in range(limit):
            if j > 0 and mass >= top_p:
                break
            chosen.add(int(order[t, j]))
            mass += float(values[t, j])
        if abs(mass - top_p) < 1e-6:
            continue   # float32 / float64 boundary
        assert set(routing_map[t].nonzero().flatten().tolist()) == chosen, t
    scores = torch.softmax(hidden.reshape(-1, ARCH.hidden_size) @ weight.t(), dim=-1)
    torch.testing.assert_close(probs, scores * routing_map)
    assert routing_map.sum(dim=1).max() <= limit


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_against_brute_force(single_rank, policy):
    hidden, weight = _inputs(seed=4)
    gating = AdaptiveGatingConfig(num_experts=E, threshold=0.3, capacity_factor=0.6,
                                  drop_policy=policy)
    dropless = _adaptive(AdaptiveGatingConfig(num_experts=E, threshold=0.3), weight)
    decided_probs, decided = dropless(hidden)
    router = _adaptive(gating, weight)
    probs, routing_map = router(hidden)

    tokens = SEQ * BATCH
    capacity = math.ceil(tokens * 2 / E * 0.6)      # Megatron's formula, k = 2 (the bound)
    expected = torch.zeros_like(decided)
    for e in range(E):
        routed = decided[:, e].nonzero().flatten()
        if policy == "probs":
            keep = routed[decided_probs[routed, e].argsort(descending=True)[:capacity]]
        else:
            keep = routed[:capacity]
        expected[keep, e] = True
    assert (decided.sum(dim=0) > capacity).any()        # the case really drops
    assert torch.equal(routing_map, expected)
    torch.testing.assert_close(probs, decided_probs * expected)
    stats = router.last_stats
    assert int(stats["dropped_assignments"]) == int((decided & ~expected).sum())
    assert int(stats["dropped_assignments"]) == int(
        (decided.sum(dim=0) - capacity).clamp_min(0).sum())
    assert int(stats["dropped_tokens"]) == int((~expected.any(dim=1)).sum())
    assert torch.equal(stats["tokens_per_expert"], expected.sum(dim=0))
    if policy == "probs":   # Megatron's own dropping gives the same
        from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

        ref_probs, ref_map = apply_router_token_dropping(decided_probs, decided, 2, 0.6, "probs")
        assert torch.equal(routing_map, ref_map)
        torch.testing.assert_close(probs, ref_probs)


def test_pad_to_capacity_fills_every_expert(single_rank):
    hidden, weight = _inputs(seed=4)
    dropless = _adaptive(AdaptiveGatingConfig(num_experts=E, threshold=0.3), weight)
    decided_probs, decided = dropless(hidden)
    router = _adaptive(AdaptiveGatingConfig(num_experts=E, threshold=0.3, capacity_factor=1.5,
                                            drop_policy="position", pad_to_capacity=True),
                       weight)
    probs, routing_map = router(hidden)
    capacity = math.ceil(SEQ * BATCH * 2 / E * 1.5)
    assert (routing_map.sum(dim=0) == capacity).all()
    assert torch.equal(routing_map & decided, decided & (decided.cumsum(dim=0) <= capacity))
    torch.testing.assert_close(probs, decided_probs * (routing_map & decided))


def test_load_balancing_loss_over_top1_decisions(single_rank):
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    hidden, weight = _inputs(seed=5)
    coeff = 0.05
    router = _adaptive(AdaptiveGatingConfig(num_experts=E, threshold=0.2,
                                            aux_loss_coeff=coeff), weight).train()
    router.set_layer_number(1)
    clear_aux_losses_tracker()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    probs, routing_map = router(hidden)
    assert (routing_map.sum(dim=1) == 2).any()        # top-2 tokens exist: top-1 matters
    (probs * 0.0).sum().backward()                      # only the side loss has a gradient

    w64 = weight.double().requires_grad_(True)
    p = torch.softmax(hidden.reshape(-1, ARCH.hidden_size).double() @ w64.t(), dim=-1)
    tokens = p.shape[0]
    f = torch.bincount(p.argmax(dim=1), minlength=E).double() / tokens   # top-1 fractions
    reference = coeff * E * (f * p.mean(dim=0)).sum()
    reference.backward()

    logged = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0]
    assert float(logged) * coeff == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(router.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-9)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveGatingConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="at least 2 experts"):
        AdaptiveGatingConfig(num_experts=1)
    with pytest.raises(ValueError, match="top_p"):
        AdaptiveGatingConfig(gating="topp", top_p=0.0)
    with pytest.raises(ValueError, match="pad_to_capacity"):
        AdaptiveGatingConfig(pad_to_capacity=True)
    with pytest.raises(ValueError, match="combine='softmax'"):
        AdaptiveGatingConfig(gating="topk", topk=1, combine="renormalized")
    g = AdaptiveGatingConfig(num_experts=8, gating="topp", top_p=0.7, max_experts=3,
                             moe_layers=(3, 1))
    assert AdaptiveGatingConfig.from_dict(g.to_dict()) == g
    assert g.max_experts_per_token == 3 and g.balance_topk == 1 and g.moe_layers == (1, 3)


def test_router_rejects_mismatched_megatron_config(single_rank):
    from megatron_dynamoe.adaptive.router import AdaptiveRouter

    gating = AdaptiveGatingConfig(num_experts=E)
    config = _config(gating, moe_router_topk=3)
    with pytest.raises(ValueError, match="moe_router_topk=3"):
        AdaptiveRouter(config, pg_collection=_pg(), gating=gating)


def test_tensorboard_scalars_match_the_routing(single_rank):
    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider, adaptive_layers
    from megatron_dynamoe.models.builder import causal_attention_mask

    gating = AdaptiveGatingConfig(num_experts=E, threshold=0.2, capacity_factor=0.6)
    provider = AdaptiveMoEProvider(ARCH, gating)
    torch.manual_seed(0)
    model = provider.build(provider.transformer_config(ParallelLayout()))
    for layer in adaptive_layers(model):
        with torch.no_grad():
            layer.router.weight.mul_(15.0)
    tokens = torch.randint(0, ARCH.vocab_size, (2, 32))
    model(tokens, torch.arange(32).expand(2, 32), causal_attention_mask(32))
    scalars = provider.scalars(model)
    dropped = 0
    for layer in adaptive_layers(model):
        stats, tag = layer.router.last_stats, f"moe/layer{layer.layer_number:03d}"
        load = [scalars[f"{tag}/expert{e}-tokens"] for e in range(E)]
        share = scalars[f"{tag}/two-expert-share"]
        assert 0.0 < share < 1.0
        # kept assignments = decided (1 + share per token) minus the dropped ones
        decided = round(64 * (1 + share))
        assert sum(load) == decided - int(stats["dropped_assignments"])
        assert scalars[f"{tag}/experts-per-token"] == pytest.approx(decided / 64)
        assert scalars[f"{tag}/expert-load-imbalance"] == pytest.approx(max(load) / (sum(load) / E))
        assert max(load) <= math.ceil(64 * 2 / E * 0.6)
        dropped += int(stats["dropped_assignments"])
    assert scalars["moe/dropped-tokens"] == dropped > 0
