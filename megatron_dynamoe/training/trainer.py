"""The fine-tuning loop on Megatron-Core's machinery.

Megatron's own pieces do the work: `get_forward_backward_func` schedules (pipeline
parallelism with micro-batches), `DistributedDataParallel` + the distributed optimizer
(`get_megatron_optimizer`), `OptimizerParamScheduler` (warm-up and decay), gradient clipping,
`finalize_model_grads` (DP / sequence-parallel / embedding reductions).

`Trainer` wires them to a DynaMoE model, in the shape of torchtitan's trainer: constructing
it does the start-up work (model, DDP, optimizer, scheduler, resume or pretrained weights,
the distillation teacher); `train_step()` does one iteration (samples the sensitivity,
forward / backward, optimizer step) and returns a `StepResult`, without logging or saving;
`run()` is the loop around it that logs, saves resumable checkpoints (every
`--save-interval` iterations, at the end and on SIGTERM / SIGUSR1) and returns a
`TrainResult`. `train(...)` is `Trainer(...).run()`.

`--dynamoe-routing static-sampled` trains the Flextron-style baseline on the same data,
schedule and distillation: each iteration puts every token at one nested level drawn for it
(`dynamoe.static_sampling`); the routers are frozen (no gradients, no optimizer state, so
DDP never waits for them) and compute no labels, and saves record the routing in model.json.

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
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_dynamoe.runtime.device import place_batch
from megatron_dynamoe.training.config import STATIC_SAMPLED, TrainConfig

BatchSource = Callable[[int, int], Dict[str, torch.Tensor]]

# model.json `extra` of a static-sampled run's saves: the routing it was trained with, its
# target FFN fraction and level probabilities. A learned run's saves carry none of them.
ROUTING_KEY = "training_routing"
STATIC_TARGET_KEY = "static_target_fraction"
STATIC_PROBS_KEY = "static_level_probs"
# ... and of a --trainable-params ffn run's saves (absent: every parameter trained).
TRAINABLE_KEY = "trainable_params"


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


def static_sampling_plan(cfg: TrainConfig, dynamoe_config) -> Tuple[float, List[float]]:
    """(target FFN fraction, [K] level probabilities) of a static-sampled run of a model with
    `dynamoe_config`: --dynamoe-static-target-fraction (checked against the model's level
    range [f_1, 1]), or by default the fraction the run's theta range spends with an
    untrained router (`static_sampling.uniform_router_fraction`); the probabilities are the
    maximum-entropy distribution over the levels with that mean."""
    from megatron_dynamoe.dynamoe import static_sampling
    from megatron_dynamoe.utils.ranges import Interval

    fractions = dynamoe_config.level_fractions
    target = cfg.dynamoe_static_target_fraction
    if target is None:
        target = static_sampling.uniform_router_fraction(
            fractions, cfg.dynamoe_sensitivity_min, cfg.dynamoe_sensitivity_max)
    else:
        problem = Interval(float, fractions[0], 1.0).message(
            f"--dynamoe-static-target-fraction {target}", target)
        if problem:
            raise ValueError(f"{problem} (this model's level FFN fractions are "
                             f"{', '.join(f'{f:g}' for f in fractions)})")
    return target, static_sampling.max_entropy_level_probs(fractions, target)


def _freeze_routers(model) -> None:
    """Static-sampled runs: the routers decide nothing, so they compute no labels (no router
    loss, no full-FFN label pass) and their parameters are frozen before DDP and the
    optimizer are built: no gradient buckets wait for them, no weight decay or Adam state
    moves them, and they are saved unchanged."""
    from megatron_dynamoe.dynamoe.control import dynamoe_layers, set_label_fraction

    set_label_fraction(model, 0.0)
    for layer in dynamoe_layers(model):
        for param in layer.router.parameters():
            param.requires_grad_(False)


def freeze_outside_ffn(model) -> int:
    """--trainable-params ffn: freeze every parameter outside the FFNs (attention, norms,
    embeddings, output layer) before DDP and the optimizer collect parameters, so no
    gradient, bucket, Adam state or weight decay touches them. Returns the number of
    parameter elements left trainable on this rank."""
    trainable = 0
    for chunk in model:
        for name, param in chunk.named_parameters():
            if ".mlp." not in f".{name}":
                param.requires_grad_(False)
            elif param.requires_grad:
                trainable += param.numel()
    return trainable


def _check_resumed_routing(cfg: TrainConfig, folder: str,
                           static_plan: Optional[Tuple[float, List[float]]]) -> None:
    """Refuse to resume a training checkpoint with another --trainable-params or
    --dynamoe-routing (its optimizer holds another set of parameters, and the run would
    change method half-way), or a static-sampled one with another target FFN fraction
    (`static_plan`'s: the levels drawn from the resume on would follow another distribution
    than those before it)."""
    from megatron_dynamoe.checkpoint.torch_dist import read_info

    info = read_info(folder)
    extra = (info.extra or {}) if info is not None else {}
    saved_trainable = extra.get(TRAINABLE_KEY, "all")
    if saved_trainable != cfg.trainable_params:
        raise ValueError(f"--trainable-params {cfg.trainable_params}: --load {cfg.load} "
                         f"resumes a run that trained {saved_trainable} parameters ({folder}; "
                         f"its optimizer holds those); resume it with --trainable-params "
                         f"{saved_trainable}, or start the new run in another --save")
    saved = extra.get(ROUTING_KEY, "learned")
    if saved != cfg.dynamoe_routing:
        raise ValueError(f"--dynamoe-routing {cfg.dynamoe_routing}: --load {cfg.load} resumes "
                         f"a {saved} run ({folder}); resume it with --dynamoe-routing {saved}, "
                         f"or start the new run in another --save")
    saved_target = extra.get(STATIC_TARGET_KEY)
    if static_plan is not None and saved_target is not None \
            and abs(saved_target - static_plan[0]) > 1e-9:
        raise ValueError(f"--load {cfg.load} resumes a static-sampled run whose levels were "
                         f"drawn for a target FFN fraction of {saved_target:g} ({folder}), this "
                         f"run's is {static_plan[0]:g}: resume it with "
                         f"--dynamoe-static-target-fraction {saved_target:g} (and its theta "
                         f"range), or start the new run in another --save")


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
    teacher's logits) is attached to micro-batch m when given.

    A model chunk that is neither the pipeline's first (it embeds the tokens) nor its last
    (it computes the loss) reads nothing: `placeholder` (no tokens, labels or loss mask; the
    attention mask only for attention that reads one) stands for each of its micro-batches,
    as Megatron-LM's get_batch gives middle stages nothing.

    With tensor parallelism (`tp_broadcast`: the TP group, its source rank and the sequence
    length) only TP rank 0 reads; it broadcasts the batch's tensors (`BROADCAST_KEYS`, each
    [micro_batch_size, seq_length] on the device) to the other TP ranks, which build the
    constant attention mask themselves, as Megatron-LM's get_batch_on_this_tp_rank does."""

    BROADCAST_KEYS = (("tokens", torch.long), ("labels", torch.long),
                      ("loss_mask", torch.float32), ("position_ids", torch.long))

    def __init__(self, source: BatchSource, start: int, micro_batch_size: int, count: int,
                 dp_rank: int, dp_size: int, teacher_logits: Optional[list] = None,
                 placeholder: Optional[dict] = None, tp_broadcast: Optional[tuple] = None,
                 attention_mask=None):
        from megatron_dynamoe.data.sampling import micro_batch_starts

        self._positions = micro_batch_starts(start, micro_batch_size, count, dp_rank, dp_size)
        self._source, self._mbs = source, micro_batch_size
        self._teacher_logits, self._index = teacher_logits, 0
        self._placeholder = placeholder
        self._tp_broadcast, self._attention_mask = tp_broadcast, attention_mask
        self.seconds = 0.0  # host time spent reading and placing batches (the data wait)

    def __iter__(self):
        return self

    def __next__(self):
        if self._index == len(self._positions):
            raise StopIteration
        if self._placeholder is not None:
            self._index += 1
            return self._placeholder
        tic = time.perf_counter()
        if self._tp_broadcast is None:
            # The one way a batch reaches the model's device (pinned, non-blocking on a GPU).
            batch = place_batch(self._source(self._positions[self._index], self._mbs))
        else:
            batch = self._broadcast_batch()
        self.seconds += time.perf_counter() - tic
        if self._teacher_logits:
            batch["teacher_logits"] = self._teacher_logits[self._index]
        self._index += 1
        return batch

    def _broadcast_batch(self) -> dict:
        """TP rank 0 reads and places the micro-batch, then every TP rank takes part in one
        broadcast per tensor (no host synchronisation: shapes and dtypes are known)."""
        import torch.distributed as dist

        from megatron_dynamoe.runtime.device import model_device

        group, src, seq_length = self._tp_broadcast
        shape = (self._mbs, seq_length)
        if dist.get_rank() == src:
            batch = place_batch(self._source(self._positions[self._index], self._mbs))
            for key, dtype in self.BROADCAST_KEYS:
                value = batch.get(key)
                if value is None or tuple(value.shape) != shape or value.dtype != dtype:
                    raise ValueError(f"micro-batch {key!r}: expected a {dtype} tensor of "
                                     f"shape {list(shape)} to broadcast over tensor-parallel "
                                     f"ranks, got {getattr(value, 'shape', value)}")
                # Position ids are often an expanded view: a collective sends whole storage.
                batch[key] = value.contiguous()
        else:
            batch = {key: torch.empty(shape, dtype=dtype, device=model_device())
                     for key, dtype in self.BROADCAST_KEYS}
        for key, _ in self.BROADCAST_KEYS:
            dist.broadcast(batch[key], src, group=group)
        batch["attention_mask"] = self._attention_mask
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
    from megatron_dynamoe.dynamoe.control import set_level_sorted_experts
    from megatron_dynamoe.models.builder import build_model_chunks

    config = provider.transformer_config(
        cfg.layout, sequence_parallel=cfg.sequence_parallel,
        moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        **cfg.recompute_overrides())
    if cfg.load or cfg.pretrained_checkpoint:
        skip_random_init(config)
    torch.manual_seed(cfg.seed)
    chunks = build_model_chunks(provider, config)
    set_level_sorted_experts(chunks, cfg.dynamoe_level_sorted_experts)
    return config, chunks


