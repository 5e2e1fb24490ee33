"""MoEfy a dense Megatron-Core checkpoint into a DynaMoE checkpoint.

Ranks every FFN's neurons (calibration activations on real text, or data-free weight norms),
permutes them, cuts them into nested shells, fits the difficulty routers to their labels on
the calibration text (zero-initialised, i.e. uniform levels, without calibration text or with
--no-dynamoe-fit-routers), checks that theta = 1 reproduces the dense model's logits, and only
then writes the DynaMoE checkpoint (torch_dist + model.json recording the DynaMoE config and
the router fit).

Runs as one process or as a distributed job at any TP / PP (launch TP x PP ranks with
torchrun or srun): both models are built at that layout (each rank holds its pipeline stage's
tensor-parallel slices), calibration runs through Megatron's forward-only schedule, each FFN
is gathered over TP one layer at a time to be permuted and cut, each stage fits its own
routers, and the theta = 1 parity is checked on the distributed model. The checkpoint is the
same as one process writes and layout-independent (shells are keyed by importance order, not
by EP rank): it loads at any TP / PP / EP.

    python tools/moefy.py --load ckpt/smollm2 --output ckpt/smollm2-dynamoe --tokenizer smollm2
    python tools/moefy.py --load plain_ckpt --model tiny-llama --dynamoe-importance weight ...
    torchrun --nproc-per-node 8 tools/moefy.py --load ckpt/llama70b --output ckpt/l70-dyn \
        --tokenizer hf/llama70b --tensor-model-parallel-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_dynamoe.cli.common import (
    add_architecture_arguments,
    architecture_flags,
    COUNT,
    NON_NEGATIVE_INT,
    POSITIVE,
    ArgumentParser,
    add_dynamoe_config_arguments,
    add_layout_arguments,
    add_parity_arguments,
    add_runtime_arguments,
    calibration_windows,
    dynamoe_config_from_args,
    run_tool,
)


FP32_TOLERANCE = 1e-4
# theta = 1 sums the shells' bf16 outputs in another order than the dense FFN's one product:
# bf16 rounding (2^-8 relative) shows in the logits at about 1e-2 of their scale.
BF16_TOLERANCE = 2e-2


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--load", required=True, help="dense torch_dist checkpoint folder")
    p.add_argument("--model", help="architecture preset, for a plain Megatron-Core checkpoint "
                                   "without model.json")
    p.add_argument("--output", required=True, help="DynaMoE checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true")
    d = p.add_argument_group("DynaMoE")
    add_dynamoe_config_arguments(d)
    d.add_argument("--dynamoe-fit-routers", action=argparse.BooleanOptionalAction,
                   default=None, help="fit the routers to their labels on the calibration "
                   "text (default: on when --tokenizer gives calibration text)")
    d.add_argument("--router-fit-steps", type=NON_NEGATIVE_INT, default=300,
                   help="full-batch Adam steps per router (convex problem)")
    d.add_argument("--router-fit-lr", type=POSITIVE, default=1e-2)
    d.add_argument("--router-fit-sequences", type=COUNT, default=None,
                   help="fit the routers on the first N calibration windows only (default: "
                        "all of them; neuron importance always uses all): the label passes "
                        "and the fit cost time in proportion")
    d.add_argument("--router-fit-memory-gib", type=POSITIVE, default=4.0,
                   help="router data one rank holds at once (fp32 inputs and targets of "
                        "every calibration token; 1 GiB per layer for 32k tokens of a 70B "
                        "model): layers are fitted in groups, one calibration pass per group")
    c = p.add_argument_group("calibration and parity text")
    c.add_argument("--tokenizer", help="Hugging Face folder with a tokenizer, or 'smollm2'; "
                                       "needed for activation importance")
    c.add_argument("--gguf-file", help="GGUF file inside --tokenizer's folder")
    add_parity_arguments(c, sequences=16, tolerance=None,
                         tolerance_help=f"theta = 1 parity (default {FP32_TOLERANCE:g}, "
                                        f"{BF16_TOLERANCE:g} with --bf16)")
    p.add_argument("--bf16", action="store_true",
                   help="build both models in bf16 (a bf16 source loses nothing; half the "
                        "memory: a 70B model MoEfies on one node of 80 GB GPUs at TP=8); "
                        "importance and router fits still accumulate in fp64 / fp32; the "
                        "parity tolerance default becomes 2e-2")
    add_layout_arguments(p)
    add_architecture_arguments(p)
    add_runtime_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.checkpoint.torch_dist import (
        CheckpointInfo,
        load_checkpoint,
        resolve_architecture,
        save_checkpoint,
    )
    from megatron_dynamoe.utils.outputs import check_output_path, tree_size
    from megatron_dynamoe.cli.common import layout_from_args, require_one_replica, start_runtime
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.utils.log import log, progress
    from megatron_dynamoe.utils.parity import check_error, layout_logit_error, model_batches
    from megatron_dynamoe.dynamoe.moefy import (
        ACTIVATION_STATISTICS,
        calibrate_importance,
        check_moefied_layers,
        load_moefied,
        moefy_state_items,
    )
    from megatron_dynamoe.dynamoe.router_fit import fit_routers as fit_routers_to_labels
    from megatron_dynamoe.models.builder import build_gpt_model
    from megatron_dynamoe.dynamoe.control import set_sensitivity

    dyn = dynamoe_config_from_args(args)
    layout = layout_from_args(args)
    check_output_path(args.output, args.overwrite, (args.load, args.tokenizer),
                      needed_bytes=tree_size(args.load))
    arch, info = resolve_architecture(args.load, args.model, architecture_flags(args))
    if info is not None and info.dynamoe is not None:
        raise ToolError(f"{args.load} is already a DynaMoE checkpoint; MoEfy a dense one")
    # Refuse a layout that does not fit before loading anything.
    check_moefied_layers(dyn, arch.num_layers)
    transformer_config(arch, layout, dyn)
    if layout.expert_model_parallel_size != 1:
        raise ToolError("MoEfy runs at --expert-model-parallel-size 1 (TP and PP split the "
                        "work; the checkpoint it writes loads at any EP)")
    if dyn.importance == "output-error" and layout.tensor_model_parallel_size != 1:
        raise ToolError("--dynamoe-importance output-error ranks each FFN's neurons with "
                        "their pairwise correlations, on one rank: MoEfy at "
                        "--tensor-model-parallel-size 1 (PP may split the layers)")
    statistic = ACTIVATION_STATISTICS.get(dyn.importance)  # None: data-free importance
    if statistic is not None and args.tokenizer is None:
        raise ToolError("activation importance needs calibration text: pass --tokenizer "
                        "(a Hugging Face folder, or 'smollm2'), or use --dynamoe-importance weight")
    fit_routers = args.dynamoe_fit_routers
    if fit_routers is None:
        fit_routers = args.tokenizer is not None
    if fit_routers and args.tokenizer is None:
        raise ToolError("--dynamoe-fit-routers needs calibration text: pass --tokenizer (a "
                        "Hugging Face folder, or 'smollm2'), or --no-dynamoe-fit-routers")
    if (fit_routers and args.router_fit_sequences is not None
            and args.router_fit_sequences > args.calibration_sequences):
        raise ToolError(f"--router-fit-sequences {args.router_fit_sequences} is more than the "
                        f"{args.calibration_sequences} calibration windows: lower it or raise "
                        f"--calibration-sequences")
    log(f"MoEfying {args.load}: {dyn.num_shells} shells, levels {list(dyn.level_fractions)}, "
        f"{dyn.importance} importance at TP={layout.tensor_model_parallel_size} "
        f"PP={layout.pipeline_model_parallel_size} (the checkpoint loads at any layout)")

    start_runtime(args, layout, local_weights=True)
    require_one_replica(layout, "MoEfy")
    # Both models take their weights from checkpoints: no random-init work.
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.tolerance is None:
        args.tolerance = BF16_TOLERANCE if args.bf16 else FP32_TOLERANCE
    dense = build_gpt_model(arch, transformer_config(arch, layout, params_dtype=dtype,
                                                     perform_initialization=False))
    load_checkpoint(dense, args.load, verify_checksums=args.verify_checksums)

    if args.tokenizer is not None:
        tokens = calibration_windows(args)
    else:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, arch.vocab_size, (2, min(64, arch.max_position_embeddings)),
                               generator=generator)
    importance = None
    if statistic is not None:
        batches = progress(model_batches(tokens, args.batch_size), "calibration",
                           total=-(-tokens.shape[0] // args.batch_size))
        importance = calibrate_importance(dense, batches, gated=arch.gated,
                                          activation=arch.activation_func,
                                          statistic=statistic)

    model = build_gpt_model(arch, transformer_config(arch, layout, dyn, params_dtype=dtype,
                                                     perform_initialization=False), dyn)
    from megatron.core import parallel_state

    first_layer = min(layer.layer_number for layer in dense.decoder.layers) - 1
    # Layer by layer: the DynaMoE weights never exist twice beside the dense ones.
    load_moefied(model, moefy_state_items(
        dense.state_dict(), dyn, arch.gated, importance, layer_offset=first_layer,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        expert_tp_group=parallel_state.get_expert_tensor_parallel_group()))
    router_fit = None
    if fit_routers:
        fit_tokens = tokens[:args.router_fit_sequences or tokens.shape[0]]
        fits = fit_routers_to_labels(model, model_batches(fit_tokens, args.batch_size),
                                     steps=args.router_fit_steps, lr=args.router_fit_lr,
                                     progress=lambda xs: progress(xs, "router labels + fit"),
                                     max_bytes=args.router_fit_memory_gib * 2 ** 30)
        router_fit = dict(steps=args.router_fit_steps, lr=args.router_fit_lr,
                          tokens=fits[0].tokens, layers=[f.to_dict() for f in fits])
        gap = sum(f.loss - f.target_entropy for f in fits) / len(fits)
        log(f"routers fitted on {fits[0].tokens} calibration tokens per layer: mean "
            f"cross-entropy {sum(f.loss for f in fits) / len(fits):.3f} (uniform "
            f"{sum(f.initial_loss for f in fits) / len(fits):.3f}, lower bound "
            f"{sum(f.target_entropy for f in fits) / len(fits):.3f}, gap {gap:.3f}), median-"
            f"level accuracy {sum(f.accuracy for f in fits) / len(fits):.3f}")
    set_sensitivity(model, 1.0)
    probe = tokens[:2]
    error = check_error(layout_logit_error(dense, model, probe, args.batch_size),
                        args.tolerance, "DynaMoE theta = 1 vs dense")
    set_sensitivity(model, dyn.sensitivity)
    extra = dict(source=os.path.abspath(args.load), importance=dyn.importance,
                 calibration_text=args.calibration_text if importance is not None else None,
                 calibration_tokens=int(tokens.numel()) if importance is not None else 0,
                 theta1_parity=error, tokenizer=args.tokenizer, gguf_file=args.gguf_file,
                 router_fit=router_fit, params_dtype=str(dtype).replace("torch.", ""),
                 layout=dict(tensor_model_parallel_size=layout.tensor_model_parallel_size,
                             pipeline_model_parallel_size=layout.pipeline_model_parallel_size),
                 tool="tools/moefy.py")
    save_checkpoint(model, args.output, CheckpointInfo(arch, dyn, extra), args.overwrite)
    log(f"wrote DynaMoE checkpoint {args.output}")
    return 0


def entry() -> None:
    """The console command (see setup.py) and `python tools/moefy.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
