"""Routing functions: monotone level probabilities, theta semantics, labels vs brute force."""

import pytest
import torch

from megatron_dynamoe.dynamoe import routing as R
from megatron_dynamoe.dynamoe.layer import is_label_step

LEVEL_SHELLS = (2, 4, 6, 8)


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
    labels = R.difficulty_labels(groups, tau)
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
