"""Curriculum order: deterministic, ascending within windows / overall, exact on resume (as a
pure function and through the real trainer with the adaptive MoE provider), scores files
round-trip and bad ones fail with a clear error; the profiling pass scores each sequence."""

import json

import numpy as np
import pytest
import torch

from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.models.architectures import get_architecture
from megatron_dynamoe.data.curriculum import (
    CurriculumError,
    CurriculumOrder,
    CurriculumScores,
    curriculum_source,
    load_scores,
    profile_scores,
    save_scores,
)

N = 100


def _scores(seed=0, n=N):
    rng = np.random.default_rng(seed)
    # Coarse scores so that ties occur and tie-breaking is exercised.
    return CurriculumScores(np.arange(n), rng.integers(0, 20, n) / 20.0, "two-expert-share",
                            {"checkpoint": "ckpt/x", "seq_length": 32})


def _score_of(scores):
    return dict(zip(scores.indices.tolist(), scores.scores.tolist()))


def test_window_mode_sorts_each_window_and_keeps_its_samples():
    scores = _scores()
    order = CurriculumOrder(scores, window=16, mode="window")
    assert sorted(order.order.tolist()) == list(range(N))
    value = _score_of(scores)
    for start in range(0, N, 16):
        window = order.order[start:start + 16].tolist()
        assert sorted(window) == list(range(start, min(start + 16, N)))
        keys = [(value[i], i) for i in window]
        assert keys == sorted(keys)   # ascending score, ties by sample index
    again = CurriculumOrder(_scores(), window=16, mode="window")
    assert np.array_equal(order.order, again.order)


def test_global_mode_ascends_across_windows_and_is_seeded():
    scores = _scores(seed=1)
    value = _score_of(scores)
    order = CurriculumOrder(scores, window=8, mode="global", seed=3)
    assert sorted(order.order.tolist()) == list(range(N))
    windows = [order.order[s:s + 8].tolist() for s in range(0, N, 8)]
    for a, b in zip(windows, windows[1:]):
        assert max(value[i] for i in a) <= min(value[i] for i in b)
    ranked = sorted(range(N), key=lambda i: (value[i], i))
    assert [sorted(w) for w in windows] == [sorted(ranked[s:s + 8]) for s in range(0, N, 8)]
    assert np.array_equal(order.order, CurriculumOrder(scores, 8, "global", seed=3).order)
    other = CurriculumOrder(scores, 8, "global", seed=4).order
    assert not np.array_equal(order.order, other)
    assert [sorted(other[s:s + 8].tolist()) for s in range(0, N, 8)] == \
        [sorted(w) for w in windows]
    # window = 1 shuffles nothing: the exact ascending order
    exact = CurriculumOrder(scores, 1, "global").order.tolist()
    assert exact == ranked


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_resume_from_reloaded_scores_gives_the_same_remainder(tmp_path, suffix):
    path = str(tmp_path / f"scores{suffix}")
    save_scores(path, _scores(seed=2))
    loaded = load_scores(path)
    assert loaded.metric == "two-expert-share" and loaded.provenance["seq_length"] == 32

    def consumed(order, start, stop, micro_batch=2, dp=2):
        # The trainer's position arithmetic: micro-batch m of DP rank r of the iteration
        # starting at `s` reads positions s + (m * dp + r) * micro_batch + [0, micro_batch).
        source = curriculum_source(lambda i: i, order, collate=list)
        seen = []
        for s in range(start, stop, 8):
            for m in range(2):
                for r in range(dp):
                    seen += source(s + (m * dp + r) * micro_batch, micro_batch)
        return seen

    full = consumed(CurriculumOrder(_scores(seed=2), 8, "global", seed=5), 0, 96)
    head = consumed(CurriculumOrder(load_scores(path), 8, "global", seed=5), 0, 40)
    tail = consumed(CurriculumOrder(load_scores(path), 8, "global", seed=5), 40, 96)
    assert head + tail == full
    assert sorted(full) == sorted(CurriculumOrder(loaded, 8, "global", seed=5).order[:96])


@pytest.mark.parametrize("content,message", [
    ("not json", "not a readable scores file"),
    (json.dumps({"format": "other"}), "not a curriculum scores file"),
    (json.dumps({"format": "megatron-dynamoe-curriculum-scores", "version": 2}), "version 2"),
    (json.dumps({"format": "megatron-dynamoe-curriculum-scores", "version": 1,
                 "metric": "m", "indices": [0, 1]}), "lacks \\['scores'\\]"),
    (json.dumps({"format": "megatron-dynamoe-curriculum-scores", "version": 1,
                 "metric": "m", "indices": [0, 1], "scores": [0.5]}), "2 indices but 1 scores"),
    (json.dumps({"format": "megatron-dynamoe-curriculum-scores", "version": 1,
                 "metric": "m", "indices": [0, 0], "scores": [0.5, 0.1]}), "not unique"),
    ('{"format": "megatron-dynamoe-curriculum-scores", "version": 1, "metric": "m", '
     '"indices": [0, 1], "scores": [0.5, NaN]}', "sample 1 is not finite"),
])
def test_bad_scores_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "scores.json"
    path.write_text(content)
    with pytest.raises(CurriculumError, match=message):
        load_scores(str(path))


