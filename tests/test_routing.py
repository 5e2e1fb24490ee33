"""Routing functions: monotone level probabilities, theta semantics, labels vs brute force."""

import pytest
import torch

from megatron_dynamoe.dynamoe import routing as R
from megatron_dynamoe.dynamoe.layer import is_label_step

LEVEL_SHELLS = (2, 4, 6, 8)


def _hard_labels(groups: torch.Tensor, tolerance: float) -> torch.Tensor:
    """[T] labels 1..K: the smallest level within `tolerance` of the full output (the hard
    targets of `label_targets`, as the layer computes them)."""
    full = groups.double().sum(dim=1).norm(dim=-1)
    return R.label_targets(R.level_errors(groups), full, tolerance).argmax(dim=-1) + 1


def test_cumulative_probs_monotone_and_end_at_one():
    logits = 5 * torch.randn(1000, 4)
    q = R.cumulative_level_probs(logits)
    assert torch.all(q[:, 1:] >= q[:, :-1])
    assert torch.all(q[:, -1] == 1.0)
    assert torch.allclose(q[:, 0], torch.softmax(logits, -1)[:, 0])


def test_levels_at_sensitivity_endpoints_and_monotone():
    # Extreme logits: q_1..q_3 round to exactly 1.0 in fp32, theta = 1 must still give K.
    logits = torch.tensor([[80.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 80.0]])
    q = R.cumulative_level_probs(logits)
    assert q[0, 0] == 1.0
    assert R.levels_at_sensitivity(q, 1.0).tolist() == [4, 4, 4]
    assert R.levels_at_sensitivity(q, 0.0).tolist() == [1, 1, 1]
    assert R.levels_at_sensitivity(q, 0.5).tolist() == [1, 2, 4]
    q = R.cumulative_level_probs(torch.randn(500, 4))
    previous = R.levels_at_sensitivity(q, 0.0)
    for theta in torch.linspace(0.05, 1.0, 20).tolist():
        levels = R.levels_at_sensitivity(q, theta)
        assert torch.all(levels >= previous)          # more sensitivity, never less compute
        # definition: smallest e with q_e >= theta
        brute = torch.tensor([next(e + 1 for e in range(4) if row[e] >= theta or e == 3)
                              for row in q.tolist()])
        if theta < 1.0:
            assert torch.equal(levels, brute)
        previous = levels


def test_routing_map_is_level_prefix_in_physical_order():
    placement = [0, 7, 1, 6, 2, 5, 3, 4]
    masks = R.to_physical(R.logical_level_masks(LEVEL_SHELLS), placement)
    levels = torch.tensor([1, 2, 3, 4, 2])
    rmap = R.level_routing_map(levels, masks)
    for t, level in enumerate(levels.tolist()):
        shells = {placement[p] for p in range(8) if rmap[t, p]}
        assert shells == set(range(LEVEL_SHELLS[level - 1]))
    assert rmap.sum().item() == sum(LEVEL_SHELLS[l - 1] for l in levels.tolist())


def test_group_masks_partition_shells():
    groups = R.logical_group_masks(LEVEL_SHELLS)
    assert torch.equal(groups.sum(0), torch.ones(8, dtype=torch.long))
    assert groups[1].nonzero().flatten().tolist() == [2, 3]


def test_labels_equal_brute_force():
    gen = torch.Generator().manual_seed(3)
    tokens, levels, hidden = 200, 4, 16
    # Random per-token group magnitudes so that labels spread over all levels.
    groups = torch.randn(tokens, levels, hidden, generator=gen)
    groups = groups * torch.rand(tokens, levels, 1, generator=gen) ** 2
    groups[5] = 0.0  # an all-zero FFN output
    tau = 0.5
    labels = _hard_labels(groups, tau)
    g = groups.double()
    expected = []
    for t in range(tokens):
        full = g[t].sum(0)
        for e in range(1, levels + 1):
            partial = g[t, :e].sum(0)
            if (full - partial).norm() <= tau * full.norm():
                expected.append(e)
                break
    assert labels.tolist() == expected
    assert len(set(expected)) == levels, "labels should cover every level in this test"
    assert labels[5] == 1


def test_select_level_output_and_gradient_paths():
    groups = torch.randn(6, 4, 8, requires_grad=True)
    levels = torch.tensor([1, 2, 3, 4, 1, 3])
    out = R.select_level_output(groups, levels)
    expected = torch.stack([groups[t, :l].sum(0) for t, l in enumerate(levels.tolist())])
    assert torch.allclose(out, expected)
    out.sum().backward()
    used = (torch.arange(4).unsqueeze(0) < levels.unsqueeze(1)).float()
    assert torch.equal(groups.grad[..., 0], used)


def test_router_cross_entropy_is_summed_over_valid_tokens():
    logits = torch.randn(5, 4)
    labels = torch.tensor([1, 4, 2, 2, 3])
    valid = torch.tensor([True, True, False, True, True])
    loss = R.router_cross_entropy(logits, labels, valid)
    logp = torch.log_softmax(logits, -1)
    expected = -sum(logp[t, labels[t] - 1] for t in range(5) if valid[t])
    assert torch.isclose(loss, expected)


@pytest.mark.parametrize("fraction,expected", [
    (1.0, [0, 1, 2, 3, 4, 5, 6, 7]),
    (0.25, [0, 4]),
    (0.5, [0, 2, 4, 6]),
    (0.0, []),
])
def test_label_schedule(fraction, expected):
    assert [s for s in range(8) if is_label_step(s, fraction)] == expected


