"""The fine-tuning loop on Megatron-Core's machinery.

Megatron's own pieces do the work: `get_forward_backward_func` schedules (pipeline
parallelism with micro-batches), `DistributedDataParallel` + the distributed optimizer
(`get_megatron_optimizer`), `OptimizerParamScheduler` (warm-up and decay), gradient clipping,
`finalize_model_grads` (DP / sequence-parallel / embedding reductions). This module wires
them to a DynaMoE model, samples the sensitivity for each iteration, saves resumable
checkpoints (every `--save-interval` iterations and on SIGTERM / SIGUSR1) and logs.

Data comes from a `BatchSource`: `source(consumed_samples, micro_batch_size)` returns this
data-parallel rank's next micro-batch (tokens, labels, loss_mask, position_ids,
attention_mask) as a pure function of the global sample position, which is what makes
resumption exact.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_dynamoe.runtime.device import place_batch
from megatron_dynamoe.training.config import TrainConfig

BatchSource = Callable[[int, int], Dict[str, torch.Tensor]]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stops before the optimizer step, no checkpoint
    is written, and the latest checkpoint in --save stays the last good one."""

    def __init__(self, iteration: int, cfg: TrainConfig, detail: str):
        self.iteration = iteration
        where = (f"; the latest checkpoint in {cfg.save} is the last good one" if cfg.save
                 else "")
        import re

        found = re.search(r"message='([^']+)'", detail)  # Megatron's rerun-machine text
        detail = found.group(1) if found else (detail.strip().splitlines() or ["?"])[-1]
        super().__init__(f"non-finite gradients at iteration {iteration} ({detail[:200]}): "
                         f"training stopped before the optimizer step{where}; lower --lr or "
                         f"check the data")


@dataclass
class TrainResult:
    """What a run did: per-iteration LM loss (on last-stage ranks, DP-averaged), the last
    iteration reached, whether it stopped for a preemption signal, and the trained model."""

    losses: Dict[int, float] = field(default_factory=dict)
    distill_kl: Dict[int, float] = field(default_factory=dict)  # with distillation only
    model: Optional[torch.nn.Module] = None  # this rank's trained ModelChunks
    iteration: int = 0
    consumed_samples: int = 0
    stopped_by_signal: bool = False
    trained_iterations: int = 0  # iterations this run did (0: stopped during start-up)


