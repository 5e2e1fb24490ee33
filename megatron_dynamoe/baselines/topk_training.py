"""Fine-tune the top-k baseline through the same trainer, data and flags as DynaMoE.

Two steps, each a command:

    # DynaMoE checkpoint -> top-k initial checkpoint (same weights, zero [S, H] top-k routers);
    # checked: k = S equals theta = 1 and k = level K-1's shells its static level (logits)
    python -m megatron_dynamoe.evaluation.topk_training init --load ckpt/smollm2-dynamoe \\
        --output ckpt/smollm2-topk
    # fine-tune it: exactly launch/train.py's flags (any launcher), the model built by
    # baselines.TopKProvider (Megatron's TopKRouter over the shells, k drawn per forward)
    torchrun --nproc-per-node 2 -m megatron_dynamoe.evaluation.topk_training train \\
        --pretrained-checkpoint ckpt/smollm2-topk --tokenizer smollm2 --data-path data/sotu ...

Giving the top-k baseline the same data, iterations, batch and learning-rate schedule as the
DynaMoE fine-tune is what makes the comparison fair: both start from the same MoEfied
weights and both get one fine-tune for all of their budgets.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from megatron_dynamoe.cli import run_tool

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch_train_module():
    """launch/train.py as a module (its data and model resolution are reused as they are)."""
    path = os.path.join(_REPO, "launch", "train.py")
    spec = importlib.util.spec_from_file_location("launch_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_topk_init(load: str, output: str, overwrite: bool = False,
                    tolerance: float = 1e-4, device: str = "auto",
                    verify_checksums: bool = True) -> None:
    """Write the top-k initial checkpoint of DynaMoE checkpoint `load` to `output` after its
    parity checks (single process): k = S against theta = 1 at `tolerance`, and the untrained
    router at k < S against the static sub-network of as many shells (the tie-break picks
    the most important ones) at max(`tolerance`, 1e-3)."""
    import torch

    from megatron_dynamoe.architectures import transformer_config
    from megatron_dynamoe.checkpointing import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.cli import (
        ToolError,
        check_output_path,
        check_parity,
        megatron_logits,
        tree_size,
    )
    from megatron_dynamoe.evaluation.baselines import (
        TOPK_FAMILY,
        build_topk_model,
        set_topk,
        topk_overrides,
        topk_state_from_dynamoe,
    )
    from megatron_dynamoe.evaluation.loading import load_for_evaluation
    from megatron_dynamoe.model_builder import set_sensitivity, set_static_level
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    check_output_path(output, overwrite, (load,), needed_bytes=tree_size(load))
    initialize_parallel(ParallelLayout(), device=device)
    source = load_for_evaluation(load, verify_checksums=verify_checksums)
    if source.family != "dynamoe":
        raise ToolError(f"{load} is a {source.family} checkpoint: the top-k baseline starts "
                        f"from a DynaMoE (MoEfied) checkpoint")
    arch, dyn = source.info.architecture, source.info.dynamoe
    model = build_topk_model(arch, transformer_config(arch, dynamoe=dyn,
                                                      perform_initialization=False,
                                                      **topk_overrides(dyn)), dyn)
    model.load_state_dict(topk_state_from_dynamoe(source.model.state_dict(), dyn))
    tokens = torch.randint(0, arch.vocab_size, (2, min(64, arch.max_position_embeddings)),
                           generator=torch.Generator().manual_seed(0))
    set_sensitivity(source.model, 1.0)
    set_topk(model, dyn.num_shells)
    check_parity(megatron_logits(source.model, tokens), megatron_logits(model, tokens),
                 tolerance, "top-k k = S vs DynaMoE theta = 1")
    # The tie-break offset moves the unit weights by ~1e-6 relative; a narrow sub-network
    # of a real model amplifies that through its layers, hence the looser check.
    level = max(1, dyn.num_levels - 1)
    set_static_level(source.model, level)
    set_topk(model, dyn.level_shells[level - 1])
    check_parity(megatron_logits(source.model, tokens), megatron_logits(model, tokens),
                 max(tolerance, 1e-3), f"untrained top-k k = {dyn.level_shells[level - 1]} "
                                       f"shells vs static level {level}")
    extra = dict(source=os.path.abspath(source.path), model_family=TOPK_FAMILY,
                 tool="megatron_dynamoe.evaluation.topk_training init")
    save_checkpoint(model, output, CheckpointInfo(arch, dyn, extra), overwrite)


def train_topk(argv) -> int:
    """launch/train.py's main with the model built by TopKProvider (its flags, device policy,
    preemption handling and process-group tear-down included)."""
    from megatron_dynamoe.cli import ToolError
    from megatron_dynamoe.evaluation.baselines import TopKProvider
    from megatron_dynamoe.evaluation.loading import model_family

    def provider_for(info):
        if model_family(info) != "topk":
            raise ToolError("start the top-k fine-tune from a top-k checkpoint (the `init` step "
                            "writes one), or resume its --save folder")
        return TopKProvider(info.architecture, info.dynamoe)

    return _launch_train_module().main(argv, provider_for=provider_for)


def main(argv=None) -> int:
    """`init --load DYNAMOE --output DIR [--overwrite]` or `train <launch/train.py flags>`."""
    from megatron_dynamoe.cli import ArgumentParser

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
    write_topk_init(args.load, args.output, args.overwrite, device=args.device,
                    verify_checksums=args.verify_checksums)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