def test_label_schedule_rate_is_exact_over_long_runs():
    assert sum(is_label_step(s, 0.1) for s in range(1000)) == 100
    assert sum(is_label_step(s, 1 / 3) for s in range(999)) == 333


def test_soft_label_targets_match_float64_hand_formula():
    gen = torch.Generator().manual_seed(5)
    groups = torch.randn(50, 4, 16, generator=gen) * torch.rand(50, 4, 1, generator=gen)
    reference = 0.5 + torch.rand(50, generator=gen)
    errors = R.level_errors(groups)
    low, high = 0.1, 0.9
    targets = R.label_targets(errors, reference, low, high)
    assert targets.shape == (50, 4)
    assert torch.allclose(targets.sum(-1), torch.ones(50), atol=1e-6)
    assert torch.all(targets >= 0)
    g = groups.double()
    for t in range(50):
        q_prev = 0.0
        for e in range(4):
            err = (g[t].sum(0) - g[t, :e + 1].sum(0)).norm().item()
            q = 1.0 if e == 3 else min(1.0, max(0.0, (high - err / reference[t].item())
                                                   / (high - low)))
            q = max(q, q_prev)  # within tolerance at level e -> at every larger level
            assert abs(targets[t, e].item() - (q - q_prev)) < 1e-6, (t, e)
            q_prev = q


def test_soft_targets_turn_theta_into_the_tolerance():
    # A router that reproduces the soft targets routes at theta exactly like hard labels at
    # tolerance high - theta (high - low): theta sweeps the tolerance range.
    gen = torch.Generator().manual_seed(6)
    groups = torch.randn(400, 4, 8, generator=gen) * torch.rand(400, 4, 1, generator=gen)
    reference = torch.rand(400, generator=gen) + 0.2
    errors = R.level_errors(groups)
    low, high = 0.05, 0.6
    q = torch.cumsum(R.label_targets(errors, reference, low, high).double(), dim=-1)
    spread = set()
    for theta in (0.13, 0.37, 0.61, 0.89):
        routed = R.levels_at_sensitivity(q, theta)
        tolerance = high - theta * (high - low)
        hard = R.label_targets(errors, reference, tolerance).argmax(-1) + 1
        assert torch.equal(routed, hard), theta
        spread.add(float(routed.double().mean()))
    assert len(spread) == 4  # the sweep really moves compute


def test_hard_targets_are_one_hot_labels_and_soft_cross_entropy():
    gen = torch.Generator().manual_seed(7)
    groups = torch.randn(30, 4, 8, generator=gen) * torch.rand(30, 4, 1, generator=gen)
    full = groups.double().sum(1).norm(dim=-1)
    hard = R.label_targets(R.level_errors(groups), full, 0.4)
    labels = _hard_labels(groups, 0.4)
    assert torch.equal(hard, torch.nn.functional.one_hot(labels - 1, 4).float())
    assert torch.equal(R.median_levels(hard), labels)
    logits = torch.randn(30, 4, generator=gen)
    # One-hot targets give the hard cross-entropy; soft targets the expected one.
    assert torch.allclose(R.router_cross_entropy(logits, hard), R.router_cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(30, 4, generator=gen), -1)
    expected = -(soft.double() * torch.log_softmax(logits.double(), -1)).sum()
    assert torch.allclose(R.router_cross_entropy(logits, soft).double(), expected, rtol=1e-6)


def test_level_sort_puts_each_shells_tokens_in_a_prefix():
    levels = torch.tensor([2, 4, 1, 4, 3, 2, 1, 3])
    order, at_or_above = R.level_sort(levels, 4)
    assert order.tolist() == [1, 3, 4, 7, 0, 5, 2, 6]   # level 4, 3, 2, 1; stable within
    assert at_or_above.tolist() == [8, 6, 4, 2]
    for e in range(1, 5):
        assert set(order[:at_or_above[e - 1]].tolist()) == set(
            (levels >= e).nonzero().flatten().tolist())
    # 8 shells in 4 levels: shells 0-1 serve level 1, 2-3 level 2, ...
    assert R.shell_levels((2, 4, 6, 8)) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert R.shell_levels((1, 2, 4)) == [1, 2, 3, 3]


def test_prefix_views_and_sum_have_the_slicing_gradients():
    from megatron_dynamoe.dynamoe.prefix_ops import prefix_sum, prefix_views

    sizes = (5, 5, 3, 0, 1)
    weights = [torch.randn(4, 4, dtype=torch.float64) for _ in sizes]

    def shells(x, views, summed):
        parts = [v @ w for v, w in zip(views(x), weights)]
        return summed(parts)

    def by_slicing(x):
        def summed(parts):
            out = torch.zeros_like(x)
            for p in parts:
                out = out + torch.cat([p, x.new_zeros(x.shape[0] - p.shape[0], 4)])
            return out
        return shells(x, lambda t: [t[:n] for n in sizes], summed)

    def by_prefix_ops(x):
        return shells(x, lambda t: prefix_views(t, sizes), lambda p: prefix_sum(5, p))

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(by_prefix_ops(x), by_slicing(x), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(by_prefix_ops, (x,))
    g = torch.randn(5, 4, dtype=torch.float64)
    ours = torch.autograd.grad(by_prefix_ops(x), x, g)[0]
    assert torch.allclose(ours, torch.autograd.grad(by_slicing(x), x, g)[0], atol=1e-12)
