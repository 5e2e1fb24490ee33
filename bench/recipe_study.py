"""The fine-tuning recipe study: which knobs keep general ability at 0.6 FFN compute.

Each variant is the main job's DynaMoE fine-tune (`python -m megatron_dynamoe.cli.demo`: same
data, batch, length, iterations and schedule, the same flags) with one knob changed, run with
`launch/train.py` under torchrun, then measured with `tools/evaluate.py` at the main job's
FFN budget (0.6): perplexity relative to the dense model on the held-out speeches (the text
fine-tuned on) and on Shakespeare's plays (text of another kind: the objective), and LAMBADA
target-word perplexity relative to dense. One variant is not fine-tuned at all (the MoEfied
model as it starts), so the table shows what the fine-tune itself adds or destroys.

It reuses a main-job folder for the converted and MoEfied checkpoints and the dataset
(`--job`, made by `python -m megatron_dynamoe.cli.demo --no-static-baseline --no-topk`):

    python bench/recipe_study.py --job outputs/main --output-dir outputs/recipe-study
    python bench/recipe_study.py --job outputs/main --variants base,distill-0.9
    python bench/recipe_study.py --quick --json /tmp/study.json   # tiny model, (a test runs it)

Each finished variant is kept (`VARIANT/result.json`) and skipped when the study is run
again, so an interrupted study resumes; `--overwrite` starts over. Fine-tuned checkpoints are
deleted after their evaluation (`--keep-checkpoints` keeps them). Writes study.json and
study.md (the table of every variant finished in --output-dir, this call's and earlier
ones') to --output-dir. `--quick` builds a tiny randomly initialised
SmolLM2-vocabulary model in a temporary folder (the same tools, 2 iterations, 1 window per
text): numbers that mean nothing, a command that keeps working.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

from megatron_dynamoe.cli import demo
from megatron_dynamoe.utils.errors import ToolError
from megatron_dynamoe.utils.log import log

# name -> (what changes, main-job settings it changes (cli/demo.py's flags, so that the
# schedule follows as in the main job), launch/train.py flags added after the recipe's).
VARIANTS: Dict[str, Tuple[str, Dict[str, object], List[str]]] = {
    "no-fine-tune": ("the MoEfied model, not fine-tuned", {}, []),
    "base": ("the main job's recipe", {}, []),
    "base-seed-2": ("the main job's recipe, another seed (theta draws, data order): the noise",
                    {}, ["--seed", "2"]),
    "no-distill": ("without distillation", {"distill": False}, []),
    "distill-0.9": ("distillation weight 0.9", {}, ["--dynamoe-distill-weight", "0.9"]),
    "distill-1.0": ("distillation only (no LM loss)", {}, ["--dynamoe-distill-weight", "1.0"]),
    "distill-T2": ("distillation temperature 2", {}, ["--dynamoe-distill-temperature", "2"]),
    "lr-5e-5": ("peak learning rate 5e-5", {"lr": 5e-5}, []),
    "lr-5e-4": ("peak learning rate 5e-4", {"lr": 5e-4}, []),
    "router-loss-0.1": ("router loss coefficient 0.1", {},
                        ["--dynamoe-router-loss-coeff", "0.1"]),
    "router-lr-10": ("router learning-rate multiplier 10", {}, ["--router-lr-mult", "10"]),
    "tolerance-0.01-0.2": ("label tolerance range [0.01, 0.2]", {},
                           ["--dynamoe-label-tolerance", "0.01",
                            "--dynamoe-label-tolerance-max", "0.2"]),
    "theta-0.5-1": ("theta drawn from [0.5, 1]", {"sensitivity_min": 0.5}, []),
    "theta-0.5-1-seed-2": ("theta drawn from [0.5, 1], seed 2", {"sensitivity_min": 0.5},
                           ["--seed", "2"]),
    "label-fraction-0.5": ("labels (full-FFN pass) on half the steps", {},
                           ["--dynamoe-label-fraction", "0.5"]),
    "iters-32": ("32 iterations (twice the tokens)", {"train_iters": 32}, []),
    # The fine-tuning data blended with the dense model's own samples (the job folder needs
    # them: `cli.demo --self-sample-weight W` writes data/self-samples.bin).
    "self-mix-0.25": ("a quarter of the data the dense model's own samples",
                      {"self_sample_weight": 0.25}, []),
    "self-mix-0.5": ("half of the data the dense model's own samples",
                     {"self_sample_weight": 0.5}, []),
    "self-mix-0.5-seed-2": ("half of the data the dense model's own samples, seed 2",
                            {"self_sample_weight": 0.5}, ["--seed", "2"]),
    "theta-0.1-1": ("theta drawn from [0.1, 1]", {"sensitivity_min": 0.1}, []),
    "ffn-only": ("only the FFNs trained (attention, norms, embeddings frozen)", {},
                 ["--trainable-params", "ffn"]),
    "ffn-only-seed-2": ("only the FFNs trained, seed 2", {},
                        ["--trainable-params", "ffn", "--seed", "2"]),
}
DEFAULT_VARIANTS = ",".join(VARIANTS)
OOD = demo.OOD_TEXT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", help="main-job output folder (ckpt/smollm2, ckpt/smollm2-dynamoe, "
                                 "data/sotu); not with --quick")
    p.add_argument("--output-dir", default="outputs/recipe-study")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of {DEFAULT_VARIANTS}")
    p.add_argument("--main-job-args", default="",
                   help="main-job flags of the recipe (e.g. '--train-iters 32 --lr 1e-4'); "
                        "the main job's defaults otherwise")
    p.add_argument("--ffn-budget", default="0.6")
    p.add_argument("--eval-sequences", type=int, default=8)
    p.add_argument("--lambada-limit", type=int, default=50)
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write study.json's rows here")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {','.join(unknown)}: choose from {DEFAULT_VARIANTS}")
    if bool(args.job) == bool(args.quick):
        p.error("give --job FOLDER (a main-job output folder) or --quick")
    return args


def _run(command: List[str], log_path: str) -> float:
    """Runs one tool, its output into log_path; seconds; ToolError naming the log on failure."""
    tic = time.time()
    with open(log_path, "w") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise ToolError(f"{' '.join(command[:4])} ... failed (exit {code}): see {log_path}")
    return time.time() - tic


def _train_command(job_args, job: str, name: str, save: str, tb: str) -> List[str]:
    """The main job's DynaMoE fine-tune command, with variant `name`'s changes."""
    _, settings, flags = VARIANTS[name]
    job_args = argparse.Namespace(**{**vars(job_args), **settings})
    ckpt = os.path.join(job, "ckpt")
    return demo.torchrun_command(job_args.nproc) + [
        "-m", "megatron_dynamoe.cli.train", "--pretrained-checkpoint",
        os.path.join(ckpt, "smollm2-dynamoe"), "--save", save, "--tensorboard-dir", tb,
        *demo.recipe_flags(job_args, os.path.join(ckpt, "smollm2")),
        *demo.fine_tune_flags(job_args, os.path.join(job, "data"),
                              os.path.join(job, "data", "cache")), *flags]


def _evaluate_command(args, job_args, job: str, load: str, out: str) -> List[str]:
    return [sys.executable, "-m", "megatron_dynamoe.cli.evaluate", "--load", load,
            "--dense-load", os.path.join(job, "ckpt", "smollm2"), "--tokenizer", "smollm2",
            "--output-dir", out, "--overwrite", "--baselines", "dense",
            "--ffn-budget", args.ffn_budget, "--tasks", "lambada",
            "--limit", str(args.lambada_limit), "--eval-sequences", str(args.eval_sequences),
            "--held-out-docs", str(job_args.held_out_docs), "--text", demo.TRAIN_TEXT,
            "--ood-text", OOD, "--calibration-sequences", str(max(2, args.eval_sequences)),
            *(["--seq-length", "32", "--max-length", "64"] if args.quick else [])]


def summarize(results: dict) -> dict:
    """One study row from evaluate's results.json: the first DynaMoE (budget) row against
    the dense row."""
    rows = results["rows"]
    dense = next(r for r in rows if r["family"] == "dense")
    dyn = next(r for r in rows if r["family"] == "dynamoe")
    lam, lam_dense = dyn["tasks"]["lambada"]["perplexity"], dense["tasks"]["lambada"]["perplexity"]
    return dict(setting=dyn["setting"], ffn_fraction=dyn["ffn_fraction_text"],
                perplexity=dyn["perplexity"], dense_perplexity=dense["perplexity"],
                perplexity_vs_dense=dyn["perplexity"] / dense["perplexity"],
                ffn_fraction_ood=dyn["ffn_fraction_ood"][OOD],
                perplexity_ood=dyn["perplexity_ood"][OOD],
                dense_perplexity_ood=dense["perplexity_ood"][OOD],
                perplexity_ood_vs_dense=dyn["perplexity_ood"][OOD] / dense["perplexity_ood"][OOD],
                lambada_perplexity=lam, lambada_vs_dense=lam / lam_dense)


def run_variant(args, job_args, job: str, name: str, folder: str) -> dict:
    """Fine-tunes (unless 'no-fine-tune') and evaluates one variant; its row."""
    what = VARIANTS[name][0]
    os.makedirs(folder, exist_ok=True)
    row = dict(variant=name, what=what, train_seconds=0.0)
    load = os.path.join(job, "ckpt", "smollm2-dynamoe")
    if name != "no-fine-tune":
        save = os.path.join(folder, "ckpt")
        shutil.rmtree(save, ignore_errors=True)
        command = _train_command(job_args, job, name, save, os.path.join(folder, "tb"))
        row["train_command"] = " ".join(command)
        log(f"{name}: fine-tuning ({what})")
        row["train_seconds"] = round(_run(command, os.path.join(folder, "train.log")), 1)
        load = save
    log(f"{name}: evaluating")
    out = os.path.join(folder, "eval")
    row["eval_seconds"] = round(_run(_evaluate_command(args, job_args, job, load, out),
                                     os.path.join(folder, "evaluate.log")), 1)
    with open(os.path.join(out, "results.json")) as f:
        row.update(summarize(json.load(f)))
    if name != "no-fine-tune" and not args.keep_checkpoints:
        shutil.rmtree(load)
    return row


def finished_rows(out: str) -> List[dict]:
    """The result.json rows of every variant finished in `out`: VARIANTS' order first, then
    any other folder (a variant a later version renamed) by name."""
    names = list(dict.fromkeys([*VARIANTS, *sorted(os.listdir(out))]))
    rows = []
    for name in names:
        done = os.path.join(out, name, "result.json")
        if os.path.isfile(done):
            with open(done) as f:
                rows.append(json.load(f))
    return rows


def table(rows: List[dict]) -> str:
    """The study's markdown table."""
    lines = [f"| variant | what | FFN compute (held-out / {OOD}) | held-out ppl / dense | "
             f"{OOD} ppl / dense | LAMBADA ppl / dense | fine-tune s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['what']} | {r['ffn_fraction']:.3f} / "
                     f"{r['ffn_fraction_ood']:.3f} | {r['perplexity_vs_dense']:.3f} | "
                     f"{r['perplexity_ood_vs_dense']:.3f} | {r['lambada_vs_dense']:.2f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def _quick_job(folder: str) -> str:
    """A tiny main-job folder under `folder`: a random tiny SmolLM2-vocabulary dense
    checkpoint (this process), MoEfied and the first speeches preprocessed by the tools."""
    import torch

    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.models.architectures import get_architecture, transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model
    from megatron_dynamoe.runtime.parallel import (ParallelLayout, destroy_parallel,
                                                   initialize_parallel)

    ckpt = os.path.join(folder, "ckpt")
    arch = get_architecture("tiny-smollm2")
    initialize_parallel(ParallelLayout(), device="cpu")
    try:
        torch.manual_seed(0)
        dense = build_gpt_model(arch, transformer_config(arch))
        save_checkpoint(dense, os.path.join(ckpt, "smollm2"), CheckpointInfo(arch, None, {}))
    finally:
        destroy_parallel()
    py = sys.executable
    _run([py, "-m", "megatron_dynamoe.cli.moefy", "--load", os.path.join(ckpt, "smollm2"),
          "--output", os.path.join(ckpt, "smollm2-dynamoe"), "--tokenizer", "smollm2",
          "--calibration-sequences", "2", "--calibration-seq-length", "32"],
         os.path.join(folder, "moefy.log"))
    _run([py, "-m", "megatron_dynamoe.cli.preprocess_data", "--input", demo.TRAIN_TEXT,
          "--tokenizer", "smollm2", "--output-prefix", os.path.join(folder, "data", "sotu"),
          "--limit", "5"], os.path.join(folder, "preprocess.log"))
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.output_dir)
    if args.overwrite:
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    tmp, job_args = None, None
    job = os.path.abspath(args.job) if args.job else None
    todo = []
    for name in args.variants.split(","):
        done = os.path.join(out, name, "result.json")
        if os.path.exists(done):
            log(f"{name}: done before, kept ({done})")
        else:
            todo.append(name)
    if args.quick:
        args.eval_sequences, args.lambada_limit = 1, 1
    if args.quick and todo:
        tmp = tempfile.mkdtemp(prefix="recipe-study-")
        job = _quick_job(tmp)
        job_args = demo.parse_args(["--train-iters", "2", "--global-batch-size", "1",
                                    "--nproc", "1", "--seq-length", "32"])
    elif todo:  # a study whose variants are all done only rewrites its table
        # (what the job folder needs, the main-job flag that makes it)
        needs = [("ckpt/smollm2", ""), ("ckpt/smollm2-dynamoe", ""), ("data/sotu.bin", "")]
        if any(VARIANTS[v][1].get("self_sample_weight") for v in todo):
            needs.append((f"data/{demo.SELF_SAMPLES_PREFIX}.bin", " --self-sample-weight 0.5"))
        for need, flag in needs:
            if not os.path.exists(os.path.join(job, need)):
                raise ToolError(f"--job {args.job} has no {need}: run `python -m "
                                f"megatron_dynamoe.cli.demo --output-dir {args.job}{flag}` "
                                f"first")
        job_args = demo.parse_args(args.main_job_args.split())
    try:
        for name in todo:
            folder = os.path.join(out, name)
            done = os.path.join(folder, "result.json")
            row = run_variant(args, job_args, job, name, folder)
            with open(done + ".tmp", "w") as f:
                json.dump(row, f, indent=2)
            os.replace(done + ".tmp", done)
            log(f"{name}: held-out {row['perplexity_vs_dense']:.3f} x dense at "
                f"{row['ffn_fraction']:.3f}, {OOD} {row['perplexity_ood_vs_dense']:.3f} x at "
                f"{row['ffn_fraction_ood']:.3f}, LAMBADA {row['lambada_vs_dense']:.2f} x")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    # A study is run in several calls (`--variants a,b`, later `--variants c`): the table
    # lists every variant finished in this folder, in VARIANTS order, not only this call's.
    rows = finished_rows(out)
    study = dict(job=job, main_job_args=args.main_job_args, ffn_budget=args.ffn_budget,
                 eval_sequences=args.eval_sequences, lambada_limit=args.lambada_limit,
                 rows=rows)
    text = table(rows)
    for path, content in [(os.path.join(out, "study.json"), json.dumps(study, indent=2)),
                          (args.json, json.dumps(study, indent=2)),
                          (os.path.join(out, "study.md"), text + "\n")]:
        if path:
            with open(path + ".tmp", "w") as f:
                f.write(content)
            os.replace(path + ".tmp", path)
    print(text)
    return 0


if __name__ == "__main__":
    from megatron_dynamoe.cli.common import run_tool

    sys.exit(run_tool(main))