def sample_sensitivity(cfg: TrainConfig, iteration: int) -> float:
    """The theta of `iteration`: uniform in [min, max], the same on every rank (a generator
    seeded by seed and iteration, so a resumed run draws the same thetas)."""
    if cfg.dynamoe_sensitivity_min == cfg.dynamoe_sensitivity_max:
        return cfg.dynamoe_sensitivity_min
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    u = torch.rand((), generator=g, dtype=torch.float64).item()
    return cfg.dynamoe_sensitivity_min + u * (cfg.dynamoe_sensitivity_max
                                              - cfg.dynamoe_sensitivity_min)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Masked mean of Megatron's per-token losses [b, s]; the report is a detached clone
    (Megatron's schedule divides the returned loss in place)."""
    mask = loss_mask.reshape(-1).float()
    loss = (output.float().reshape(-1) * mask).sum() / mask.sum().clamp_min(1.0)
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"])
    return output, functools.partial(_loss_func, batch["loss_mask"])


def _distill_loss_func(batch: Dict[str, torch.Tensor], weight: float, temperature: float,
                       logits: torch.Tensor):
    """Last-stage loss with distillation: `logits` are the student's [b, s, V / TP]."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_dynamoe.training.distillation import distillation_loss

    # Megatron's own vocab-parallel CE, in its [s, b] layout (as GPTModel computes it).
    lm = tensor_parallel.vocab_parallel_cross_entropy(
        logits.transpose(0, 1).contiguous().float(),
        batch["labels"].transpose(0, 1).contiguous()).transpose(0, 1)
    return distillation_loss(lm, logits, batch["teacher_logits"], batch["loss_mask"],
                             weight=weight, temperature=temperature,
                             group=parallel_state.get_tensor_model_parallel_group())


def _distill_forward_step(weight: float, temperature: float, data_iterator, model):
    batch = next(data_iterator)
    # No labels: the last stage returns logits, and the loss (LM + KL) is computed here.
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    return output, functools.partial(_distill_loss_func, batch, weight, temperature)


class _MicroBatches:
    """Iterator over this rank's micro-batches of one iteration (micro-batch m of DP rank r
    starts at global sample start + (m * dp_size + r) * micro_batch_size); `extra[m]` (the
    teacher's logits) is attached to micro-batch m when given."""

    def __init__(self, source: BatchSource, start: int, micro_batch_size: int, count: int,
                 dp_rank: int, dp_size: int, teacher_logits: Optional[list] = None):
        from megatron_dynamoe.data.datasets import micro_batch_starts

        self._positions = micro_batch_starts(start, micro_batch_size, count, dp_rank, dp_size)
        self._source, self._mbs = source, micro_batch_size
        self._teacher_logits, self._index = teacher_logits, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._index == len(self._positions):
            raise StopIteration
        # The one way a batch reaches the model's device (pinned, non-blocking on a GPU).
        batch = place_batch(self._source(self._positions[self._index], self._mbs))
        if self._teacher_logits:
            batch["teacher_logits"] = self._teacher_logits[self._index]
        self._index += 1
        return batch


def build_scheduler(cfg: TrainConfig, optimizer):
    """Megatron's OptimizerParamScheduler in units of iterations."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.lr_warmup_iters else cfg.lr, max_lr=cfg.lr,
        min_lr=cfg.min_lr, lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=cfg.train_iters, lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant")


def optimizer_overrides(cfg: TrainConfig, optimizer_config):
    """Megatron's per-parameter-group overrides for this run: the standard ones (no weight
    decay on biases and 1-d parameters) plus, with --router-lr-mult, the routers' own peak
    and minimum learning rates. None (Megatron's default, the standard ones) when the
    multiplier is 1, so default runs build exactly Megatron's parameter groups."""
    if cfg.router_lr_mult == 1.0:
        return None
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(optimizer_config)
    overrides[ParamKey(name="*.mlp.router.*")] = ParamGroupOverride(
        max_lr=cfg.lr * cfg.router_lr_mult, min_lr=cfg.min_lr * cfg.router_lr_mult)
    return overrides


def reset_megatron_moe_state() -> None:
    """Clear Megatron's process-global MoE state, at the start and end of every run.

    The side-loss gradient scale (`MoEAuxLossAutoScaler`) is class state: the schedule sets it
    to 1 / micro-batches, and a backward outside a schedule leaves a 0-d tensor that the
    schedule's [1]-shaped scale cannot be copied into. The layer-wise aux-loss tracker sizes
    each loss's buffer by the first model's layer count, so a later model with more layers
    would index past it. Megatron-LM gets away with both (one model per process); a library
    process may train, evaluate and build several models.
    """
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_layer_wise_logging_tracker,
    )

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    get_moe_layer_wise_logging_tracker().clear()


def build_teacher(cfg: TrainConfig, model_info, layout_config):
    """The frozen dense teacher for --dynamoe-distill-teacher, at the student's layout."""
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointError, load_checkpoint, read_info
    from megatron_dynamoe.models.builder import ModelProvider, build_model_chunks
    from megatron_dynamoe.training.distillation import FrozenTeacher

    info = read_info(cfg.dynamoe_distill_teacher)
    arch = info.architecture if info is not None else model_info.architecture
    if info is not None and info.dynamoe is not None:
        raise CheckpointError(f"--dynamoe-distill-teacher {cfg.dynamoe_distill_teacher!r} is a "
                              f"DynaMoE checkpoint: distil from the dense model it was made "
                              f"from (tools/convert_checkpoint.py output)")
    if arch != model_info.architecture:
        raise CheckpointError(f"--dynamoe-distill-teacher {cfg.dynamoe_distill_teacher!r} has "
                              f"another architecture than the model being trained: use the "
                              f"dense checkpoint this model was MoEfied from")
    provider = ModelProvider(arch, None)
    config = provider.transformer_config(
        cfg.layout, sequence_parallel=cfg.sequence_parallel,
        params_dtype=layout_config.params_dtype, perform_initialization=False)
    chunks = build_model_chunks(provider, config)
    load_checkpoint(chunks, cfg.dynamoe_distill_teacher, origin="the distillation teacher",
                    verify_checksums=cfg.verify_checksums)
    return FrozenTeacher(chunks)


