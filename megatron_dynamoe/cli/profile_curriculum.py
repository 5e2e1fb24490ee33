"""Score every training sequence for a curriculum (simple -> complex) with a checkpoint.

Runs the checkpoint (forward only, one process, TP = PP = EP = 1) over the training samples
of the run to come, in dataset order, and writes one score per sample: for an adaptive-gating
MoE checkpoint the share of tokens that took two or more experts, averaged over the MoE
layers; for a DynaMoE checkpoint the mean difficulty level at `--sensitivity`. The data
flags must be the training run's (they define the samples and their order); the scores file
records them, and `megatron_dynamoe.data.curriculum.CurriculumOrder` turns it into the order.

    python tools/profile_curriculum.py --load ckpt/smollm2-adaptive --tokenizer smollm2 \\
        --data-path data/sotu_text_document --seq-length 256 --train-iters 200 \\
        --global-batch-size 8 --output runs/ft/curriculum.json
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_dynamoe.cli.common import (
    COUNT,
    NON_NEGATIVE_INT,
    ArgumentParser,
    finite_float,
    run_tool,
)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--load", required=True, help="adaptive-gating or DynaMoE model checkpoint")
    p.add_argument("--output", required=True, help="scores file to write (.json or .npz)")
    p.add_argument("--overwrite", action="store_true")
    d = p.add_argument_group("training data (the same flags as the training run)")
    d.add_argument("--data-path", nargs="+", required=True)
    d.add_argument("--tokenizer", required=True)
    d.add_argument("--gguf-file")
    d.add_argument("--seq-length", type=COUNT, default=256)
    d.add_argument("--train-iters", type=COUNT, default=100)
    d.add_argument("--global-batch-size", type=COUNT, default=8)
    d.add_argument("--split", default="100,0,0")
    d.add_argument("--seed", type=NON_NEGATIVE_INT, default=1234)
    d.add_argument("--data-cache-path")
    r = p.add_argument_group("routing")
    r.add_argument("--threshold", type=finite_float,
                   help="adaptive threshold T to profile with (default: the checkpoint's)")
    r.add_argument("--sensitivity", type=finite_float, default=0.5,
                   help="DynaMoE sensitivity theta to profile with (theta = 1 puts every "
                        "token at the last level, which scores nothing)")
    p.add_argument("--batch-size", type=COUNT, default=8,
                   help="sequences per forward (DynaMoE models use 1)")
    from megatron_dynamoe.cli.common import add_runtime_arguments

    add_runtime_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint, read_info
    from megatron_dynamoe.utils.outputs import check_output_path
    from megatron_dynamoe.cli.common import start_runtime
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.utils.log import log, progress
    from megatron_dynamoe.data.curriculum import profile_scores, save_scores

    if not args.output.endswith((".json", ".npz")):
        raise ToolError(f"--output {args.output}: name a .json or .npz scores file")
    check_output_path(args.output, args.overwrite,
                      (args.load, *args.data_path, *(p + s for p in args.data_path
                                                     for s in (".bin", ".idx"))))
    for name in ("seq_length", "train_iters", "global_batch_size", "batch_size"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name.replace('_', '-')} must be >= 1")
    info = read_info(args.load)
    if info is None:
        raise ToolError(f"{args.load} has no model.json: profile an adaptive-gating or "
                        f"DynaMoE checkpoint")

    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider, set_threshold
    from megatron_dynamoe.models.builder import ModelProvider
    from megatron_dynamoe.dynamoe.control import set_sensitivity
    from megatron_dynamoe.models.registry import family_of
    from megatron_dynamoe.runtime.device import place_batch
    from megatron_dynamoe.runtime.parallel import ParallelLayout

    if family_of(info) == "adaptive":
        provider, metric = AdaptiveMoEProvider.from_checkpoint_info(info), "two-expert-share"
        batch_size = args.batch_size
    elif info.dynamoe is not None:
        provider, metric = ModelProvider(info.architecture, info.dynamoe), "mean-level"
        batch_size = 1   # DynaMoE layers report statistics per micro-batch
    else:
        raise ToolError(f"{args.load} is a dense checkpoint: nothing routes its tokens")

    start_runtime(args, seed=args.seed)
    model = provider.build(provider.transformer_config(ParallelLayout(),
                                                       perform_initialization=False))
    load_checkpoint(model, args.load, verify_checksums=args.verify_checksums)
    if metric == "two-expert-share" and args.threshold is not None:
        set_threshold(model, args.threshold)
    if metric == "mean-level":
        set_sensitivity(model, args.sensitivity)

    from megatron_dynamoe.data.datasets import build_gpt_datasets, default_cache_path
    from megatron_dynamoe.data.sampling import collate_samples
    from megatron_dynamoe.data.tokenizer import HFTokenizerAdapter
    from megatron_dynamoe.checkpoint.hf import load_tokenizer

    tokenizer = HFTokenizerAdapter(load_tokenizer(args.tokenizer, args.gguf_file), args.tokenizer)
    if tokenizer.vocab_size > info.architecture.vocab_size:
        raise ToolError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                        f"vocabulary is {info.architecture.vocab_size}: use the model's own")
    num_samples = args.train_iters * args.global_batch_size
    cache = args.data_cache_path or default_cache_path()
    dataset = build_gpt_datasets(args.data_path, tokenizer, seq_length=args.seq_length,
                                 num_samples=(num_samples, 0, 0), cache_path=cache,
                                 split=args.split, seed=args.seed).train
    count = min(num_samples, len(dataset))
    log(f"profiling {count} samples of {args.seq_length} tokens with {args.load} ({metric})")
    batches = (place_batch(collate_samples([dataset[i]
                                            for i in range(s, min(s + batch_size, count))]))
               for s in range(0, count, batch_size))
    provenance = dict(
        tool="tools/profile_curriculum.py", checkpoint=os.path.abspath(args.load),
        metric=metric, data_path=list(args.data_path), tokenizer=args.tokenizer,
        seq_length=args.seq_length, num_samples=num_samples, split=args.split,
        seed=args.seed,
        threshold=(provider.gating.threshold if args.threshold is None else args.threshold)
        if metric == "two-expert-share" else None,
        sensitivity=args.sensitivity if metric == "mean-level" else None)
    scores = profile_scores(model, progress(batches, "profiling",
                                            total=-(-count // batch_size)),
                            metric, range(count), provenance)
    save_scores(args.output, scores)
    values = scores.scores
    log(f"wrote {args.output}: {len(values)} scores, min {values.min():.4f}, mean "
        f"{values.mean():.4f}, max {values.max():.4f}")
    return 0


def entry() -> None:
    """The console command (see setup.py) and `python tools/profile_curriculum.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
