"""Residual-relative soft labels inside a real DynaMoE GPTModel, and fitting the routers.

- the targets the model collects equal a float64 recomputation from the shells' weights and
  the residual stream entering the FFN block;
- a labelled training forward trains the router against exactly those targets;
- fitting brings each router's cross-entropy down towards its lower bound (the targets'
  entropy), leaves theta = 1 equal to the dense model, and restores the layers' state.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_dynamoe.dynamoe import routing
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.router_fit import collect_router_data, fit_routers
from megatron_dynamoe.dynamoe.control import dynamoe_layers, set_sensitivity, set_training_step
from tests.builders import ARCH, batch, build_dense, build_dynamoe, moefied_state

pytestmark = pytest.mark.usefixtures("single_rank")

# The tiny random model's FFN moves its residual stream by 2-7 %: a range that spreads labels.
LOW, HIGH = 0.01, 0.08
DYN = DynaMoEConfig(num_shells=8, label_tolerance=LOW, label_tolerance_max=HIGH)


def _model(seed=11):
    dense = build_dense(seed=seed)
    model = build_dynamoe(DYN)
    model.load_state_dict(moefied_state(dense, DYN))
    return dense, model


def _batches(count=3, seed=20):
    return [batch(batch_size=2, seq_len=16, seed=seed + i) for i in range(count)]


@torch.no_grad()
def _shell_outputs_float64(layer, x):
    outputs = {}
    for shell, expert in zip(layer.experts.shell_ids, layer.experts.local_experts):
        gate, up = (x.double() @ expert.linear_fc1.weight.double().t()).chunk(2, dim=-1)
        outputs[shell] = (F.silu(gate) * up) @ expert.linear_fc2.weight.double().t()
    return torch.stack([outputs[s] for s in range(len(outputs))], dim=1)   # [T, S, H]


def test_collected_targets_match_float64_recomputation_from_the_residual():
    _, model = _model()
    residuals = {}
    hooks = [layer.pre_mlp_layernorm.register_forward_pre_hook(
        lambda mod, args, i=i: residuals.setdefault(i, []).append(args[0].detach().clone()))
        for i, layer in enumerate(model.decoder.layers)]
    with torch.no_grad():
        data = collect_router_data(model, _batches())
    for h in hooks:
        h.remove()
    spread = set()
    for index, layer in enumerate(dynamoe_layers(model)):
        x, targets = data[index]
        assert x.shape == (3 * 32, ARCH.hidden_size) and targets.shape == (3 * 32, 4)
        resid = torch.cat([r.reshape(-1, ARCH.hidden_size) for r in residuals[index]])
        shells = _shell_outputs_float64(layer, x)
        full = shells.sum(dim=1)
        for t in range(x.shape[0]):
            q_prev = 0.0
            for e, count in enumerate(DYN.level_shells):
                ratio = float((full[t] - shells[t, :count].sum(0)).norm()
                              / resid[t].double().norm())
                q = 1.0 if e == 3 else min(1.0, max(0.0, (HIGH - ratio) / (HIGH - LOW)))
                q = max(q, q_prev)
                assert abs(float(targets[t, e]) - (q - q_prev)) < 1e-5, (index, t, e)
                q_prev = q
        spread.update(routing.median_levels(targets).tolist())
    assert len(spread) >= 3, "the tolerance range should spread tokens over the levels"


def test_labelled_training_forward_trains_router_on_the_same_targets():
    _, model = _model()
    data = collect_router_data(model, _batches(count=1))
    model.train()
    set_sensitivity(model, 1.0)
    set_training_step(model, 0)
    b = _batches(count=1)[0]
    model(b["tokens"], b["position_ids"], b["attention_mask"])
    for index, layer in enumerate(dynamoe_layers(model)):
        x, targets = data[index]
        logits = F.linear(x, layer.router.weight, layer.router.bias)
        expected = routing.router_cross_entropy(logits, targets) / x.shape[0]
        assert torch.allclose(layer.last_stats["router_loss"], expected, rtol=1e-5, atol=1e-7)


def test_fit_routers_approaches_the_lower_bound_and_keeps_theta_one_dense():
    dense, model = _model()
    set_sensitivity(model, 0.7)
    fits = fit_routers(model, _batches(), steps=400, lr=5e-2)
    assert [f.layer for f in fits] == [0, 1]
    for fit in fits:
        assert fit.tokens == 96
        assert abs(fit.initial_loss - torch.log(torch.tensor(4.0)).item()) < 1e-5  # zero init
        assert fit.target_entropy <= fit.loss + 1e-6
        # A linear router on 96 tokens of 64-d inputs can nearly reproduce the targets.
        assert fit.loss - fit.target_entropy < 0.25 * (fit.initial_loss - fit.target_entropy)
        assert abs(sum(fit.mean_target) - 1.0) < 1e-3
    for layer in dynamoe_layers(model):
        assert not layer.collect_router_data and layer.router.sensitivity == 0.7
        assert layer.router.weight.abs().sum() > 0
    # theta = 1 still means the dense model, whatever the routers learned.
    set_sensitivity(model, 1.0)
    b = _batches(count=1, seed=40)[0]
    with torch.no_grad():
        dense.eval()
        model.eval()
        ref = dense(b["tokens"], b["position_ids"], b["attention_mask"])
        out = model(b["tokens"], b["position_ids"], b["attention_mask"])
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_standalone_layer_refuses_residual_labels_without_a_residual():
    _, model = _model()
    layer = dynamoe_layers(model)[0]
    layer.train()
    set_training_step(layer, 0)
    x = torch.randn(4, 2, ARCH.hidden_size)
    with pytest.raises(RuntimeError, match="label_reference='ffn'"):
        layer(x)


def test_fitting_in_groups_under_a_memory_bound_equals_one_pass():
    """--router-fit-memory-gib: a bound below one layer's data fits one layer per pass (two
    passes here) and gives the routers and statistics of the single pass (1e-6)."""
    _, whole = _model()
    _, grouped = _model()
    one = fit_routers(whole, _batches(), steps=50, lr=5e-2)
    passes = []
    per_layer = 96 * (ARCH.hidden_size + 4) * 4  # fp32 inputs + targets of 96 tokens
    two = fit_routers(grouped, _batches(), steps=50, lr=5e-2, max_bytes=per_layer * 1.5,
                      progress=lambda xs: passes.append(len(xs)) or xs)
    assert passes == [2]
    assert [f.layer for f in two] == [f.layer for f in one] == [0, 1]
    for a, b in zip(one, two):
        assert a.tokens == b.tokens and b.loss == pytest.approx(a.loss, rel=1e-6)
    for a, b in zip(dynamoe_layers(whole), dynamoe_layers(grouped)):
        assert torch.allclose(a.router.weight, b.router.weight, rtol=0, atol=1e-6)
        assert torch.allclose(a.router.bias, b.router.bias, rtol=0, atol=1e-6)
        assert not b.collect_router_data
