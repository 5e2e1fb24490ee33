"""DynaMoE GPTModel on one process: dense parity at theta = 1, real FLOP skipping, labels."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dynamoe.dynamoe import routing as R
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.layer import DynaMoELayer
from megatron_dynamoe.dynamoe.moefy import calibrate_importance, moefy_state_dict
from megatron_dynamoe.dynamoe.shells import output_error_order
from megatron_dynamoe.dynamoe.shells import importance_order, weight_importance
from megatron_dynamoe.dynamoe.control import (dynamoe_layers, set_level_sorted_experts,
                                              set_sensitivity, set_training_step)
from tests.builders import ARCH, batch, build_dense, build_dynamoe, moefied_state

pytestmark = pytest.mark.usefixtures("single_rank")


def _forward_backward(model, data):
    logits = model(data["tokens"], data["position_ids"], data["attention_mask"])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           data["labels"].reshape(-1))
    loss.backward()
    return logits.detach(), loss.detach()


def _shell_grads_from_dense(dense, layer_index, dyn):
    """Dense FFN grads permuted and cut like moefy did: what each shell's grad must be."""
    mlp = dense.decoder.layers[layer_index].mlp
    fc1, fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    order = importance_order(weight_importance(fc1.detach(), fc2.detach(), gated=True))
    ffn = fc2.shape[1]
    size = ffn // dyn.num_shells
    expected = []
    for s in range(dyn.num_shells):
        idx = order[s * size:(s + 1) * size]
        expected.append((torch.cat([fc1.grad[idx], fc1.grad[ffn + idx]]), fc2.grad[:, idx]))
    return expected


@pytest.mark.parametrize("label_fraction", [1.0, 0.0], ids=["labelled-step", "routed-step"])
def test_theta_one_equals_dense_forward_and_gradients(label_fraction):
    dyn = DynaMoEConfig(label_fraction=label_fraction, label_tolerance=0.2)
    dense = build_dense(seed=1)
    model = build_dynamoe(dyn)
    model.load_state_dict(moefied_state(dense, dyn, router_seed=7))
    set_sensitivity(model, 1.0)
    data = batch(seed=2)
    dense.train()
    model.train()
    ref_logits, ref_loss = _forward_backward(dense, data)
    logits, loss = _forward_backward(model, data)

    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 1e-4 * scale
    assert torch.isclose(loss, ref_loss, rtol=1e-6)
    for layer in dynamoe_layers(model):
        assert torch.equal(layer.last_stats["level_counts"][:-1], torch.zeros(3, dtype=torch.long))
        assert layer.last_stats["ffn_fraction"] == 1.0
        assert ("labels" in layer.last_stats) == (label_fraction == 1.0)

    dense_params = dict(dense.named_parameters())
    shared = 0
    for name, param in model.named_parameters():
        if ".mlp." in name:
            continue
        ref = dense_params[name].grad
        assert torch.allclose(param.grad, ref, rtol=1e-4, atol=1e-6 * ref.abs().max()), name
        shared += 1
    assert shared == len([n for n in dense_params if ".mlp." not in n])
    for layer_index, layer in enumerate(dynamoe_layers(model)):
        expected = _shell_grads_from_dense(dense, layer_index, dyn)
        for shell, expert in zip(layer.experts.shell_ids, layer.experts.local_experts):
            fc1_grad, fc2_grad = expected[shell]
            assert torch.allclose(expert.linear_fc1.weight.grad, fc1_grad, rtol=1e-4, atol=1e-7)
            assert torch.allclose(expert.linear_fc2.weight.grad, fc2_grad, rtol=1e-4, atol=1e-7)
        if label_fraction == 1.0:
            assert layer.router.weight.grad.abs().sum() > 0  # the side loss trains the router
        else:
            assert layer.router.weight.grad is None or layer.router.weight.grad.abs().sum() == 0


def _layer_with_random_router(theta, label_fraction=1.0, tolerance=0.5, seed=3):
    # A layer called on its own has no residual stream: hard labels relative to the FFN output.
    dyn = DynaMoEConfig(num_shells=8, label_fraction=label_fraction, label_tolerance=tolerance,
                        label_tolerance_max=None, label_reference="ffn")
    dense = build_dense(seed=seed)
    model = build_dynamoe(dyn)
    model.load_state_dict(moefied_state(dense, dyn, router_seed=seed))
    set_sensitivity(model, theta)
    layer = dynamoe_layers(model)[0]
    x = torch.randn(12, 3, ARCH.hidden_size, generator=torch.Generator().manual_seed(seed))
    return layer, x


def _shell_outputs_float64(layer, x_flat):
    """[T, S] list of each logical shell's output, recomputed in float64 from its weights."""
    outputs = {}
    for shell, expert in zip(layer.experts.shell_ids, layer.experts.local_experts):
        fc1 = expert.linear_fc1.weight.double()
        fc2 = expert.linear_fc2.weight.double()
        gate, up = (x_flat.double() @ fc1.t()).chunk(2, dim=-1)
        outputs[shell] = (F.silu(gate) * up) @ fc2.t()
    return torch.stack([outputs[s] for s in range(len(outputs))], dim=1)


