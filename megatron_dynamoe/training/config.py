"""TrainConfig: every knob of a fine-tuning run, from Megatron-style CLI flags, validated once.

Config flows one way: `parse_train_args(argv)` -> `TrainConfig` (validated in
`__post_init__`) -> the trainer and the modules it builds. Nothing reads globals.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

from megatron_dynamoe.parallel import ParallelLayout

LR_DECAY_STYLES = ("constant", "linear", "cosine")


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
    # Layout.
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    moe_token_dispatcher_type: str = "alltoall"
    use_distributed_optimizer: bool = True
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
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    bf16: bool = False
    seed: int = 1234
    # Data: Megatron-style blend "W1 PREFIX1 W2 PREFIX2 ..." (or one prefix), split "98,2,0"-style,
    # tokenised by --tokenizer (an HF folder, or 'smollm2'; + --gguf-file).
    data_path: List[str] = field(default_factory=list)
    split: str = "100,0,0"  # no in-training evaluation yet: all documents train
    data_cache_path: Optional[str] = None
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
    dynamoe_label_tolerance: Optional[float] = None  # None: keep the checkpoint's value
    dynamoe_label_fraction: Optional[float] = None
    dynamoe_router_loss_coeff: Optional[float] = None
    # Stop after this many iterations of this run (tests, time-limited jobs); None = no limit.
    exit_after_iters: Optional[int] = None

    def __post_init__(self):
        if self.load is None and self.pretrained_checkpoint is None and self.model is None:
            raise ValueError("nothing to train: pass --load CHECKPOINT, "
                             "--pretrained-checkpoint CHECKPOINT or --model PRESET")
        for name in ("micro_batch_size", "global_batch_size", "seq_length", "train_iters",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError("--save-interval must be >= 1")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r}: use one of "
                             f"{LR_DECAY_STYLES}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.lr_warmup_iters < 0 or self.lr_warmup_iters > self.train_iters:
            raise ValueError("--lr-warmup-iters must be in [0, --train-iters]")
        if not 0.0 <= self.dynamoe_sensitivity_min <= self.dynamoe_sensitivity_max <= 1.0:
            raise ValueError("need 0 <= --dynamoe-sensitivity-min <= --dynamoe-sensitivity-max "
                             "<= 1")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # nothing to split: Megatron does the same
        if self.moe_token_dispatcher_type not in ("alltoall", "allgather"):
            raise ValueError("--moe-token-dispatcher-type must be 'alltoall' or 'allgather'")

    @property
    def layout(self) -> ParallelLayout:
        """The parallel layout of the run."""
        return ParallelLayout(tensor_model_parallel_size=self.tensor_model_parallel_size,
                              pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                              expert_model_parallel_size=self.expert_model_parallel_size)

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


def build_parser() -> argparse.ArgumentParser:
    """The `launch/train.py` argument parser (one flag per TrainConfig field)."""
    p = argparse.ArgumentParser(description="Fine-tune a DynaMoE (or dense) GPT model on "
                                            "Megatron-Core.")
    defaults = TrainConfig(model="tiny-llama")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        default = getattr(TrainConfig, name, None) if name != "data_path" else []
        if name == "model":
            default = None
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true", default=default)
        elif name == "data_path":
            p.add_argument(flag, nargs="+", default=[])
        else:
            kind = type(value) if value is not None else None
            if name in ("save_interval", "exit_after_iters"):
                kind = int
            elif name.startswith("dynamoe_") and value is None:
                kind = float
            elif kind is None:
                kind = str
            p.add_argument(flag, type=kind, default=default)
    return p


def parse_train_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags -> validated TrainConfig (ValueError names the bad flag and the fix)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))
