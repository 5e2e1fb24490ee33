"""MoEfication of one FFN: importance, permutation, shells, placement (float64 references)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dynamoe.dynamoe import shells as S


def _swiglu_ffn(x, fc1, fc2):
    return S.ffn_hidden_activations(x, fc1, F.silu, gated=True) @ fc2.t()


def _random_ffn(hidden=32, ffn=48, gated=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fc1 = torch.randn((2 if gated else 1) * ffn, hidden, generator=gen, dtype=torch.float64)
    fc2 = torch.randn(hidden, ffn, generator=gen, dtype=torch.float64)
    x = torch.randn(64, hidden, generator=gen, dtype=torch.float64)
    return x, fc1, fc2


@pytest.mark.parametrize("gated", [True, False])
def test_permutation_preserves_dense_ffn(gated):
    x, fc1, fc2 = _random_ffn(gated=gated)
    act = F.silu if gated else F.gelu
    dense = S.ffn_hidden_activations(x, fc1, act, gated) @ fc2.t()
    scores = S.weight_importance(fc1, fc2, gated)
    order = S.importance_order(scores)
    assert not torch.equal(order, torch.arange(order.numel())), "test needs a real permutation"
    fc1_p, fc2_p, _ = S.permute_ffn(fc1, fc2, order, gated)
    permuted = S.ffn_hidden_activations(x, fc1_p, act, gated) @ fc2_p.t()
    rel = (permuted - dense).norm() / dense.norm()
    assert rel < 1e-12


def test_shells_sum_to_dense_and_are_ranked():
    x, fc1, fc2 = _random_ffn()
    scores = S.weight_importance(fc1, fc2, gated=True)
    order = S.importance_order(scores)
    fc1_p, fc2_p, _ = S.permute_ffn(fc1, fc2, order, gated=True)
    shells = S.split_into_shells(fc1_p, fc2_p, 4, gated=True)
    assert [tuple(a.shape) for a, _ in shells] == [(24, 32)] * 4  # [2F/S, H]: gate + up
    total = sum(_swiglu_ffn(x, a, b) for a, b in shells)
    dense = _swiglu_ffn(x, fc1, fc2)
    assert (total - dense).norm() / dense.norm() < 1e-12
    # Shell s holds ranks [s F/S, (s+1) F/S): importance decreases from shell to shell.
    ranked = scores[order]
    per_shell = ranked.view(4, -1)
    assert torch.all(per_shell[:-1].min(dim=1).values >= per_shell[1:].max(dim=1).values)
    # gate/up halves stay paired: shell 0's gate rows are the top neurons' gate rows.
    top = order[:12]
    assert torch.equal(shells[0][0][:12], fc1[top])
    assert torch.equal(shells[0][0][12:], fc1[48 + top])
    assert torch.equal(shells[0][1], fc2[:, top])


def test_activation_importance_matches_definition():
    x, fc1, fc2 = _random_ffn()
    act = S.ffn_hidden_activations(x, fc1, F.silu, gated=True)
    mean_abs = act.abs().mean(dim=0)
    scores = S.activation_importance(mean_abs, fc2)
    for n in (0, 7, 47):
        expected = act[:, n].abs().mean() * fc2[:, n].norm()
        assert torch.isclose(scores[n], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="one value per FFN neuron"):
        S.activation_importance(mean_abs[:-1], fc2)


def test_weight_importance_gated_definition():
    _, fc1, fc2 = _random_ffn()
    scores = S.weight_importance(fc1, fc2, gated=True)
    n = 5
    expected = fc1[n].norm() * fc1[48 + n].norm() * fc2[:, n].norm()
    assert torch.isclose(scores[n], expected, rtol=1e-12)


def _output_error(act, fc2, dropped):
    """E||sum_{n in dropped} fc2[:, n] act_n||^2 over the tokens, from the data (float64)."""
    idx = torch.tensor(sorted(dropped), dtype=torch.long)
    return (act[:, idx] @ fc2[:, idx].t()).square().sum(dim=1).mean()


def test_output_error_order_is_the_greedy_elimination_on_the_data():
    x, fc1, fc2 = _random_ffn(ffn=12)
    act = S.ffn_hidden_activations(x, fc1, F.silu, gated=True)
    order = S.output_error_order(act.t() @ act / act.shape[0], fc2)
    # Reference: drop, one at a time, the neuron whose removal leaves the smallest output
    # error measured on the activations themselves (no M matrix).
    dropped, reference = set(), []
    while len(dropped) < 12:
        best = min((n for n in range(12) if n not in dropped),
                   key=lambda n: _output_error(act, fc2, dropped | {n}))
        dropped.add(best)
        reference.append(best)
    assert order.tolist() == reference[::-1]
    assert torch.equal(S.importance_order(S.order_scores(order)), order)
    with pytest.raises(ValueError, match=r"expected \[12, 12\]"):
        S.output_error_order(torch.eye(11, dtype=torch.float64), fc2)


def test_output_error_order_sees_neurons_that_cancel():
    # Neuron 0 writes -1.5 x neuron 5's contribution (same fc2 column, opposite activation):
    # per-neuron scores rank 0 above 5, but once 5 is dropped, dropping 0 too REDUCES the
    # error (0 and 5 together are -0.5 x neuron 5), so both go first, 0 right after 5.
    gen = torch.Generator().manual_seed(0)
    act = 3 * torch.randn(400, 6, generator=gen, dtype=torch.float64)
    act[:, 5] = torch.randn(400, generator=gen, dtype=torch.float64)
    act[:, 0] = -1.5 * act[:, 5]
    fc2 = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    fc2[:, 0] = fc2[:, 5]
    rms = S.importance_order(S.activation_importance(act.square().mean(0).sqrt(), fc2))
    assert rms.tolist().index(0) < rms.tolist().index(5)
    order = S.output_error_order(act.t() @ act / act.shape[0], fc2)
    assert order[-2:].tolist() == [0, 5]


def test_importance_order_is_stable_for_ties():
    order = S.importance_order(torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0]))
    assert order.tolist() == [1, 2, 4, 0, 3]


def test_split_rejects_indivisible_ffn():
    _, fc1, fc2 = _random_ffn(ffn=48)
    with pytest.raises(ValueError, match="not divisible into 5 shells"):
        S.split_into_shells(fc1, fc2, 5, gated=True)


def test_permute_rejects_non_permutation():
    _, fc1, fc2 = _random_ffn(ffn=48)
    with pytest.raises(ValueError, match="not a permutation"):
        S.permute_ffn(fc1, fc2, torch.zeros(48, dtype=torch.long), gated=True)


def _expected_rank_load(level_probabilities: torch.Tensor, level_shells: tuple,
                        placement: list, ep_size: int) -> torch.Tensor:
    """Expected token-shell products per EP rank for a distribution over levels.

    Args:
        level_probabilities: [K] share of tokens at each level.
        level_shells: shells per level (cumulative), length K.
        placement: physical slot -> logical shell (from `shell_placement`).
    Returns:
        [ep_size] expected load (fraction of tokens x shells) per rank.
    """
    num_shells = level_shells[-1]
    # reach[s] = share of tokens whose level includes logical shell s.
    reach = torch.zeros(num_shells, dtype=torch.float64)
    for level, count in enumerate(level_shells):
        reach[:count] += float(level_probabilities[level])
    physical = reach[torch.tensor(placement)]
    return physical.view(ep_size, -1).sum(dim=1)


def test_balanced_placement_evens_expected_load():
    # Levels 1..4 equally likely, one shell per level: shell loads 1, .75, .5, .25 (x 8 shells).
    level_shells = (2, 4, 6, 8)
    uniform = torch.full((4,), 0.25)
    contiguous = _expected_rank_load(uniform, level_shells, S.shell_placement(8, 2, "contiguous"), 2)
    balanced = _expected_rank_load(uniform, level_shells, S.shell_placement(8, 2, "balanced"), 2)
    assert contiguous.tolist() == [3.5, 1.5]          # rank 0 holds the heavy shells
    assert balanced.tolist() == [2.5, 2.5]            # serpentine: equal expected load
    assert sorted(S.shell_placement(8, 4)) == list(range(8))
    assert S.shell_placement(8, 4) == [0, 7, 1, 6, 2, 5, 3, 4]
    with pytest.raises(ValueError, match="EP size must divide"):
        S.shell_placement(6, 4)