@pytest.mark.parametrize("level_sorted", [True, False], ids=["level-sorted", "dispatcher"])
@pytest.mark.parametrize("theta", [0.0, 0.4, 0.8])
def test_tokens_reach_exactly_their_level_prefix(theta, level_sorted):
    layer, x = _layer_with_random_router(theta)
    layer.level_sorted_experts = level_sorted
    assert layer.uses_level_sorted_experts() == level_sorted
    layer.eval()
    seen = {}
    hooks = [expert.linear_fc1.register_forward_pre_hook(
        lambda mod, args, shell=shell: seen.__setitem__(shell, args[0].detach().clone()))
        for shell, expert in zip(layer.experts.shell_ids, layer.experts.local_experts)]
    with torch.no_grad():
        out, bias = layer(x)
    for h in hooks:
        h.remove()
    assert bias is None
    x_flat = x.reshape(-1, x.shape[-1])
    decision = layer.router.decide(x)
    levels = decision.levels
    if theta == 0.0:
        assert torch.all(levels == 1)
    else:
        assert len(levels.unique()) > 1, "router weights should spread tokens over levels"
    level_shells = layer.dynamoe_config.level_shells
    placement = layer.router.placement
    products = 0
    for physical, shell in enumerate(placement):
        expected_tokens = torch.tensor([level_shells[l - 1] > shell for l in levels.tolist()])
        rows = seen.get(shell, x_flat[:0])
        # Exactly the tokens whose level includes this shell, no masking: in token order
        # through the dispatcher, by level (highest first, then token order) level-sorted.
        order = torch.arange(levels.numel())
        if level_sorted:
            order = sorted(order.tolist(), key=lambda t: (-int(levels[t]), t))
        assert torch.equal(rows, x_flat[order][expected_tokens[order]])
        products += rows.shape[0]
    assert products == sum(level_shells[l - 1] for l in levels.tolist())
    # Output = sum of the token's prefix shells, recomputed in float64.
    shell_out = _shell_outputs_float64(layer, x_flat)
    prefix = torch.arange(8).unsqueeze(0) < torch.tensor(level_shells)[levels - 1].unsqueeze(1)
    expected = (shell_out * prefix.unsqueeze(-1)).sum(dim=1)
    got = out.reshape(-1, x.shape[-1]).double()
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    fraction = (torch.tensor(level_shells)[levels - 1].double() / 8).mean()
    assert torch.isclose(layer.last_stats["ffn_fraction"].double(), fraction)


