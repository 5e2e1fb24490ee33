"""Static-sampled training (`--dynamoe-routing static-sampled`, the Flextron-style baseline):
the level sampler meets its compute target, every token of an iteration runs at the drawn
level, the routers stay untouched, checkpoints record the routing, bad input is refused."""

import io
import os

import pytest
import torch

from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo
from megatron_dynamoe.dynamoe import static_sampling
from megatron_dynamoe.training.config import TrainConfig, parse_train_args
from tests.builders import synthetic_source
# The tiny 4-layer model and starting weights of test_training (INFO's label_fraction 0.5: a
# learned run would compute labels; a static-sampled one must not).
from tests.test_training import ARCH4, INFO, initial_weights  # noqa: F401 (fixture)

FRACTIONS = INFO.dynamoe.level_fractions  # 0.25, 0.5, 0.75, 1.0
BASE = dict(model="tiny-llama", micro_batch_size=2, global_batch_size=8, seq_length=32,
            lr=3e-3, lr_warmup_iters=2, log_interval=100, dynamoe_sensitivity_min=0.3,
            seed=7, dynamoe_routing="static-sampled")
TARGETS = (0.25, 0.3, 0.45, 0.6, 0.625, 0.8, 0.95, 1.0)


def _cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, **overrides})


def _trainer(info=INFO, logger=None, **overrides):
    from megatron_dynamoe.runtime.parallel import initialize_parallel
    from megatron_dynamoe.training.trainer import Trainer

    cfg = _cfg(**overrides)
    initialize_parallel(cfg.layout, seed=cfg.seed)
    return cfg, Trainer(cfg, info, synthetic_source(), logger=logger)


def _run(info=INFO, logger=None, **overrides):
    return _trainer(info, logger, **overrides)[1].run()


def _router_weights(model) -> dict:
    from megatron_dynamoe.dynamoe.control import dynamoe_layers

    return {f"{i}.{name}": p.detach().clone() for i, layer in enumerate(dynamoe_layers(model))
            for name, p in layer.router.named_parameters()}


# ---- the sampler alone ---------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_level_distribution_is_max_entropy_with_the_target_mean(target):
    probs = static_sampling.max_entropy_level_probs(FRACTIONS, target)
    assert len(probs) == 4 and abs(sum(probs) - 1) < 1e-12
    assert static_sampling.expected_fraction(FRACTIONS, probs) == pytest.approx(target,
                                                                              abs=1e-9)
    if target == 0.25:
        assert probs == [1.0, 0.0, 0.0, 0.0]
    elif target == 1.0:
        assert probs == [0.0, 0.0, 0.0, 1.0]
    else:
        # Every level is trained, tilted monotonically towards the target's side.
        assert all(p > 0 for p in probs)
        ratios = [b / a for a, b in zip(probs, probs[1:])]
        assert all(r == pytest.approx(ratios[0], rel=1e-6) for r in ratios)
    if target == 0.625:  # the mean of the fractions: uniform
        assert probs == pytest.approx([0.25] * 4, abs=1e-9)


def test_level_distribution_refuses_a_target_outside_the_levels():
    for bad in (0.2, 1.01):
        with pytest.raises(ValueError, match="outside"):
            static_sampling.max_entropy_level_probs(FRACTIONS, bad)


def test_default_target_is_what_an_untrained_router_spends_over_the_theta_range():
    """`uniform_router_fraction` against the router's own level rule at zero logits
    (uniform levels), averaged over a fine grid of thetas in the range."""
    from megatron_dynamoe.dynamoe import routing

    q = routing.cumulative_level_probs(torch.zeros(1, 4))
    for low, high in ((0.0, 1.0), (0.3, 1.0), (0.0, 0.4), (0.6, 0.6), (1.0, 1.0)):
        thetas = torch.linspace(low, high, 20001).tolist()
        measured = sum(FRACTIONS[int(routing.levels_at_sensitivity(q, t)[0]) - 1]
                       for t in thetas) / len(thetas)
        expected = static_sampling.uniform_router_fraction(FRACTIONS, low, high)
        assert expected == pytest.approx(measured, abs=2e-3), (low, high)
    assert static_sampling.uniform_router_fraction(FRACTIONS, 0.0, 1.0) == 0.625


