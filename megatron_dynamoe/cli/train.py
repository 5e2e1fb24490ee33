"""Fine-tune a DynaMoE (or dense) GPT model with Megatron-Core: one process per rank.

    torchrun --nproc-per-node 2 launch/train.py --load ckpt/smollm2-dynamoe \\
        --tokenizer smollm2 --data-path data/sotu_text_document --save runs/ft \\
        --tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 2 \\
        --global-batch-size 8 --seq-length 256 --train-iters 200 --lr 1e-4 \\
        --save-interval 50 --tensorboard-dir runs/ft/tb

`--load DIR` resumes from DIR's latest complete training checkpoint when it has one;
otherwise the run starts from `--pretrained-checkpoint DIR` (a model checkpoint: fresh
optimizer) when given, else from DIR itself as a model checkpoint (tools/convert_checkpoint.py,
tools/moefy.py), so `--load SAVE --pretrained-checkpoint INIT` is one command for the first
start and every requeue; `--model PRESET` starts from random weights. SIGTERM / SIGUSR1 save a checkpoint after the current iteration
and exit 0, so a SLURM requeue resumes with the same command.
"""

from __future__ import annotations

import sys

from megatron_dynamoe.cli.common import run_tool


def main(argv=None, provider_for=None) -> int:
    """The training command: flags -> TrainConfig -> `training.run.run_training`;
    `provider_for(info)` picks the model provider (default: the family registry's)."""
    from megatron_dynamoe.utils.log import log
    from megatron_dynamoe.runtime import launch_env
    from megatron_dynamoe.training.config import parse_train_args
    from megatron_dynamoe.training.preemption import PreemptionFlag
    from megatron_dynamoe.training.run import run_training, set_cuda_connection_limit

    # First of all, SIGTERM / SIGUSR1 only set a flag: a preemption during the (long) start-up
    # (model build, checkpoint load) then ends the job cleanly before its first iteration
    # instead of killing it with the signal's default action.
    preempted = PreemptionFlag()
    with preempted.installed():
        # Rank discovery (torchrun, srun, mpirun, DeepSpeed launcher) -> RANK / WORLD_SIZE /
        # MASTER_* for initialize_parallel; also drops a launcher-appended --local_rank.
        launch, argv = launch_env.prepare(argv)
        log(launch.describe())
        cfg = parse_train_args(argv)
        set_cuda_connection_limit(cfg)
        return run_training(cfg, preempted, provider_for)


def entry() -> None:
    """The console command (see setup.py) and `python launch/train.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