def check_checkpoint_space(save: str, model, optimizer, distributed_optimizer: bool) -> None:
    """Refuse to start training when `save`'s file system cannot hold one more checkpoint
    (a full disk would otherwise surface at the first save, after hours of work). The size
    is estimated from this run's tensors: every rank's parameters and optimizer state (fp32
    master weights and Adam moments), summed over ranks by one all-reduce at start-up."""
    import os
    import shutil

    from megatron.core import parallel_state

    from megatron_dynamoe.checkpoint.torch_dist import CheckpointError
    from megatron_dynamoe.runtime.device import any_rank, comm_device

    weights = sum(p.numel() * p.element_size() for chunk in model for p in chunk.parameters())
    state = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        # Adam keeps two fp32 moments (+ an fp32 master copy with bf16 weights) per element.
        per_element = 8 + (4 if getattr(opt.config, "bf16", False) else 0)
        state += per_element * sum(p.numel() for g in opt.optimizer.param_groups
                                   for p in g["params"])
    total = torch.tensor([weights, state], dtype=torch.int64, device=comm_device())
    dist.all_reduce(total)
    weights, state = total.tolist()
    # Data-parallel replicas hold the same weights (written once); the distributed
    # optimizer's state shards are disjoint over DP, a plain optimizer's are replicas.
    dp = parallel_state.get_data_parallel_world_size()
    needed = weights // dp + (state if distributed_optimizer else state // dp)
    existing = os.path.abspath(save)
    while not os.path.exists(existing):  # rank 0 may not have created --save yet
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    # Rank 0 (which creates the folders) decides for all: no rank may be left waiting.
    if any_rank(dist.get_rank() == 0 and free < needed):
        raise CheckpointError(f"--save {save} has too little free space (rank 0 sees "
                              f"{free / 2**30:.2f} GiB), but one "
                              f"checkpoint of this run needs about {needed / 2**30:.2f} GiB: "
                              f"free space there or choose another --save")


def build_training_model(cfg: TrainConfig, provider):
    """(TransformerConfig, ModelChunks) of this rank for `cfg`, on the device policy's device
    and not yet DDP-wrapped. Seeded by --seed; with --load / --pretrained-checkpoint no
    random-init work is done (the checkpoint replaces every weight), as in Megatron-LM."""
    from megatron_dynamoe.models.architectures import skip_random_init
    from megatron_dynamoe.models.builder import build_model_chunks

    config = provider.transformer_config(
        cfg.layout, sequence_parallel=cfg.sequence_parallel,
        moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        **cfg.recompute_overrides())
    if cfg.load or cfg.pretrained_checkpoint:
        skip_random_init(config)
    torch.manual_seed(cfg.seed)
    return config, build_model_chunks(provider, config)