@pytest.mark.parametrize("target", TARGETS)
def test_fifty_draws_spend_the_target_within_two_points(target):
    """Stratified draws: any 50-iteration block (the first, a later one, any seed) spends
    the target FFN compute within 0.02; draws are a pure function of seed and iteration."""
    probs = static_sampling.max_entropy_level_probs(FRACTIONS, target)
    for seed in range(10):
        for start in (0, 50, 5000):
            levels = [static_sampling.static_level(probs, seed, i)
                      for i in range(start, start + 50)]
            mean = sum(FRACTIONS[e - 1] for e in levels) / 50
            assert abs(mean - target) <= 0.02, (seed, start, levels)
            assert levels == [static_sampling.static_level(probs, seed, i)
                              for i in range(start, start + 50)]
    # Over 20 blocks each level's share is its probability (every block within 1/50).
    levels = [static_sampling.static_level(probs, 1, i) for i in range(1000)]
    for e, p in enumerate(probs, start=1):
        assert abs(levels.count(e) / 1000 - p) <= 0.02, (e, p)


# ---- a real run ----------------------------------------------------------------------------
@pytest.mark.usefixtures("single_rank")
def test_every_token_runs_at_the_drawn_level():
    """Each iteration's routed tokens (every DynaMoE layer, every micro-batch) are all at the
    level the sampler drew for it; the measured FFN compute is that level's fraction; no
    labels and no router gradients; the routers keep their weights."""
    from megatron_dynamoe.dynamoe.control import dynamoe_layers
    from megatron_dynamoe.dynamoe.layer import read_stat_sums
    from megatron_dynamoe.training.monitor import reset_stats

    cfg, trainer = _trainer(train_iters=8, dynamoe_static_target_fraction=0.6,
                            weight_decay=0.1)
    target, probs = trainer.static_plan
    assert target == 0.6
    layers = dynamoe_layers(trainer.model)
    assert len(layers) == 4
    assert all(not p.requires_grad for layer in layers for p in layer.router.parameters())
    routers = _router_weights(trainer.model)
    tokens = cfg.global_batch_size * cfg.seq_length
    levels = []
    for iteration in range(6):
        step = trainer.train_step()
        assert step.level == static_sampling.static_level(probs, cfg.seed, iteration)
        levels.append(step.level)
        for layer, sums in zip(layers, read_stat_sums(layers)):
            summary = layer.summarize_stats(sums)
            expected = [0.0] * 4
            expected[step.level - 1] = float(tokens)
            assert summary["level_counts"] == expected, (iteration, summary["level_counts"])
            assert summary["ffn_fraction"] == FRACTIONS[step.level - 1]
            assert summary["labelled_forwards"] == 0 and summary["forwards"] == 4
        reset_stats(trainer.model)
    assert len(set(levels)) > 1, levels  # the level really changes between iterations
    after = _router_weights(trainer.model)
    assert all(torch.equal(routers[k], after[k]) for k in routers)
    # The trainer's own draws over 50 iterations meet the target within two points.
    draws = [static_sampling.static_level(probs, cfg.seed, i) for i in range(50)]
    assert abs(sum(FRACTIONS[e - 1] for e in draws) / 50 - target) <= 0.02


@pytest.mark.usefixtures("single_rank")
def test_learned_runs_draw_no_level():
    from megatron_dynamoe.dynamoe.control import dynamoe_layers

    cfg, trainer = _trainer(train_iters=3, dynamoe_routing="learned")
    assert trainer.static_plan is None and trainer.train_step().level is None
    assert all(p.requires_grad for layer in dynamoe_layers(trainer.model)
               for p in layer.router.parameters())


def _load_dynamoe(folder):
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint, read_info
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model
    from megatron_dynamoe.models.registry import family_of

    info = read_info(folder)
    assert family_of(info) == "dynamoe"
    model = build_gpt_model(ARCH4, transformer_config(ARCH4, dynamoe=info.dynamoe),
                            info.dynamoe)
    load_checkpoint(model, folder)
    return info, model


