"""--router-lr-mult: Megatron's parameter groups give the routers their own learning rate.

The trainer's `optimizer_overrides` + `build_scheduler` with Megatron's DDP, distributed
optimizer and OptimizerParamScheduler on a tiny DynaMoE model: during warm-up and after decay
every router parameter's learning rate is `mult` times every other parameter's, and the
default (mult 1) builds exactly Megatron's standard groups.
"""

import math

import pytest
import torch

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.training.config import TrainConfig
from megatron_dynamoe.training.trainer import build_scheduler, optimizer_overrides
from tests.builders import build_dense, build_dynamoe, moefied_state

pytestmark = pytest.mark.usefixtures("single_rank")


def _optimizer(cfg, distributed=False):
    """Megatron optimizer over a DDP-wrapped tiny DynaMoE model. Without the distributed
    optimizer its param groups hold the model's own parameters, so groups can be told apart
    by parameter identity."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dyn = DynaMoEConfig()
    model = build_dynamoe(dyn)
    model.load_state_dict(moefied_state(build_dense(seed=3), dyn))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed), module=model)
    config = OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr,
                             use_distributed_optimizer=distributed)
    optimizer = get_megatron_optimizer(config, [ddp],
                                       config_overrides=optimizer_overrides(cfg, config))
    router_ids = {id(p) for n, p in model.named_parameters() if ".mlp.router." in n}
    assert len(router_ids) == 4  # weight and bias of both layers' routers
    return optimizer, router_ids


def _learning_rates(optimizer, router_ids):
    """(router lrs, other lrs): the learning rates the parameters of each kind see."""
    routers, others = set(), set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            (routers if id(p) in router_ids else others).add(round(group["lr"], 12))
    return routers, others


@pytest.mark.parametrize("mult", [1.0, 10.0, 0.5])
def test_router_learning_rate_follows_the_multiplier(mult):
    cfg = TrainConfig(model="tiny-llama", lr=2e-3, min_lr=2e-4, lr_warmup_iters=4,
                      train_iters=20, router_lr_mult=mult)
    optimizer, router_ids = _optimizer(cfg)
    if mult == 1.0:
        assert optimizer_overrides(cfg, None) is None  # Megatron's own default groups
    scheduler = build_scheduler(cfg, optimizer)
    for step, base in ((1, 2e-3 * 1 / 4), (4, 2e-3), (20, 2e-4)):
        scheduler.step(increment=step - scheduler.num_steps)
        routers, others = _learning_rates(optimizer, router_ids)
        assert others == {round(base, 12)}, (step, others)
        assert routers == {round(base * mult, 12)}, (step, routers)
    # Half-way through the cosine decay the ratio holds too.
    scheduler.step(increment=12 - scheduler.num_steps)
    routers, others = _learning_rates(optimizer, router_ids)
    expected = 2e-4 + 0.5 * (2e-3 - 2e-4) * (1 + math.cos(math.pi * 8 / 16))
    assert others == {round(expected, 12)} and routers == {round(expected * mult, 12)}


def test_distributed_optimizer_gets_the_router_groups_too():
    cfg = TrainConfig(model="tiny-llama", lr=2e-3, min_lr=2e-4, train_iters=20,
                      router_lr_mult=10.0)
    optimizer, _ = _optimizer(cfg, distributed=True)
    build_scheduler(cfg, optimizer)
    peaks = {round(group["max_lr"], 12) for group in optimizer.param_groups}
    assert peaks == {2e-3, 2e-2}


def test_router_lr_mult_validated():
    with pytest.raises(ValueError, match="--router-lr-mult"):
        TrainConfig(model="tiny-llama", router_lr_mult=0.0)