def _middle_stage_batch(cfg: TrainConfig) -> dict:
    """What a middle pipeline chunk's forward step gets instead of a micro-batch: nothing,
    except the causal mask for Megatron's local attention (which builds its own only on
    CUDA), made once on the model's device."""
    from megatron_dynamoe.models.builder import causal_attention_mask
    from megatron_dynamoe.runtime.device import model_device

    mask = (causal_attention_mask(cfg.seq_length, device=model_device())
            if cfg.transformer_impl == "local" and cfg.attention_backend == "local" else None)
    return {"tokens": None, "position_ids": None, "attention_mask": mask, "labels": None,
            "loss_mask": None}


class _StepClock:
    """Splits a step's wall-clock time into parts. Each `mark(part)` waits for the device
    (one synchronisation per part, a few per step, as Megatron-LM's timers do) and books the
    time since the previous mark to `part`, less the data wait that fell into it (`data_seconds`
    counts the host time spent reading batches, booked as "data")."""

    def __init__(self, start: float, data_seconds: Callable[[], float]):
        self._last, self._data_seconds, self._data_booked = start, data_seconds, 0.0
        self.timings: Dict[str, float] = {"data": 0.0}

    def mark(self, part: str) -> None:
        from megatron_dynamoe.runtime.device import current

        if current().is_cuda:
            torch.cuda.synchronize()
        now, data = time.time(), self._data_seconds()
        fresh = data - self._data_booked
        self.timings[part] = max(0.0, now - self._last - fresh)
        self.timings["data"] += fresh
        self._last, self._data_booked = now, data