@pytest.mark.usefixtures("single_rank")
def test_checkpoint_records_the_routing_keeps_the_routers_and_resumes(initial_weights,
                                                                      tmp_path):
    from megatron_dynamoe.training.trainer import (
        ROUTING_KEY,
        STATIC_PROBS_KEY,
        STATIC_TARGET_KEY,
    )

    student, _ = initial_weights
    start = dict(model=None, pretrained_checkpoint=student, train_iters=4, weight_decay=0.1)
    full = _run(**start, save=str(tmp_path / "full"))
    info, trained = _load_dynamoe(str(tmp_path / "full" / "iter_0000004"))
    assert info.extra[ROUTING_KEY] == "static-sampled"
    # Default target: the theta range [0.3, 1] with an untrained router.
    target = static_sampling.uniform_router_fraction(FRACTIONS, 0.3, 1.0)
    assert info.extra[STATIC_TARGET_KEY] == target
    assert info.extra[STATIC_PROBS_KEY] == static_sampling.max_entropy_level_probs(FRACTIONS,
                                                                                   target)
    assert info.dynamoe == INFO.dynamoe  # labels were off, the recorded config is not
    _, initial = _load_dynamoe(student)
    before, after = _router_weights(initial), _router_weights(trained)
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [n for (n, a), (_, b) in zip(initial.named_parameters(), trained.named_parameters())
               if "router" not in n and not torch.equal(a, b)]
    assert any("experts" in n for n in changed), changed  # the shells did train

    # A stopped and resumed static-sampled run draws the same levels: bit-identical.
    first = _run(**start, save=str(tmp_path / "half"), exit_after_iters=2)
    rest = _run(**{**start, "pretrained_checkpoint": None}, load=str(tmp_path / "half"),
                save=str(tmp_path / "half"))
    assert {**first.losses, **rest.losses} == full.losses
    # ... and only as a static-sampled run.
    with pytest.raises(ValueError, match="--dynamoe-routing learned: .* resumes a "
                                         "static-sampled run"):
        _trainer(load=str(tmp_path / "half"), save=str(tmp_path / "half"), model=None,
                 dynamoe_routing="learned")
    # ... and only with the levels drawn for the same target (explicit, or from theta range).
    for other in (dict(dynamoe_static_target_fraction=0.5), dict(dynamoe_sensitivity_min=0.5)):
        with pytest.raises(ValueError, match=f"target FFN fraction of {target:g} .* "
                                             f"--dynamoe-static-target-fraction {target:g}"):
            _trainer(load=str(tmp_path / "half"), save=str(tmp_path / "half"), model=None,
                     **other)

    # A learned run started from the static checkpoint does not inherit its routing keys.
    _run(model=None, pretrained_checkpoint=str(tmp_path / "full" / "iter_0000004"),
         train_iters=1, lr_warmup_iters=0, dynamoe_routing="learned",
         save=str(tmp_path / "learned"))
    info, _ = _load_dynamoe(str(tmp_path / "learned" / "iter_0000001"))
    assert not {ROUTING_KEY, STATIC_TARGET_KEY, STATIC_PROBS_KEY} & set(info.extra)


@pytest.mark.usefixtures("single_rank")
def test_distillation_works_the_same(initial_weights):
    """Distillation is unchanged: at target 1 every token runs the whole FFN, so the MoEfied
    student is its dense teacher and the first step's KL vanishes; lower targets give a KL."""
    student, teacher = initial_weights
    common = dict(model=None, pretrained_checkpoint=student, dynamoe_distill_teacher=teacher,
                  train_iters=2, lr_warmup_iters=0)
    dense = _run(**common, dynamoe_static_target_fraction=1.0)
    assert -1e-8 <= dense.distill_kl[1] < 1e-7, dense.distill_kl
    cut = _run(**common, dynamoe_static_target_fraction=0.25)
    assert all(kl > 1e-6 for kl in cut.distill_kl.values()), cut.distill_kl


