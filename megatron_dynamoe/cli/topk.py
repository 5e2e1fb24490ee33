"""Fine-tune the top-k baseline through the same trainer, data and flags as DynaMoE.

Two steps, each a command:

    # DynaMoE checkpoint -> top-k initial checkpoint (same weights, zero [S, H] top-k routers);
    # checked: k = S equals theta = 1 and k = level K-1's shells its static level (logits)
    python -m megatron_dynamoe.cli.topk init --load ckpt/smollm2-dynamoe \\
        --output ckpt/smollm2-topk
    # fine-tune it: exactly launch/train.py's flags (any launcher), the model built by
    # baselines.TopKProvider (Megatron's TopKRouter over the shells, k drawn per forward)
    torchrun --nproc-per-node 2 -m megatron_dynamoe.cli.topk train \\
        --pretrained-checkpoint ckpt/smollm2-topk --tokenizer smollm2 --data-path data/sotu ...

Giving the top-k baseline the same data, iterations, batch and learning-rate schedule as the
DynaMoE fine-tune is what makes the comparison fair: both start from the same MoEfied
weights and both get one fine-tune for all of their budgets.
"""

from __future__ import annotations

import sys

from megatron_dynamoe.cli.common import run_tool


def train_topk(argv) -> int:
    """launch/train.py's main (which trains every family, the top-k baseline included: its
    checkpoints name their family), refusing a checkpoint of another family: `train` here
    promises the top-k fine-tune."""
    from megatron_dynamoe.models.registry import family_of, provider_for
    from megatron_dynamoe.utils.errors import ToolError

    def topk_only(info):
        if family_of(info) != "topk":
            raise ToolError("start the top-k fine-tune from a top-k checkpoint (the `init` step "
                            "writes one), or resume its --save folder")
        return provider_for(info)

    from megatron_dynamoe.cli.train import main as train_main

    return train_main(argv, provider_for=topk_only)


def main(argv=None) -> int:
    """`init --load DYNAMOE --output DIR [--overwrite]` or `train <launch/train.py flags>`."""
    from megatron_dynamoe.cli.common import ArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train_topk(argv[1:])
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="top-k initial checkpoint from a DynaMoE checkpoint")
    init.add_argument("--load", required=True)
    init.add_argument("--output", required=True)
    init.add_argument("--overwrite", action="store_true")
    from megatron_dynamoe.runtime.device import DEVICE_CHOICES

    init.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    init.add_argument("--no-verify-checksums", dest="verify_checksums", action="store_false")
    sub.add_parser("train", help="fine-tune (launch/train.py flags)")
    args = parser.parse_args(argv)
    from megatron_dynamoe.baselines.topk_init import write_topk_init

    write_topk_init(args.load, args.output, args.overwrite, device=args.device,
                    verify_checksums=args.verify_checksums)
    return 0


def entry() -> None:
    """The `dynamoe-topk` console command and `python -m megatron_dynamoe.cli.topk`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