def test_labelled_forward_matches_routed_output_and_brute_force_labels():
    layer, x = _layer_with_random_router(0.6, label_fraction=1.0, tolerance=0.5)
    layer.eval()
    with torch.no_grad():
        routed, _ = layer(x)
    layer.train()
    set_training_step(layer, 0)
    x_req = x.clone().requires_grad_(True)
    labelled, _ = layer(x_req)
    assert torch.allclose(labelled, routed, rtol=1e-5, atol=1e-6)

    x_flat = x.reshape(-1, x.shape[-1])
    shell_out = _shell_outputs_float64(layer, x_flat)          # [T, S, H]
    level_shells = layer.dynamoe_config.level_shells
    full = shell_out.sum(dim=1)
    expected = []
    for t in range(x_flat.shape[0]):
        for e, count in enumerate(level_shells, start=1):
            partial = shell_out[t, :count].sum(dim=0)
            if (full[t] - partial).norm() <= 0.5 * full[t].norm():
                expected.append(e)
                break
    labels = layer.last_stats["labels"]
    assert labels.tolist() == expected
    assert len(set(expected)) > 1

    # Side loss: d(output.sum())/d(router weight) = coeff * d(mean CE)/d(weight).
    labelled.sum().backward()
    weight = layer.router.weight.detach().clone().requires_grad_(True)
    bias = layer.router.bias.detach().clone().requires_grad_(True)
    logits = F.linear(x_flat.float(), weight, bias)
    ce = F.cross_entropy(logits, torch.tensor(expected) - 1)
    ce.backward()
    assert torch.allclose(layer.router.weight.grad, weight.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(layer.last_stats["router_loss"], ce.detach(), rtol=1e-5)
    # The router reads a detached input: its loss does not flow into the trunk.
    x_ref = x.clone().requires_grad_(True)
    layer.eval()
    out_ref, _ = layer(x_ref)
    out_ref.sum().backward()
    assert torch.allclose(x_req.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_label_fraction_schedules_labelled_steps():
    layer, x = _layer_with_random_router(0.5, label_fraction=0.5)
    layer.train()
    labelled = []
    for step in range(4):
        set_training_step(layer, step)
        layer(x)
        labelled.append("labels" in layer.last_stats)
    assert labelled == [True, False, True, False]
    layer.eval()
    set_training_step(layer, 0)
    layer(x)
    assert "labels" not in layer.last_stats  # never in evaluation


def test_subset_of_layers_and_calibrated_importance():
    dense = build_dense(seed=4)
    # Neurons whose fc2 column is zero contribute nothing: they must rank last.
    dead = torch.tensor([0, 5, 9, 31])
    with torch.no_grad():
        dense.decoder.layers[1].mlp.linear_fc2.weight[:, dead] = 0.0
    calib = [batch(batch_size=2, seq_len=16, seed=s) for s in range(2)]
    importance = calibrate_importance(dense, calib, gated=True, activation=F.silu)
    assert set(importance) == {0, 1}
    order = importance_order(importance[1])
    assert set(order[-4:].tolist()) == set(dead.tolist())

    # Independent recomputation through the pre-MLP norm's output, float64.
    captured = []
    hook = dense.decoder.layers[0].pre_mlp_layernorm.register_forward_hook(
        lambda m, i, o: captured.append(o.detach().reshape(-1, o.shape[-1])))
    with torch.no_grad():
        for b in calib:
            dense(b["tokens"], b["position_ids"], b["attention_mask"])
    hook.remove()
    h = torch.cat(captured).double()
    mlp = dense.decoder.layers[0].mlp
    gate, up = (h @ mlp.linear_fc1.weight.double().t()).chunk(2, dim=-1)
    act = F.silu(gate) * up
    expected = act.abs().mean(0) * mlp.linear_fc2.weight.double().norm(dim=0)
    assert torch.allclose(importance[0], expected, rtol=1e-9)
    rms = calibrate_importance(dense, calib, gated=True, activation=F.silu, statistic="rms")
    expected = act.square().mean(0).sqrt() * mlp.linear_fc2.weight.double().norm(dim=0)
    assert torch.allclose(rms[0], expected, rtol=1e-9)
    assert not torch.equal(importance_order(rms[0]), importance_order(importance[0]))
    pairwise = calibrate_importance(dense, calib, gated=True, activation=F.silu,
                                    statistic="second-moment")
    expected = output_error_order(act.t() @ act / act.shape[0], mlp.linear_fc2.weight)
    assert torch.equal(importance_order(pairwise[0]), expected)
    assert set(importance_order(pairwise[1])[-4:].tolist()) == set(dead.tolist())

    dyn = DynaMoEConfig(moefied_layers=(1,))
    model = build_dynamoe(dyn)
    state = moefy_state_dict(dense.state_dict(), dyn, gated=True, importance=importance)
    model.load_state_dict(state)
    assert not isinstance(model.decoder.layers[0].mlp, DynaMoELayer)
    assert isinstance(model.decoder.layers[1].mlp, DynaMoELayer)
    data = batch(seed=5)
    dense.eval()
    model.eval()
    with torch.no_grad():
        ref = dense(data["tokens"], data["position_ids"], data["attention_mask"])
        got = model(data["tokens"], data["position_ids"], data["attention_mask"])
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    # The dead neurons sit in the last shell, whose output is exactly what they add: zero
    # for them, so dropping level 4 changes only the other neurons of that shell.
    last_shell_fc2 = model.decoder.layers[1].mlp.experts.local_experts[3].linear_fc2.weight
    assert (last_shell_fc2.abs().sum(0) == 0).sum() == 4


def test_router_is_fp32_zero_initialised_and_uniform():
    dyn = DynaMoEConfig()
    model = build_dynamoe(dyn)
    for layer in dynamoe_layers(model):
        assert layer.router.weight.dtype == torch.float32
        assert layer.router.weight.shape == (4, ARCH.hidden_size)
        assert torch.count_nonzero(layer.router.weight) == 0
    x = torch.randn(5, 2, ARCH.hidden_size)
    q = R.cumulative_level_probs(dynamoe_layers(model)[0].router.level_logits(x))
    assert torch.allclose(q, torch.tensor([0.25, 0.5, 0.75, 1.0]).expand_as(q))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        set_sensitivity(model, 1.5)


@pytest.mark.parametrize("theta", [0.3, 0.6])
def test_level_sorted_experts_equal_the_dispatcher_path(theta):
    """A routed training step (forward and every gradient) through the level-sorted experts
    equals the same step through Megatron's alltoall dispatcher, to round-off."""
    dyn = DynaMoEConfig(num_shells=8, label_fraction=0.0)
    dense = build_dense(seed=4)
    state = moefied_state(dense, dyn, router_seed=4)
    results = []
    for level_sorted in (False, True):
        model = build_dynamoe(dyn)
        model.load_state_dict(state)
        set_sensitivity(model, theta)
        set_level_sorted_experts(model, level_sorted)
        model.train()
        logits, loss = _forward_backward(model, batch(seed=6))
        levels = [layer.last_stats["level_counts"].clone() for layer in dynamoe_layers(model)]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits, loss, levels, grads))
    (ref_logits, ref_loss, ref_levels, ref_grads), (logits, loss, levels, grads) = results
    assert all(len(c.nonzero()) > 1 for c in ref_levels), "tokens must spread over levels"
    assert all(torch.equal(a, b) for a, b in zip(levels, ref_levels))
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
    assert torch.isclose(loss, ref_loss, rtol=1e-6)
    assert sorted(grads) == sorted(ref_grads)
    assert any(".experts." in name for name in grads)
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-12, name