@pytest.mark.usefixtures("single_rank")
def test_log_line_and_tensorboard_show_the_level(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_dynamoe.training.monitor import TrainingMonitor
    from megatron_dynamoe.training.trainer import static_sampling_plan

    cfg = _cfg(train_iters=3, log_interval=1, tensorboard_dir=str(tmp_path / "tb"))
    stream = io.StringIO()
    monitor = TrainingMonitor(cfg, stream=stream)
    _, probs = static_sampling_plan(cfg, INFO.dynamoe)
    try:
        _run(logger=monitor, train_iters=3, log_interval=1)
    finally:
        monitor.close()
    levels = [static_sampling.static_level(probs, cfg.seed, i) for i in range(3)]
    lines = [line for line in stream.getvalue().splitlines() if " iteration " in line]
    assert len(lines) == 3
    for line, level in zip(lines, levels):
        assert f"| level: {level} | FFN compute: {FRACTIONS[level - 1]:.3f} |" in line, line
        assert "theta" not in line
    assert "static-sampled routing: one level per iteration" in stream.getvalue()
    acc = EventAccumulator(cfg.tensorboard_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("dynamoe/static-level")] == levels
    assert [e.value for e in acc.Scalars("dynamoe/ffn-compute-fraction")] == [
        FRACTIONS[e - 1] for e in levels]
    assert "dynamoe/sensitivity" not in acc.Tags()["scalars"]


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, phrase", [
    ("--dense", "--dynamoe-routing static-sampled trains a DynaMoE model"),
    ("--dynamoe-static-target-fraction 0", "--dynamoe-static-target-fraction 0.0 is out of "
                                           "range: give a value in (0, 1]"),
    ("--dynamoe-static-target-fraction 1.5", "--dynamoe-static-target-fraction 1.5 is out of"),
    ("--dynamoe-static-target-fraction nan", "--dynamoe-static-target-fraction nan: give a "
                                             "finite number"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(flags, phrase):
    argv = ["--model", "tiny-llama", "--dynamoe-routing", "static-sampled", *flags.split()]
    with pytest.raises(ValueError) as error:
        parse_train_args(argv)
    assert phrase in str(error.value) and "\n" not in str(error.value)


def test_routing_choice_and_target_without_static_are_refused():
    with pytest.raises(ValueError, match="--dynamoe-routing 'random': choose one of learned, "
                                         "static-sampled"):
        parse_train_args(["--model", "tiny-llama", "--dynamoe-routing", "random"])
    with pytest.raises(ValueError, match="--dynamoe-static-target-fraction needs "
                                         "--dynamoe-routing static-sampled"):
        parse_train_args(["--model", "tiny-llama", "--dynamoe-static-target-fraction", "0.5"])
    assert parse_train_args(["--model", "tiny-llama"]).dynamoe_routing == "learned"


@pytest.mark.usefixtures("single_rank")
def test_model_dependent_input_is_refused_before_building():
    """Below the model's level-1 fraction, or a model without DynaMoE layers."""
    from megatron_dynamoe.training.trainer import static_sampling_plan

    with pytest.raises(ValueError) as error:
        static_sampling_plan(_cfg(dynamoe_static_target_fraction=0.2), INFO.dynamoe)
    assert str(error.value).startswith("--dynamoe-static-target-fraction 0.2 is out of range: "
                                       "give a value in [0.25, 1]")
    with pytest.raises(ValueError, match="--dynamoe-routing static-sampled needs a DynaMoE "
                                         "model, not a dense one"):
        _trainer(info=CheckpointInfo(ARCH4, None, {}))


# ---- layouts -------------------------------------------------------------------------------
def _layout_worker(rank, world_size, layout, out, student):
    result = _run(**layout, model=None, pretrained_checkpoint=student, train_iters=4,
                  weight_decay=0.1)
    if result.losses:
        torch.save(result.losses, f"{out}.rank{rank}.pt")


STATIC_LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "ep2": dict(expert_model_parallel_size=2),
}


@pytest.mark.slow  # ~30 s; the learned runs' layouts are compared in the default tests
@pytest.mark.multiproc
def test_layouts_match_one_process(initial_weights, tmp_path):
    """Frozen routers under DDP / the distributed optimizer at TP / PP / EP = 2 (every rank
    draws the same level): the same loss curve as one process."""
    from tests.multiproc import run_processes

    student, _ = initial_weights
    run_processes(_layout_worker, 1, {}, str(tmp_path / "ref"), student)
    reference = torch.load(tmp_path / "ref.rank0.pt")
    assert sorted(reference) == [1, 2, 3, 4]
    for name, layout in STATIC_LAYOUTS.items():
        run_processes(_layout_worker, 2, layout, str(tmp_path / name), student)
        found = [f for f in os.listdir(tmp_path) if f.startswith(name + ".rank")]
        assert found, name
        for f in found:
            losses = torch.load(tmp_path / f)
            for it, value in reference.items():
                assert abs(losses[it] - value) <= 1e-5 * abs(value), (name, it, losses, value)
