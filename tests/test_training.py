"""The trainer on Megatron-Core's machinery: loss falls, layouts agree with one process,
resume after a stop is bit-identical, TensorBoard holds the tags."""

import os

import pytest
import torch

from megatron_dynamoe.architectures import get_architecture
from megatron_dynamoe.checkpointing import CheckpointInfo
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.training.config import TrainConfig
from tests.builders import synthetic_source
from tests.multiproc import run_processes

INFO = CheckpointInfo(get_architecture("tiny-llama"),
                      DynaMoEConfig(label_fraction=0.5, label_tolerance=0.3), {})
BASE = dict(model="tiny-llama", micro_batch_size=2, global_batch_size=8, seq_length=32,
            lr=3e-3, lr_warmup_iters=2, log_interval=100, dynamoe_sensitivity_min=0.3,
            seed=7)


def _run(layout=None, **overrides):
    from megatron_dynamoe.parallel import initialize_parallel
    from megatron_dynamoe.training.trainer import train

    cfg = TrainConfig(**{**BASE, **(layout or {}), **overrides})
    initialize_parallel(cfg.layout, seed=cfg.seed)
    return train(cfg, INFO, synthetic_source())


@pytest.mark.usefixtures("single_rank")
def test_loss_falls_and_resume_is_bit_identical(tmp_path):
    full = _run(train_iters=12, save=str(tmp_path / "a"), save_interval=6)
    losses = [full.losses[i] for i in range(1, 13)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    first = _run(train_iters=12, save=str(tmp_path / "b"), exit_after_iters=5)
    assert first.iteration == 5 and first.consumed_samples == 40
    assert os.path.isdir(tmp_path / "b" / "iter_0000005")
    rest = _run(train_iters=12, model=None, load=str(tmp_path / "b"), save=str(tmp_path / "b"))
    resumed = {**first.losses, **rest.losses}
    assert resumed == full.losses  # bit-identical on CPU
    # the latest pointer names the final, complete checkpoint
    with open(tmp_path / "b" / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "12"


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory, single_rank):
    """One set of starting weights (a MoEfied tiny LLaMA with random routers) for every
    layout: random initialisation itself depends on the layout."""
    from megatron_dynamoe.checkpointing import save_checkpoint
    from tests.builders import build_dense, build_dynamoe, moefied_state

    folder = str(tmp_path_factory.mktemp("init") / "dynamoe")
    model = build_dynamoe(INFO.dynamoe)
    model.load_state_dict(moefied_state(build_dense(seed=3), INFO.dynamoe, router_seed=4))
    save_checkpoint(model, folder, INFO)
    return folder


def _layout_worker(rank, world_size, layout, out, weights):
    result = _run(layout, train_iters=4, model=None, pretrained_checkpoint=weights)
    if result.losses:
        torch.save(result.losses, f"{out}.rank{rank}.pt")


LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "ep2": dict(expert_model_parallel_size=2),
    "dp2": dict(),
}


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory, initial_weights):
    out = str(tmp_path_factory.mktemp("reference") / "ref")
    run_processes(_layout_worker, 1, {}, out, initial_weights)
    return torch.load(out + ".rank0.pt")


@pytest.mark.multiproc
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_single_process_loss_curve(name, tmp_path, initial_weights,
                                                  reference_curve):
    run_processes(_layout_worker, 2, LAYOUTS[name], str(tmp_path / name), initial_weights)
    reference = reference_curve
    found = [f for f in os.listdir(tmp_path) if f.startswith(name)]
    assert found, "no rank reported losses"
    for f in found:
        losses = torch.load(tmp_path / f)
        assert sorted(losses) == sorted(reference)
        for it, value in reference.items():
            assert abs(losses[it] - value) <= 1e-5 * abs(value), (name, it, losses[it], value)