def _per_chunk(functions: list):
    """Megatron's config hooks (no_sync_func, grad_sync_func): one per model chunk, or the
    function itself with one chunk."""
    return functions if len(functions) > 1 else functions[0]


@dataclass
class StepResult:
    """What one `Trainer.train_step` did: the iteration it completed (1-based, as logged),
    its LM loss and distillation KL (DP-averaged; None off the last pipeline stage, and the
    KL None without distillation), the gradient norm, whether the optimizer stepped (`ok`;
    False when it skipped the update), the sensitivity drawn, and the wall-clock seconds.
    Static-sampled runs also give the `level` every token ran at (1..K; theta is drawn as in
    a learned run but unused); None for learned runs."""

    iteration: int
    loss: Optional[float]
    distill_kl: Optional[float]
    grad_norm: Optional[float]
    ok: bool
    theta: float
    seconds: float
    level: Optional[int] = None
    # Seconds by part: data (reading and placing batches), teacher (its forward, data
    # excluded), forward-backward (the schedule, data excluded), optimizer.
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return not self.ok


class Trainer:
    """One training run, in the shape of torchtitan's Trainer: construction sets it up,
    `train_step()` does one iteration, `run()` loops to --train-iters with logging, saving
    and preemption handling.

    Construction is collective (every rank of the layout constructs its Trainer) and does
    all the start-up work: it clears Megatron's MoE state, builds this rank's model chunks,
    their DDP wrappers, Megatron's optimizer and scheduler, hooks them into the model's
    TransformerConfig, resumes from the latest checkpoint in --load (or loads the weights of
    --pretrained-checkpoint), checks --save's free space and builds the distillation
    teacher. The arguments are `train()`'s. `iteration` and `consumed_samples` are where
    the next step starts (the resumed position after construction)."""

    def __init__(self, cfg: TrainConfig, model_info, source: BatchSource, logger=None,
                 on_iteration: Optional[Callable[[int], None]] = None,
                 provider=None, preemption_flag=None):
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint
        from megatron_dynamoe.models.builder import ModelProvider
        from megatron_dynamoe.checkpoint.save_folder import latest_checkpoint
        from megatron_dynamoe.training.state import load_training_state

        if provider is None:
            provider = ModelProvider(model_info.architecture, model_info.dynamoe)
        self.cfg, self.model_info, self.source, self.provider = cfg, model_info, source, provider
        self.logger, self.on_iteration, self.preemption_flag = (logger, on_iteration,
                                                                preemption_flag)
        resume = latest_checkpoint(cfg.load) if cfg.load else None
        # --async-save: Megatron's queue of background checkpoint writes, and the folders
        # (with the time their save started) that it has not finalized yet.
        self.async_queue = None
        self.pending_saves: List[Tuple[str, float]] = []
        # (target FFN fraction, level probabilities) of a static-sampled run, else None.
        self.static_plan: Optional[Tuple[float, List[float]]] = None
        if cfg.dynamoe_routing == STATIC_SAMPLED:
            if provider.family != "dynamoe":
                raise ValueError(f"--dynamoe-routing static-sampled needs a DynaMoE model, "
                                 f"not a {provider.family} one")
            self.static_plan = static_sampling_plan(cfg, model_info.dynamoe)
        if resume is not None:
            _check_resumed_routing(cfg, resume[1], self.static_plan)
        reset_megatron_moe_state()
        from megatron_dynamoe.runtime import transformer_impl

        # The core attention this run's models (student and teacher) are built with.
        transformer_impl.select_attention(cfg.attention_backend)
        self.config, self.model = build_training_model(cfg, provider)
        if self.static_plan is not None:
            _freeze_routers(self.model)  # before DDP and the optimizer collect parameters
        # FFN parameter elements left trainable with --trainable-params ffn, else None.
        self.trainable_numel = (freeze_outside_ffn(self.model)
                                if cfg.trainable_params == "ffn" else None)
        from megatron_dynamoe.runtime.device import current as current_device

        self.overlap_grad_reduce, self.overlap_param_gather = cfg.ddp_overlap(
            current_device().is_cuda)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer,
            check_for_nan_in_grad=cfg.check_for_nan_in_loss_and_grad,
            overlap_grad_reduce=self.overlap_grad_reduce,
            overlap_param_gather=self.overlap_param_gather, bucket_size=cfg.ddp_bucket_size,
            # With pipelining the schedule dispatches each chunk's parameter gather in step
            # with its first forward (Megatron-LM's --align-param-gather).
            align_param_gather=self.overlap_param_gather and cfg.pipeline_model_parallel_size > 1)
        # Megatron buckets only the first chunk's gradients for overlap; later chunks reduce
        # at the end of the step (the same choice as Megatron's training loop).
        self.ddps = [DistributedDataParallel(self.config, ddp_config, module=chunk,
                                             disable_bucketing=i > 0)
                     for i, chunk in enumerate(self.model)]
        optimizer_config = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad, bf16=cfg.bf16, params_dtype=self.config.params_dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(
            optimizer_config, self.ddps,
            config_overrides=optimizer_overrides(cfg, optimizer_config))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.config.no_sync_func = _per_chunk([d.no_sync for d in self.ddps])
        if self.overlap_grad_reduce:
            # Megatron-LM's training loop: the pipeline schedules start each chunk's gradient
            # reduction when its last micro-batch's backward is done.
            self.config.grad_sync_func = _per_chunk([d.start_grad_sync for d in self.ddps])
        if self.overlap_param_gather and cfg.pipeline_model_parallel_size > 1:
            self.config.param_sync_func = _per_chunk([d.start_param_sync for d in self.ddps])
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss

        self.iteration, self.consumed_samples = 0, 0
        self.closed = False
        if resume is not None:
            self.iteration, self.consumed_samples = load_training_state(
                resume[1], self.model, self.optimizer, self.scheduler,
                verify_checksums=cfg.verify_checksums,
                parallel_group=(parallel_state.get_data_parallel_group()
                                if cfg.ckpt_fully_parallel_load else None))
            if logger:
                logger.text(f"resumed from {resume[1]} at iteration {self.iteration}")
        elif cfg.pretrained_checkpoint or cfg.load:
            # A model checkpoint (not a training one): weights only, fresh optimizer.
            load_checkpoint(self.model, cfg.pretrained_checkpoint or cfg.load,
                            verify_checksums=cfg.verify_checksums)
            self.optimizer.reload_model_params()
        if cfg.save:
            check_checkpoint_space(cfg.save, self.model, self.optimizer,
                                   cfg.use_distributed_optimizer)
        self.teacher = (build_teacher(cfg, model_info, self.config)
                        if cfg.dynamoe_distill_teacher else None)
        if logger and self.static_plan is not None:
            target, probs = self.static_plan
            logger.text(f"static-sampled routing: one level per iteration, probabilities "
                        f"{', '.join(f'{p:.3f}' for p in probs)} for levels 1..{len(probs)}, "
                        f"target FFN compute {target:.3f}; routers frozen")
        if logger and cfg.trainable_params == "ffn":
            logger.text(f"--trainable-params ffn: {self.trainable_numel:,} FFN parameters "
                        f"trained on this rank; attention, norms and embeddings frozen")
        self.forward_step = (functools.partial(_distill_forward_step,
                                               cfg.dynamoe_distill_weight,
                                               cfg.dynamoe_distill_temperature)
                             if self.teacher else _forward_step)

        self._dp_rank = parallel_state.get_data_parallel_rank()
        self._dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = cfg.num_microbatches(self._dp_size)
        self._forward_backward = get_forward_backward_func()
        self._iterators: List[_MicroBatches] = []
        # Which model chunks read data: the pipeline's first (tokens) and last (labels).
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        last_chunk = len(self.model) - 1
        self._chunk_reads = [(pp_rank == 0 and c == 0) or (pp_rank == pp_size - 1
                                                           and c == last_chunk)
                             for c in range(len(self.model))]
        self._middle_stage_batch = _middle_stage_batch(cfg)
        # Tensor parallelism: TP rank 0 reads each micro-batch and broadcasts it.
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self._tp_broadcast = ((tp_group, parallel_state.get_tensor_model_parallel_src_rank(),
                               cfg.seq_length) if tp_group.size() > 1 else None)
        # --num-workers: worker processes read this rank's micro-batches ahead (only where a
        # chunk reads, and only on the TP rank that reads for its group).
        self._loader = self._data_loader(logger)
        # The log's TFLOP/s per GPU and MFU (training.throughput): the step's model FLOPs as
        # a function of the FFN fraction the DynaMoE layers ran at and of a labelled step.
        from megatron_dynamoe.runtime.device import current as current_device
        from megatron_dynamoe.training.throughput import peak_flops, step_model_flops

        self.step_flops = functools.partial(
            step_model_flops, model_info.architecture,
            model_info.dynamoe if provider.family == "dynamoe" else None, cfg.seq_length,
            cfg.global_batch_size * cfg.seq_length, teacher=self.teacher is not None)
        device = current_device()
        self.peak_flops = (peak_flops(torch.cuda.get_device_name(device.device), cfg.bf16)
                           if device.is_cuda else None)
        if self._loader is not None:
            self._loader.start()  # the workers read the first iteration's batches now

    def _data_loader(self, logger):
        """A `BatchLoader` over the rest of the run's positions on this rank, or None when
        this rank reads nothing or --num-workers resolves to 0 (reads in this process)."""
        from megatron_dynamoe.data.batch_loader import BatchLoader, run_positions
        from megatron_dynamoe.runtime.device import current as current_device

        cfg = self.cfg
        on_gpu = current_device().is_cuda
        workers = cfg.data_loader_workers(on_gpu)
        reads = any(self._chunk_reads) and (self._tp_broadcast is None
                                            or dist.get_rank() == self._tp_broadcast[1])
        if workers == 0 or not reads or self.iteration >= cfg.train_iters:
            return None
        iterations = cfg.train_iters - self.iteration
        positions = functools.partial(run_positions, self.consumed_samples,
                                      cfg.global_batch_size, iterations, cfg.micro_batch_size,
                                      self.num_microbatches, self._dp_rank, self._dp_size)
        if logger:
            logger.text(f"data: {workers} worker processes read micro-batches ahead"
                        f"{' (pinned memory)' if on_gpu else ''}")
        return BatchLoader(self.source, cfg.micro_batch_size, positions,
                           iterations * self.num_microbatches, workers, pin_memory=on_gpu)

    def close(self) -> None:
        """Release what ties the model to this run: the data loader's workers, and the
        training hooks in the model's TransformerConfig (Megatron's schedule calls them:
        loss scaling, no-sync, gradient and parameter sync, gradient finalisation). Through
        them the config held the optimizer and the DDP wrappers, and Python's collector did
        not free that cycle: every `train()` in a process kept its model, gradient buffers
        and optimizer state (GPU memory, and each process group's communicators) after the
        caller dropped the result. The model stays usable for evaluation; no `train_step`
        after it."""
        self.close_data()
        for name in ("grad_scale_func", "no_sync_func", "grad_sync_func", "param_sync_func",
                     "finalize_model_grads_func"):
            setattr(self.config, name, None)
        self.closed = True

    def close_data(self) -> None:
        """Stop the data loader's worker processes (a no-op without them); later reads, if
        any, go to the source directly."""
        if self._loader is not None:
            self._loader.close()
        self._loader = None

    def _micro_batches(self, start: int, teacher_logits=None) -> list:
        # One iterator per model chunk (the interleaved schedule pulls from each); kept, so
        # that the step can report its data wait.
        read = self.source if self._loader is None else self._loader
        iterators = [_MicroBatches(read, start, self.cfg.micro_batch_size,
                                   self.num_microbatches, self._dp_rank, self._dp_size,
                                   teacher_logits,
                                   None if reads else self._middle_stage_batch,
                                   self._tp_broadcast,
                                   self._middle_stage_batch["attention_mask"])
                     for reads in self._chunk_reads]
        self._iterators.extend(iterators)
        return iterators

    def _data_seconds(self) -> float:
        return sum(it.seconds for it in self._iterators)

    def train_step(self) -> StepResult:
        """Do one iteration at `iteration` (collective over the whole layout): draw its
        sensitivity (and, static-sampled, the level of all its tokens), run the teacher
        (with distillation), forward and backward over its
        micro-batches with Megatron's schedule, step the optimizer (and the scheduler when
        the step was not skipped), advance `iteration` and `consumed_samples` and return
        the DP-averaged loss. No logging and no saving; raises TrainingDiverged on a
        non-finite gradient, before the optimizer touches the weights."""
        if self.closed:
            raise RuntimeError("train_step after Trainer.close(): build a new Trainer")
        from megatron_dynamoe.dynamoe.control import (
            set_sensitivity,
            set_static_level,
            set_training_step,
        )
        from megatron_dynamoe.dynamoe.static_sampling import static_level

        cfg = self.cfg
        tic = time.time()
        self._iterators = []
        if self._loader is not None:
            self._loader.release_before(self.consumed_samples)
        theta = sample_sensitivity(cfg, self.iteration)
        set_sensitivity(self.model, theta)
        level = None
        if self.static_plan is not None:
            # Before the teacher's forward too: it has no DynaMoE layers, so nothing changes.
            level = static_level(self.static_plan[1], cfg.seed, self.iteration)
            set_static_level(self.model, level)
        set_training_step(self.model, self.iteration)
        teacher_logits = None
        if self.teacher is not None:
            teacher_logits = self.teacher.logits_for(
                functools.partial(self._micro_batches, self.consumed_samples),
                self.num_microbatches, cfg.seq_length, cfg.micro_batch_size)
        clock = _StepClock(tic, self._data_seconds)
        if self.teacher is not None:
            clock.mark("teacher")
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = self._micro_batches(self.consumed_samples, teacher_logits)
        try:
            reports = self._forward_backward(
                forward_step_func=self.forward_step,
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=self.ddps, num_microbatches=self.num_microbatches,
                seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size,
                forward_only=False)
        except RuntimeError as e:
            # Megatron's gradient check (check_for_nan_in_grad) runs on every rank before
            # the reduction, so every rank with a non-finite gradient stops here, before the
            # optimizer touches the weights.
            if "found NaN" in str(e) or "found Inf" in str(e):
                raise TrainingDiverged(self.iteration + 1, cfg, str(e)) from e
            raise
        clock.mark("forward-backward")
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        clock.mark("optimizer")
        self.iteration += 1
        self.consumed_samples += cfg.global_batch_size
        loss = _dp_mean_loss(reports)
        distill_kl = (_dp_mean_loss(reports, "distill kl")
                      if self.teacher is not None and reports else None)
        return StepResult(iteration=self.iteration, loss=loss, distill_kl=distill_kl,
                          grad_norm=grad_norm, ok=ok, theta=theta, seconds=time.time() - tic,
                          level=level, timings=clock.timings)

    def sync_params(self) -> None:
        """Bring every rank's model parameters up to date now (collective). With
        --overlap-param-gather the optimizer updates only this rank's shard and the other
        shards arrive during the next forward; a checkpoint, an evaluation or the caller of
        `run` needs them all (Megatron-LM disables the forward pre-hook around its saves)."""
        if self.overlap_param_gather:
            for ddp in self.ddps:
                ddp.disable_forward_pre_hook()  # all-gathers every bucket synchronously
                ddp.enable_forward_pre_hook()

    def save(self) -> str:
        """Write a resumable training checkpoint of the current iteration to --save
        (collective) and return its folder."""
        from megatron_dynamoe.models.registry import with_family
        from megatron_dynamoe.training.state import save_training_state

        from megatron.core import parallel_state

        cfg = self.cfg
        # One save at a time: a new save clears stale temporaries of --save, which an
        # unfinished background save still writes into.
        self.finalize_saves(blocking=True)
        tic = time.time()
        if cfg.async_save and self.async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import (
                AsyncCallsQueue,
            )

            self.async_queue = AsyncCallsQueue()
        self.sync_params()
        info = self._routing_info(with_family(self.model_info, self.provider.family))
        folder = save_training_state(
            cfg.save, self.iteration, self.model, self.optimizer, self.scheduler,
            self.consumed_samples, info,
            optimizer_sharding=("fully_reshardable" if cfg.dist_ckpt_optim_fully_reshardable
                                else None),
            keep_last_n=cfg.keep_last_n,
            parallel_group=(parallel_state.get_data_parallel_group()
                            if cfg.ckpt_fully_parallel_save else None),
            async_queue=self.async_queue)
        if self.async_queue is not None:
            self.pending_saves.append((folder, tic))
            if self.logger:
                self.logger.text(f"saving {folder} in the background (training blocked "
                                 f"{time.time() - tic:.1f} s)")
        elif self.logger:
            self.logger.text(f"saved {folder} in {time.time() - tic:.1f} s")
        return folder

    def finalize_saves(self, blocking: bool) -> None:
        """--async-save: finish the background saves whose writes are done on every rank
        (all of them when `blocking`): model.json, checksums, rename, `latest`, pruning.
        Collective; a no-op without pending saves."""
        if self.async_queue is None or not self.pending_saves:
            return
        for _ in self.async_queue.maybe_finalize_async_calls(blocking=blocking):
            folder, started = self.pending_saves.pop(0)
            if self.logger:
                self.logger.text(f"saved {folder} in {time.time() - started:.1f} s "
                                 f"(background)")

    def _routing_info(self, info):
        """`info` whose `extra` records how this run routed and what it trained: static-sampled
        runs add ROUTING_KEY, STATIC_TARGET_KEY and STATIC_PROBS_KEY, --trainable-params ffn
        TRAINABLE_KEY; other runs drop them (the initial checkpoint may have been such a
        run's)."""
        import dataclasses

        keys = (ROUTING_KEY, STATIC_TARGET_KEY, STATIC_PROBS_KEY, TRAINABLE_KEY)
        extra = {k: v for k, v in (info.extra or {}).items() if k not in keys}
        if self.cfg.trainable_params != "all":
            extra[TRAINABLE_KEY] = self.cfg.trainable_params
        if self.static_plan is not None:
            target, probs = self.static_plan
            extra.update({ROUTING_KEY: STATIC_SAMPLED, STATIC_TARGET_KEY: target,
                          STATIC_PROBS_KEY: list(probs)})
        return dataclasses.replace(info, extra=extra)

    def maybe_save(self, force: bool = False) -> Optional[str]:
        """Save (see `save`) when --save is set and the current iteration is due: a multiple
        of --save-interval, the last iteration (--train-iters), or `force` (the run is
        about to stop). Returns the folder written, or None."""
        cfg = self.cfg
        interval_save = cfg.save_interval and self.iteration % cfg.save_interval == 0
        if cfg.save and (interval_save or force or self.iteration == cfg.train_iters):
            return self.save()
        return None

    def run(self) -> TrainResult:
        """Train from `iteration` to --train-iters: `train_step` after `train_step`, each
        logged and reported to `on_iteration`, saving at the interval, at the end and when
        stopping early. A preemption signal (agreed over ranks after each iteration) saves
        and stops; one received during start-up stops before the first iteration with
        nothing saved; --exit-after-iters counts the iterations of this call. Megatron's MoE
        state is cleared on the way out, also on an error."""
        from megatron_dynamoe.training import preemption

        cfg, logger = self.cfg, self.logger
        result = TrainResult(iteration=self.iteration, consumed_samples=self.consumed_samples)
        stop = (self.preemption_flag if self.preemption_flag is not None
                else preemption.PreemptionFlag())
        started_iter = self.iteration
        try:
            with stop.installed():
                if stop.agreed():
                    # Signalled during start-up: nothing was trained since the last
                    # checkpoint, so there is nothing to save; the requeued job starts where
                    # this one did.
                    if logger:
                        logger.text("preemption signal received during start-up: exiting "
                                    "before the first iteration (no checkpoint written)")
                    result.stopped_by_signal = True
                while self.iteration < cfg.train_iters and not result.stopped_by_signal:
                    step = self.train_step()
                    if step.loss is not None:
                        result.losses[step.iteration] = step.loss
                    if step.distill_kl is not None:
                        result.distill_kl[step.iteration] = step.distill_kl
                    if logger:
                        logger.iteration(
                            step.iteration, cfg, loss=step.loss, theta=step.theta,
                            grad_norm=step.grad_norm,
                            lr=self.scheduler.get_lr(self.optimizer.param_groups[0]),
                            seconds=step.seconds, model=self.model, skipped=step.skipped,
                            scalars=functools.partial(self.provider.scalars, self.model),
                            distill_kl=step.distill_kl, level=step.level,
                            timings=step.timings, step_flops=self.step_flops,
                            peak_flops=self.peak_flops)
                    if self.on_iteration:
                        self.on_iteration(step.iteration)
                    stop_now = stop.agreed()  # collective: every rank, every iteration
                    exit_now = bool(cfg.exit_after_iters
                                    and self.iteration - started_iter >= cfg.exit_after_iters)
                    self.maybe_save(force=stop_now or exit_now)
                    self.finalize_saves(blocking=False)
                    if stop_now or exit_now:
                        result.stopped_by_signal = stop_now
                        break
            # The run's last checkpoint is complete (and `latest` names it) on return.
            self.finalize_saves(blocking=True)
        finally:
            self.close_data()
            reset_megatron_moe_state()
        self.sync_params()
        result.iteration, result.consumed_samples = self.iteration, self.consumed_samples
        result.model = self.model
        result.trained_iterations = self.iteration - started_iter
        return result


def train(cfg: TrainConfig, model_info, source: BatchSource, logger=None,
          on_iteration: Optional[Callable[[int], None]] = None,
          provider=None, preemption_flag=None) -> TrainResult:
    """Run (or resume) training: `Trainer(...).run()`. `model_info` is a CheckpointInfo
    describing the model (architecture + DynaMoE config); `provider` (a
    `model_builder.ModelProvider`, default: the DynaMoE / dense model of `model_info`)
    builds it. Parallel groups must be initialised for `cfg.layout`. `preemption_flag` (a
    `preemption.PreemptionFlag` the caller installed before its own start-up work) lets a
    signal received while the model and data load end the run before its first iteration,
    with no checkpoint written; without one, the trainer installs its own for the loop."""
    trainer = Trainer(cfg, model_info, source, logger=logger, on_iteration=on_iteration,
                      provider=provider, preemption_flag=preemption_flag)
    try:
        return trainer.run()
    finally:
        trainer.close()


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