def train(cfg: TrainConfig, model_info, source: BatchSource, logger=None,
          on_iteration: Optional[Callable[[int], None]] = None,
          provider=None, preemption_flag=None) -> TrainResult:
    """Run (or resume) training. `model_info` is a CheckpointInfo describing the model
    (architecture + DynaMoE config); `provider` (a `model_builder.ModelProvider`, default:
    the DynaMoE / dense model of `model_info`) builds it. Parallel groups must be
    initialised for `cfg.layout`. `preemption_flag` (a `preemption.PreemptionFlag` the
    caller installed before its own start-up work) lets a signal received while the model
    and data load end the run before its first iteration, with no checkpoint written;
    without one, the trainer installs its own for the loop."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint
    from megatron_dynamoe.models.builder import (
        ModelProvider,
        set_sensitivity,
        set_training_step,
    )
    from megatron_dynamoe.models.registry import with_family
    from megatron_dynamoe.training import preemption
    from megatron_dynamoe.training.state import (
        latest_checkpoint,
        load_training_state,
        save_training_state,
    )

    if provider is None:
        provider = ModelProvider(model_info.architecture, model_info.dynamoe)
    reset_megatron_moe_state()
    config, model = build_training_model(cfg, provider)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=cfg.check_for_nan_in_loss_and_grad)
    # Megatron buckets only the first chunk's gradients for overlap; later chunks reduce
    # at the end of the step (the same choice as Megatron's training loop).
    ddps = [DistributedDataParallel(config, ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(model)]
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(optimizer_config, ddps,
                                       config_overrides=optimizer_overrides(cfg,
                                                                            optimizer_config))
    scheduler = build_scheduler(cfg, optimizer)
    config.no_sync_func = ([d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    iteration, consumed = 0, 0
    resume = latest_checkpoint(cfg.load) if cfg.load else None
    if resume is not None:
        iteration, consumed = load_training_state(resume[1], model, optimizer, scheduler,
                                                  verify_checksums=cfg.verify_checksums)
        if logger:
            logger.text(f"resumed from {resume[1]} at iteration {iteration}")
    elif cfg.pretrained_checkpoint or cfg.load:
        # A model checkpoint (not a training one): weights only, fresh optimizer.
        load_checkpoint(model, cfg.pretrained_checkpoint or cfg.load,
                        verify_checksums=cfg.verify_checksums)
        optimizer.reload_model_params()
    if cfg.save:
        check_checkpoint_space(cfg.save, model, optimizer, cfg.use_distributed_optimizer)
    teacher = build_teacher(cfg, model_info, config) if cfg.dynamoe_distill_teacher else None
    forward_step = (functools.partial(_distill_forward_step, cfg.dynamoe_distill_weight,
                                      cfg.dynamoe_distill_temperature)
                    if teacher else _forward_step)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_micro = cfg.num_microbatches(dp_size)
    forward_backward = get_forward_backward_func()
    result = TrainResult(iteration=iteration, consumed_samples=consumed)
    stop = preemption_flag if preemption_flag is not None else preemption.PreemptionFlag()
    started_iter = iteration

    def micro_batches(start: int, teacher_logits=None) -> list:
        # One iterator per model chunk (the interleaved schedule pulls from each).
        return [_MicroBatches(source, start, cfg.micro_batch_size, num_micro, dp_rank, dp_size,
                              teacher_logits) for _ in model]

    try:
        with stop.installed():
            if stop.agreed():
                # Signalled during start-up: nothing was trained since the last checkpoint,
                # so there is nothing to save; the requeued job starts where this one did.
                if logger:
                    logger.text("preemption signal received during start-up: exiting before "
                                "the first iteration (no checkpoint written)")
                result.stopped_by_signal = True
            while iteration < cfg.train_iters and not result.stopped_by_signal:
                tic = time.time()
                theta = sample_sensitivity(cfg, iteration)
                set_sensitivity(model, theta)
                set_training_step(model, iteration)
                teacher_logits = None
                if teacher is not None:
                    teacher_logits = teacher.logits_for(
                        functools.partial(micro_batches, consumed), num_micro, cfg.seq_length,
                        cfg.micro_batch_size)
                for ddp in ddps:
                    ddp.zero_grad_buffer()
                optimizer.zero_grad()
                iterators = micro_batches(consumed, teacher_logits)
                try:
                    reports = forward_backward(
                        forward_step_func=forward_step,
                        data_iterator=iterators if len(iterators) > 1 else iterators[0],
                        model=ddps, num_microbatches=num_micro, seq_length=cfg.seq_length,
                        micro_batch_size=cfg.micro_batch_size, forward_only=False)
                except RuntimeError as e:
                    # Megatron's gradient check (check_for_nan_in_grad) runs on every rank
                    # before the reduction, so every rank with a non-finite gradient stops
                    # here, before the optimizer touches the weights.
                    if "found NaN" in str(e) or "found Inf" in str(e):
                        raise TrainingDiverged(iteration + 1, cfg, str(e)) from e
                    raise
                ok, grad_norm, _ = optimizer.step()
                if ok:
                    scheduler.step(increment=1)
                iteration += 1
                consumed += cfg.global_batch_size
                loss = _dp_mean_loss(reports)
                if loss is not None:
                    result.losses[iteration] = loss
                if teacher is not None and reports:
                    result.distill_kl[iteration] = _dp_mean_loss(reports, "distill kl")
                if logger:
                    logger.iteration(iteration, cfg, loss=loss, theta=theta, grad_norm=grad_norm,
                                     lr=scheduler.get_lr(optimizer.param_groups[0]),
                                     seconds=time.time() - tic, model=model,
                                     skipped=not ok,
                                     scalars=functools.partial(provider.scalars, model),
                                     distill_kl=result.distill_kl.get(iteration))
                if on_iteration:
                    on_iteration(iteration)
                stop_now = stop.agreed()
                exit_now = bool(cfg.exit_after_iters
                                and iteration - started_iter >= cfg.exit_after_iters)
                interval_save = cfg.save_interval and iteration % cfg.save_interval == 0
                if cfg.save and (interval_save or stop_now or exit_now
                                 or iteration == cfg.train_iters):
                    info = with_family(model_info, provider.family)
                    folder = save_training_state(
                        cfg.save, iteration, model, optimizer, scheduler, consumed, info,
                        optimizer_sharding=("fully_reshardable"
                                            if cfg.dist_ckpt_optim_fully_reshardable else None))
                    if logger:
                        logger.text(f"saved {folder}")
                if stop_now or exit_now:
                    result.stopped_by_signal = stop_now
                    break
    finally:
        reset_megatron_moe_state()
    result.iteration, result.consumed_samples, result.model = iteration, consumed, model
    result.trained_iterations = iteration - started_iter
    return result


def _dp_mean_loss(reports: List[dict], key: str = "lm loss") -> Optional[float]:
    """Mean of `key` over this iteration's micro-batch reports, averaged over data-parallel
    ranks (None off the last pipeline stage, which computes no loss)."""
    from megatron.core import parallel_state

    if not reports:
        return None
    local = torch.stack([r[key] for r in reports]).mean().double()
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(local, group=group)
        local /= dist.get_world_size(group)
    value = local.item()
    return value if math.isfinite(value) else float("nan")
