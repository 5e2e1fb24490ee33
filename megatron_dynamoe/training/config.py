"""TrainConfig: every knob of a fine-tuning run, from Megatron-style CLI flags, validated once.

Config flows one way: `parse_train_args(argv)` -> `TrainConfig` (validated in
`__post_init__`) -> the trainer and the modules it builds. Nothing reads globals.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Sequence, Tuple

from megatron_dynamoe.runtime.parallel import ParallelLayout
from megatron_dynamoe.utils.ranges import (
    ANY,
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    UNIT,
    Interval,
)

LR_DECAY_STYLES = ("constant", "linear", "cosine")
# --dynamoe-routing: 'learned' routes each token by the difficulty router at a sampled
# sensitivity; 'static-sampled' (the Flextron-style baseline) puts every token of an
# iteration at one level drawn for that iteration.
DYNAMOE_ROUTINGS = ("learned", "static-sampled")
STATIC_SAMPLED = "static-sampled"
# --trainable-params: 'all' trains every parameter; 'ffn' only the FFNs (the MoE layers'
# experts and routers, the dense MLPs of layers not MoEfied): attention, norms and
# embeddings keep the pre-trained values.
TRAINABLE_PARAMS = ("all", "ffn")


@dataclass
class TrainConfig:
    """A fine-tuning run. Flags are the Megatron names with dashes (`--micro-batch-size`)."""

    # Model: a checkpoint to start from (--load, or --pretrained-checkpoint for a first start
    # whose optimizer state is fresh), or a preset initialised at random (--model).
    model: Optional[str] = None
    load: Optional[str] = None
    pretrained_checkpoint: Optional[str] = None
    save: Optional[str] = None
    save_interval: Optional[int] = None
    # Keep only the newest N checkpoints of --save (older iter_N folders are deleted after
    # each save completes; the one a resume needs never is). None: keep every one.
    keep_last_n: Optional[int] = None
    # Megatron's asynchronous save: shards copied to host buffers and written by a
    # background process while training goes on; model.json, checksums, the rename, the
    # `latest` pointer and pruning follow when the write has finished on every rank
    # (checked after each iteration; waited for before the next save and at the end).
    async_save: bool = False
    # Start a new run in a --save folder that holds another run's checkpoints (deleting them);
    # without it such a folder is refused unless --load resumes it.
    overwrite: bool = False
    # Where it runs: --device auto|cuda|cpu (runtime.device), the layer implementation
    # (local | transformer_engine, never inferred from what imports) and the bound on every
    # collective of the default process group (a hung rank fails the job after this long).
    device: str = "auto"
    transformer_impl: str = "local"
    # The local implementation's core attention: 'sdpa' (PyTorch's flash / memory-efficient
    # kernels) or 'local' (Megatron's DotProductAttention, s x s scores in memory).
    attention_backend: str = "sdpa"
    distributed_timeout_minutes: float = 10.0
    # Check every checkpoint file against the checksums.json manifest written with it before
    # loading (--no-verify-checksums skips the hashing; sizes are always checked).
    verify_checksums: bool = True
    # Megatron-LM's --dist-ckpt-optim-fully-reshardable: save the distributed optimizer's state
    # so that it resumes at other TP / PP sizes too (each save gathers every shard's state on
    # its data-parallel ranks); the default format resumes at any DP size only.
    dist_ckpt_optim_fully_reshardable: bool = False
    # Megatron-LM's fully parallel checkpointing: the data-parallel replicas split the writing
    # (on by default, as in Megatron-LM; --no-ckpt-fully-parallel-save) and, when asked, the
    # reading of a resume (each shard read once, then exchanged).
    ckpt_fully_parallel_save: bool = True
    ckpt_fully_parallel_load: bool = False
    # Layout.
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None: same as TP (Megatron's default)
    virtual_pipeline_model_parallel_size: Optional[int] = None  # chunks per stage (interleaved)
    sequence_parallel: bool = False
    moe_token_dispatcher_type: str = "alltoall"
    use_distributed_optimizer: bool = True
    # Megatron's DDP overlap: gradient reduce-scatter / all-reduce per bucket as the backward
    # produces it, parameter all-gather per bucket in the next forward (distributed optimizer
    # only). None (the default): on when the run is on GPUs, off on the CPU; --no-X forces
    # off. --ddp-bucket-size: parameters per bucket (Megatron's default with overlap:
    # max(40M, 1M x DP)).
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None
    ddp_bucket_size: Optional[int] = None
    # Megatron-LM's --check-for-nan-in-loss-and-grad: every bucket's gradient norm is checked
    # before the data-parallel reduction; NaN / Inf stops the run before the optimizer step
    # (the last checkpoint stays the last good one).
    check_for_nan_in_loss_and_grad: bool = True
    # Batch.
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 256
    # Optimisation.
    train_iters: int = 100
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    # Learning-rate multiplier of the MoE routers' parameters (DynaMoE difficulty routers,
    # top-k / adaptive gates): their own warm-up and decay from --lr x mult to --min-lr x mult.
    router_lr_mult: float = 1.0
    # Which parameters the run trains (TRAINABLE_PARAMS): a short fine-tune that repairs
    # MoEfied FFNs can leave attention and embeddings as pre-trained ('ffn'), so that the
    # fine-tuning text adapts less of the model to itself.
    trainable_params: str = "all"
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    bf16: bool = False
    seed: int = 1234
    # Activation recomputation (Megatron's semantics): 'selective' recomputes core attention,
    # 'full' whole layers per --recompute-method / --recompute-num-layers.
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Data: Megatron-style blend "W1 PREFIX1 W2 PREFIX2 ..." (or one prefix), split "98,2,0"-style,
    # tokenised by --tokenizer (an HF folder, or 'smollm2'; + --gguf-file).
    data_path: List[str] = field(default_factory=list)
    split: str = "100,0,0"  # no in-training evaluation yet: all documents train
    data_cache_path: Optional[str] = None
    # Megatron-LM's --num-workers: DataLoader worker processes that read the micro-batches
    # ahead of the step (data.batch_loader; same batches, same order). None (the default): 2
    # on GPUs, 0 on the CPU (reads in the training process; the cores train there).
    num_workers: Optional[int] = None
    tokenizer: Optional[str] = None
    gguf_file: Optional[str] = None
    # Logging.
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    # DynaMoE fine-tuning. A --model preset is MoEfied into --dynamoe-num-shells shells
    # unless --dense; a checkpoint brings its own (dense or DynaMoE) configuration.
    dense: bool = False
    dynamoe_num_shells: int = 4
    dynamoe_sensitivity_min: float = 0.0
    dynamoe_sensitivity_max: float = 1.0
    # None: keep the checkpoint's value. --dynamoe-label-tolerance-max equal to the tolerance
    # gives hard labels.
    dynamoe_label_reference: Optional[str] = None
    dynamoe_label_tolerance: Optional[float] = None
    dynamoe_label_tolerance_max: Optional[float] = None
    dynamoe_label_fraction: Optional[float] = None
    dynamoe_router_loss_coeff: Optional[float] = None
    # 'static-sampled': the Flextron-style baseline (docs/training.md): each iteration draws
    # one level for all its tokens, from the maximum-entropy level distribution whose mean FFN
    # fraction is --dynamoe-static-target-fraction (None: what the theta range spends with an
    # untrained router); the routers are frozen and compute no labels.
    dynamoe_routing: str = "learned"
    # Routed forwards at EP = 1 run the shells on level-sorted tokens (one gather, a prefix
    # per shell); --no-dynamoe-level-sorted-experts sends them through Megatron's token
    # dispatcher (one copy per shell), the reference path. Same numbers to round-off.
    dynamoe_level_sorted_experts: bool = True
    dynamoe_static_target_fraction: Optional[float] = None
    # Distillation from the frozen dense model (a dense checkpoint of the same architecture):
    # loss = (1 - w) * LM loss + w * T^2 * KL(teacher_T || student_T) per token.
    dynamoe_distill_teacher: Optional[str] = None
    dynamoe_distill_weight: float = 0.5
    dynamoe_distill_temperature: float = 1.0
    # Stop after this many iterations of this run (tests, time-limited jobs); None = no limit.
    exit_after_iters: Optional[int] = None
    # Curriculum (issue #7): train in the order of a scores file written by
    # tools/profile_curriculum.py with this run's data flags; 'window' sorts each window of
    # --curriculum-window samples (default: the global batch size) by ascending score,
    # 'global' sorts the whole run and shuffles within windows (seeded by --seed).
    curriculum_scores: Optional[str] = None
    curriculum_mode: str = "window"
    curriculum_window: Optional[int] = None

    def __post_init__(self):
        if self.load is None and self.pretrained_checkpoint is None and self.model is None:
            raise ValueError("nothing to train: pass --load CHECKPOINT, "
                             "--pretrained-checkpoint CHECKPOINT or --model PRESET")
        from megatron_dynamoe.runtime.device import DEVICE_CHOICES
        from megatron_dynamoe.runtime.transformer_impl import (
            ATTENTION_BACKENDS,
            TRANSFORMER_IMPLS,
        )

        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"--device {self.device!r}: choose one of {', '.join(DEVICE_CHOICES)}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"--transformer-impl {self.transformer_impl!r}: choose one of "
                             f"{', '.join(TRANSFORMER_IMPLS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend {self.attention_backend!r}: choose one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        for f in fields(self):
            value = getattr(self, f.name)
            # None is an unset optional flag; bools are switches, not numbers.
            if value is None or isinstance(value, bool):
                continue
            # Floats outside RANGES must still be finite (ranges.ANY).
            interval = RANGES.get(f.name, ANY if isinstance(value, float) else None)
            if interval is not None:
                interval.check(f"--{f.name.replace('_', '-')}", value)
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        if self.async_save and self.save is None:
            raise ValueError("--async-save needs --save DIR")
        if self.keep_last_n is not None and self.save is None:
            raise ValueError("--keep-last-n needs --save DIR (the folder it prunes)")
        if self.overwrite and self.save is None:
            raise ValueError("--overwrite needs --save DIR (the folder to start over in)")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r}: use one of "
                             f"{LR_DECAY_STYLES}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        from megatron_dynamoe.data.blend import parse_split

        if parse_split(self.split)[0] == 0:
            raise ValueError(f"--split {self.split} gives training no documents: give the "
                             f"first (train) weight a value > 0, e.g. 98,2,0")
        if self.lr_warmup_iters >= self.train_iters:
            # Megatron's scheduler needs decay steps after the warm-up.
            raise ValueError(f"--lr-warmup-iters {self.lr_warmup_iters} must be below "
                             f"--train-iters {self.train_iters}: the schedule decays after the "
                             f"warm-up")
        if not 0.0 <= self.dynamoe_sensitivity_min <= self.dynamoe_sensitivity_max <= 1.0:
            raise ValueError("need 0 <= --dynamoe-sensitivity-min <= --dynamoe-sensitivity-max "
                             "<= 1")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # nothing to split: Megatron does the same
        if self.moe_token_dispatcher_type not in ("alltoall", "allgather"):
            raise ValueError("--moe-token-dispatcher-type must be 'alltoall' or 'allgather'")
        self._check_recompute()
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("--overlap-param-gather gathers the distributed optimizer's "
                             "parameter shards: drop --no-use-distributed-optimizer, or the "
                             "flag")
        if self.overlap_param_gather and self.overlap_grad_reduce is False:
            raise ValueError("--overlap-param-gather needs --overlap-grad-reduce (as in "
                             "Megatron-LM): drop --no-overlap-grad-reduce")
        if self.curriculum_mode not in ("window", "global"):
            raise ValueError("--curriculum-mode must be 'window' or 'global'")
        if self.curriculum_window is not None and self.curriculum_scores is None:
            raise ValueError("--curriculum-window needs --curriculum-scores FILE")
        if self.trainable_params not in TRAINABLE_PARAMS:
            raise ValueError(f"--trainable-params {self.trainable_params!r}: choose one of "
                             f"{', '.join(TRAINABLE_PARAMS)}")
        if self.dynamoe_routing not in DYNAMOE_ROUTINGS:
            raise ValueError(f"--dynamoe-routing {self.dynamoe_routing!r}: choose one of "
                             f"{', '.join(DYNAMOE_ROUTINGS)}")
        if self.dynamoe_routing == STATIC_SAMPLED and self.dense:
            raise ValueError("--dynamoe-routing static-sampled trains a DynaMoE model at "
                             "sampled nested levels: drop --dense")
        if (self.dynamoe_static_target_fraction is not None
                and self.dynamoe_routing != STATIC_SAMPLED):
            raise ValueError("--dynamoe-static-target-fraction needs --dynamoe-routing "
                             "static-sampled")
        if self.dense and self.dynamoe_distill_teacher:
            raise ValueError("--dynamoe-distill-teacher distils a dense teacher into a DynaMoE "
                             "student: drop --dense")
        # Checked here (not only by ParallelLayout) so a bad layout fails before any launch.
        self.layout  # noqa: B018

    def _check_recompute(self) -> None:
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g is None:
            if m is not None or n is not None:
                raise ValueError("--recompute-method / --recompute-num-layers need "
                                 "--recompute-granularity full")
            return
        if g not in ("full", "selective"):
            raise ValueError("--recompute-granularity must be 'full' or 'selective'")
        if g == "selective":
            if m is not None or n is not None:
                raise ValueError("--recompute-granularity selective recomputes core attention "
                                 "in every layer: drop --recompute-method / "
                                 "--recompute-num-layers")
            return
        if m not in ("uniform", "block"):
            raise ValueError("--recompute-granularity full needs --recompute-method uniform "
                             "or block")
        if n is None or n < 1:
            raise ValueError("--recompute-granularity full needs --recompute-num-layers N >= 1 "
                             "(uniform: layers per recomputed chunk; block: layers recomputed "
                             "per pipeline stage)")

    def recompute_overrides(self) -> dict:
        """TransformerConfig fields of the recomputation flags ({} when off)."""
        if self.recompute_granularity is None:
            return {}
        return dict(recompute_granularity=self.recompute_granularity,
                    recompute_method=self.recompute_method,
                    recompute_num_layers=self.recompute_num_layers)

    def ddp_overlap(self, on_gpu: bool) -> Tuple[bool, bool]:
        """(overlap_grad_reduce, overlap_param_gather) of this run: the flags, or where unset
        on for a GPU run (the parameter gather only with the distributed optimizer)."""
        grad = on_gpu if self.overlap_grad_reduce is None else self.overlap_grad_reduce
        param = ((on_gpu and grad and self.use_distributed_optimizer)
                 if self.overlap_param_gather is None else self.overlap_param_gather)
        return grad or param, param

    def data_loader_workers(self, on_gpu: bool) -> int:
        """Worker processes reading this run's micro-batches ahead: --num-workers, or where
        unset 2 for a GPU run (Megatron-LM's default) and 0 on the CPU."""
        if self.num_workers is not None:
            return self.num_workers
        return 2 if on_gpu else 0

    @property
    def layout(self) -> ParallelLayout:
        """The parallel layout of the run."""
        return ParallelLayout(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size)

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Micro-batches per iteration on each DP rank; raises when the batch does not divide."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size x data-parallel size = {self.micro_batch_size} x "
                f"{data_parallel_size}: choose a multiple of {per_step}")
        return self.global_batch_size // per_step

    def to_dict(self) -> dict:
        """JSON-able copy for checkpoints and run folders."""
        return asdict(self)