def test_order_refuses_runs_it_does_not_cover(tmp_path):
    with pytest.raises(CurriculumError, match="does not exist"):
        load_scores(str(tmp_path / "missing.json"))
    order = CurriculumOrder(_scores(), window=10)
    with pytest.raises(CurriculumError, match="trains 120 samples"):
        order.check_covers(120, dataset_size=N)
    with pytest.raises(CurriculumError, match="does not exist in the dataset"):
        order.check_covers(80, dataset_size=50)
    with pytest.raises(CurriculumError, match="beyond the 100 scored samples"):
        order[100]
    with pytest.raises(CurriculumError, match="mode"):
        CurriculumOrder(_scores(), 10, mode="reverse")


# ---- profiling and training -------------------------------------------------------------
ARCH = get_architecture("tiny-llama")
SEQ = 32


def _dataset(rows=64, seed=0):
    """A GPTDataset-like list: sample i copies even tokens to odd positions (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, ARCH.vocab_size, (rows, SEQ + 1), generator=gen)
    table[:, 1::2] = table[:, 0::2][:, : table[:, 1::2].shape[1]]
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1).unsqueeze(0)
    return [dict(tokens=r[:-1], labels=r[1:], loss_mask=torch.ones(SEQ),
                 position_ids=torch.arange(SEQ), attention_mask=mask) for r in table]


def _provider(threshold):
    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider

    return AdaptiveMoEProvider(ARCH, AdaptiveGatingConfig(num_experts=4, threshold=threshold))


def _profile(provider, dataset, batch_size):
    from megatron_dynamoe.data.sampling import collate_samples
    from megatron_dynamoe.runtime.parallel import ParallelLayout

    torch.manual_seed(0)
    model = provider.build(provider.transformer_config(ParallelLayout()))
    batches = [collate_samples(dataset[s:s + batch_size])
               for s in range(0, len(dataset), batch_size)]
    return profile_scores(model, batches, "two-expert-share", range(len(dataset)))


def test_profile_scores_each_sequence(single_rank):
    dataset = _dataset(rows=12)
    assert set(_profile(_provider(0.0), dataset, 4).scores.tolist()) == {0.0}
    assert set(_profile(_provider(1.0), dataset, 4).scores.tolist()) == {1.0}
    batched = _profile(_provider(0.05), dataset, 4).scores
    single = _profile(_provider(0.05), dataset, 1).scores
    np.testing.assert_allclose(batched, single, atol=1e-12)   # per sequence, not per batch
    assert 0.0 < batched.min() < batched.max() < 1.0
    # the mean over 2 layers of a share of 32 tokens
    assert np.all(batched * 2 * SEQ == np.round(batched * 2 * SEQ))


def test_trainer_with_curriculum_resumes_bit_identically(single_rank, tmp_path):
    from megatron_dynamoe.runtime.parallel import initialize_parallel
    from megatron_dynamoe.training.config import TrainConfig
    from megatron_dynamoe.training.trainer import train

    provider = _provider(0.1)
    dataset = _dataset()
    scores = _profile(provider, dataset, 8)
    order = CurriculumOrder(scores, window=8, mode="global", seed=1)
    order.check_covers(6 * 8, len(dataset))
    source = curriculum_source(dataset.__getitem__, order)
    base = dict(model="tiny-llama", micro_batch_size=2, global_batch_size=8, seq_length=SEQ,
                lr=3e-3, train_iters=6, log_interval=100, seed=7)

    def run(**extra):
        cfg = TrainConfig(**{**base, **extra})
        initialize_parallel(cfg.layout, seed=cfg.seed)
        return train(cfg, provider.checkpoint_info(), source, provider=provider)

    full = run()
    first = run(save=str(tmp_path / "b"), exit_after_iters=3)
    rest = run(model=None, load=str(tmp_path / "b"), save=str(tmp_path / "b"))
    assert {**first.losses, **rest.losses} == full.losses
    assert len(full.losses) == 6 and all(np.isfinite(list(full.losses.values())))
    info = json.loads((tmp_path / "b" / "iter_0000006" / "model.json").read_text())
    assert info["extra"]["adaptive"] == provider.gating.to_dict()


def test_profile_scores_dynamoe_mean_level(single_rank):
    from megatron_dynamoe.data.sampling import collate_samples
    from megatron_dynamoe.dynamoe.config import DynaMoEConfig
    from megatron_dynamoe.dynamoe.control import set_static_level
    from tests.builders import build_dynamoe

    model = build_dynamoe(DynaMoEConfig(num_shells=4))
    dataset = _dataset(rows=3)
    set_static_level(model, 3)
    scores = profile_scores(model, [collate_samples([s]) for s in dataset], "mean-level",
                            range(3))
    assert scores.scores.tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(CurriculumError, match="one sequence per batch"):
        profile_scores(model, [collate_samples(dataset[:2])], "mean-level", range(2))
