"""Dense -> MoE upcycling: neuron-split experts at weight 1 and replicated experts reproduce
the dense GPTModel's logits; expert groups are partitions with the promised balance /
clustering; the fitted router picks the experts that carry the output."""

import dataclasses

import pytest
import torch

from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.adaptive.upcycle import (
    capture_ffn_inputs,
    coactivation_groups,
    expert_outputs,
    fit_router,
    importance_balanced_groups,
    upcycle_state_dict,
    upcycled_gating,
)
from megatron_dynamoe.dynamoe.shells import ffn_hidden_activations
from megatron_dynamoe.runtime.parallel import ParallelLayout
from tests.builders import ARCH, batch, build_dense

E = 4


def _dense_and_inputs():
    dense = build_dense(seed=3)
    batches = [batch(2, 32, seed=s) for s in range(4)]
    return dense, batches, capture_ffn_inputs(dense, batches, max_tokens=200)


def _logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b["tokens"], b["position_ids"], b["attention_mask"])
                          for b in batches])


def _moe(gating, state):
    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider

    provider = AdaptiveMoEProvider(ARCH, gating)
    model = provider.build(provider.transformer_config(ParallelLayout()), parallel_output=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    return model


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", ["split-importance", "split-coactivation"])
def test_split_experts_all_at_weight_one_equal_dense(single_rank, method):
    dense, batches, inputs = _dense_and_inputs()
    reference = _logits(dense, batches)
    gating = upcycled_gating(AdaptiveGatingConfig(num_experts=E, gating="topk", topk=E),
                             method, ARCH.ffn_hidden_size)
    assert gating.combine == "softmax" and gating.scale == E
    state = upcycle_state_dict(dense.state_dict(), gating, method, ARCH.gated,
                               ARCH.activation_func, inputs)
    for key in [k for k in state if k.endswith("router.weight")]:
        state[key] = torch.zeros_like(state[key])   # uniform router: every weight E / E = 1
    assert _relative(_logits(_moe(gating, state), batches), reference) < 1e-5


@pytest.mark.parametrize("gating", [AdaptiveGatingConfig(num_experts=E, threshold=0.01),
                                    AdaptiveGatingConfig(num_experts=E, gating="topk", topk=2)],
                         ids=["adaptive", "top2"])
def test_replicated_experts_equal_dense_under_any_routing(single_rank, gating):
    dense, batches, inputs = _dense_and_inputs()
    reference = _logits(dense, batches)
    gating = upcycled_gating(gating, "replicate", ARCH.ffn_hidden_size)
    assert gating.combine == "renormalized" and gating.expert_ffn_hidden_size == 128
    state = upcycle_state_dict(dense.state_dict(), gating, "replicate", ARCH.gated,
                               ARCH.activation_func, inputs)
    model = _moe(gating, state)
    assert _relative(_logits(model, batches), reference) < 1e-5
    share = float(model.decoder.layers[0].mlp.router.last_stats["two_expert_share"])
    if gating.gating == "adaptive":
        assert 0.0 < share < 1.0     # tokens really take different numbers of experts
    else:
        assert share == 1.0


def test_importance_groups_partition_and_balance():
    gen = torch.Generator().manual_seed(0)
    importance = torch.rand(128, generator=gen).double() ** 3
    groups = importance_balanced_groups(importance, E)
    assert groups.shape == (E, 32)
    assert sorted(groups.flatten().tolist()) == list(range(128))
    totals = torch.stack([importance[g].sum() for g in groups])
    # Serpentine dealing: each group's total is within one top neuron of the others.
    assert float(totals.max() - totals.min()) <= float(importance.max())
    assert float(totals.max() / totals.min()) < 1.1


def test_coactivation_groups_recover_planted_clusters():
    gen = torch.Generator().manual_seed(1)
    tokens, ffn = 400, 64
    cluster_of_neuron = torch.randperm(ffn, generator=gen) % E
    cluster_of_token = torch.randint(E, (tokens,), generator=gen)
    active = cluster_of_token.unsqueeze(1) == cluster_of_neuron.unsqueeze(0)        # [N, F]
    activations = active * (1 + torch.rand(tokens, ffn, generator=gen)) \
        + 0.05 * torch.randn(tokens, ffn, generator=gen)
    groups = coactivation_groups(activations, E, seed=0)
    assert sorted(groups.flatten().tolist()) == list(range(ffn))
    found = sorted(tuple(g.tolist()) for g in groups)
    planted = sorted(tuple((cluster_of_neuron == c).nonzero().flatten().tolist())
                     for c in range(E))
    assert found == planted


def test_fitted_router_picks_the_experts_that_carry_the_output(single_rank):
    dense, _, inputs = _dense_and_inputs()
    state = dense.state_dict()
    fc1, fc2 = (state[f"decoder.layers.0.mlp.{n}.weight"] for n in ("linear_fc1", "linear_fc2"))
    x = inputs[0]
    act = ffn_hidden_activations(x.double(), fc1.double(), ARCH.activation_func, ARCH.gated)
    groups = coactivation_groups(act, E)
    outputs = expert_outputs(x, fc1, fc2, groups, ARCH.gated, ARCH.activation_func)
    full = outputs.sum(dim=1)
    torch.testing.assert_close(full, act @ fc2.double().t())   # the groups sum to dense

    weight = fit_router(x, outputs, logit_std=0.5)
    logits = x.double() @ weight.double().t()
    assert float(logits.std()) == pytest.approx(0.5, rel=1e-6)

    def top2_error(scores):
        top = scores.topk(2, dim=1).indices
        partial = outputs.gather(1, top.unsqueeze(-1).expand(-1, -1, outputs.shape[-1])).sum(1)
        return float((partial - full).norm() / full.norm())

    fitted = top2_error(logits)
    oracle = top2_error((outputs * full.unsqueeze(1)).sum(-1))      # true largest shares
    gen = torch.Generator().manual_seed(0)
    random = sum(top2_error(torch.rand(logits.shape, generator=gen, dtype=torch.float64))
                 for _ in range(20)) / 20
    assert oracle <= fitted < random


def test_upcycle_rejects_bad_input(single_rank):
    dense = build_dense(seed=3)
    gating = AdaptiveGatingConfig(num_experts=E)
    with pytest.raises(ValueError, match="unknown upcycling method"):
        upcycled_gating(gating, "clone", ARCH.ffn_hidden_size)
    with pytest.raises(ValueError, match="needs calibration inputs"):
        upcycle_state_dict(dense.state_dict(), upcycled_gating(
            gating, "split-coactivation", ARCH.ffn_hidden_size), "split-coactivation",
            ARCH.gated, ARCH.activation_func)
    with pytest.raises(ValueError, match="combine='softmax'"):
        # replicate needs renormalised weights, which Megatron (and we) refuse for top-1
        upcycled_gating(AdaptiveGatingConfig(num_experts=E, gating="topk", topk=1),
                        "replicate", ARCH.ffn_hidden_size)
    with pytest.raises(ValueError, match="does not match method"):
        upcycle_state_dict(dense.state_dict(), dataclasses.replace(gating, scale=4.0),
                           "replicate", ARCH.gated, ARCH.activation_func)


def test_gating_flags_default_to_the_config_and_read_back_into_it():
    # The flags take their defaults from AdaptiveGatingConfig, so an empty command line (but
    # the required folders) gives the dataclass's defaults; set flags reach the config.
    from megatron_dynamoe.adaptive.config import DROP_POLICIES, GATING_MODES
    from megatron_dynamoe.cli.common import config_from_args
    from megatron_dynamoe.cli.upcycle import GATING_FLAGS, parse_args

    folders = ["--load", "dense", "--output", "moe"]
    args = parse_args(folders)
    assert config_from_args(args, AdaptiveGatingConfig, GATING_FLAGS) == AdaptiveGatingConfig()
    for name in GATING_FLAGS:
        assert getattr(args, name) == getattr(AdaptiveGatingConfig(), name), name
    args = parse_args(folders + ["--gating", "topp", "--top-p", "0.9", "--max-experts", "3",
                                 "--moe-layers", "2,0", "--capacity-factor", "1.5"])
    cfg = config_from_args(args, AdaptiveGatingConfig, GATING_FLAGS)
    assert (cfg.gating, cfg.top_p, cfg.max_experts, cfg.moe_layers, cfg.capacity_factor) == \
        ("topp", 0.9, 3, (0, 2), 1.5)
    # The choices are the config module's own lists.
    actions = {a.dest: a for a in _capture_parser(parse_args, folders)._actions}
    assert tuple(actions["gating"].choices) == GATING_MODES
    assert tuple(actions["drop_policy"].choices) == DROP_POLICIES


def _capture_parser(parse_args, argv):
    """The parser `parse_args(argv)` builds (its parse_args returns it instead of parsing)."""
    import argparse

    saved = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = lambda self, argv=None, namespace=None: self
    try:
        return parse_args(argv)
    finally:
        argparse.ArgumentParser.parse_args = saved