# Every numeric flag's range, in one place (utils.ranges words the complaints). A flag absent
# here may take any finite value; None (an unset optional flag) is not checked.
RANGES = {
    "distributed_timeout_minutes": POSITIVE,
    "tensor_model_parallel_size": COUNT, "pipeline_model_parallel_size": COUNT,
    "expert_model_parallel_size": COUNT, "expert_tensor_parallel_size": COUNT,
    "virtual_pipeline_model_parallel_size": COUNT,
    "micro_batch_size": COUNT, "global_batch_size": COUNT, "seq_length": COUNT,
    "train_iters": COUNT, "log_interval": COUNT, "save_interval": COUNT, "keep_last_n": COUNT,
    "exit_after_iters": COUNT, "curriculum_window": COUNT, "num_workers": NON_NEGATIVE_INT,
    "recompute_num_layers": COUNT, "dynamoe_num_shells": COUNT, "ddp_bucket_size": COUNT,
    "lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "lr_warmup_iters": NON_NEGATIVE_INT,
    "router_lr_mult": Interval(float, 0, 1e4, low_open=True),
    "weight_decay": NON_NEGATIVE, "clip_grad": NON_NEGATIVE,
    "adam_beta1": Interval(float, 0, 1, high_open=True),
    "adam_beta2": Interval(float, 0, 1, high_open=True),
    "adam_eps": POSITIVE, "seed": NON_NEGATIVE_INT,
    "dynamoe_sensitivity_min": UNIT, "dynamoe_sensitivity_max": UNIT,
    "dynamoe_label_tolerance": NON_NEGATIVE, "dynamoe_label_tolerance_max": NON_NEGATIVE,
    "dynamoe_label_fraction": Interval(float, 0, 1, low_open=True),
    "dynamoe_router_loss_coeff": NON_NEGATIVE,
    # The model's level-1 fraction is the lower end; checked when the model is known.
    "dynamoe_static_target_fraction": Interval(float, 0, 1, low_open=True),
    "dynamoe_distill_weight": UNIT,
    "dynamoe_distill_temperature": POSITIVE,
}


def _flag_type(hint):
    """argparse type of a TrainConfig field from its annotation (Optional[X] -> X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and args else hint


class _FlagParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value that is not a number) are ValueErrors,
    reported like TrainConfig's own checks: one `error:` line and exit 2."""

    def error(self, message: str):
        raise ValueError(f"{message} (see launch/train.py --help)")


def build_parser() -> argparse.ArgumentParser:
    """The `launch/train.py` argument parser (one flag per TrainConfig field)."""
    p = _FlagParser(description="Fine-tune a DynaMoE (or dense) GPT model on Megatron-Core.")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(hints[f.name])
        if kind is bool:
            # On-by-default and unset-by-default (None: decided by the run) switches also get
            # --no-X (e.g. --no-use-distributed-optimizer, --no-overlap-grad-reduce).
            action = (argparse.BooleanOptionalAction if f.default or f.default is None
                      else "store_true")
            p.add_argument(flag, action=action, default=f.default)
        elif f.name == "data_path":
            p.add_argument(flag, nargs="+", default=[])
        else:
            p.add_argument(flag, type=kind, default=f.default)
    return p


def parse_train_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags -> validated TrainConfig (ValueError names the bad flag and the fix)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))
