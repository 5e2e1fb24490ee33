#!/usr/bin/env python
"""The checks of bench/gpu_smoke.sh: each subcommand compares what the CLIs wrote, prints one
line, writes a JSON fragment (--json) for the summary, and exits 1 with a one-line reason
when the check fails.

    resume    the loss curve of an interrupted (SIGTERM) + resumed run against an
              uninterrupted one, from the training logs and the TensorBoard event files
    evaluate  tools/evaluate.py's results.json on the device against the CPU reference
    export    the `export.py --format hf` folder, reloaded by vanilla transformers on the
              device: its held-out perplexity against evaluate's theta = 1 row
    summary   merge the step timings and the fragments into one JSON

Only `export` imports torch / transformers; the others are plain Python (+ tensorboard).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \| lm loss: (\S+)")
TOKENS_PER_S = re.compile(r"tokens/s: ([0-9.]+)")


class CheckFailed(Exception):
    """A failed check: its message is the one-line reason."""


def _write(path, fragment) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(fragment, f, indent=2)


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


# ------------------------------------------------------------------------------------ resume
def log_losses(paths):
    """{iteration: loss text} from training logs (later logs override: a resumed run);
    also the tokens/s values and the total of the iteration lines."""
    losses, total, speeds = {}, None, []
    for path in paths:
        with open(path, errors="replace") as f:
            for line in f:
                m = ITERATION.search(line)
                if m:
                    losses[int(m.group(1))] = m.group(3)
                    total = int(m.group(2))
                    s = TOKENS_PER_S.search(line)
                    if s:
                        speeds.append(float(s.group(1)))
    return losses, total, speeds


def tensorboard_scalars(folder: str, tag: str = "lm loss"):
    """{step: float32 value} of `tag` over every event file of `folder` (a resumed run adds
    a second file), and the set of histogram tags seen."""
    from tensorboard.backend.event_processing import event_accumulator

    values, histograms = {}, set()
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        acc = event_accumulator.EventAccumulator(
            path, size_guidance={event_accumulator.SCALARS: 0,
                                 event_accumulator.HISTOGRAMS: 1})
        acc.Reload()
        tags = acc.Tags()
        histograms.update(tags.get("histograms", []))
        if tag in tags.get("scalars", []):
            for event in acc.Scalars(tag):
                values[event.step] = event.value
    return values, histograms


def cmd_resume(args) -> dict:
    full, total, speeds = log_losses([args.full_log])
    first, _, _ = log_losses([args.interrupted_log])
    resumed, _, _ = log_losses([args.resumed_log])
    with open(args.interrupted_log, errors="replace") as f:
        text = f.read()
    m = re.search(r"stopped by a preemption signal after iteration (\d+)", text)
    if not m:
        raise CheckFailed("the interrupted run did not report 'stopped by a preemption signal "
                          "after iteration N' (did the SIGTERM land?)")
    stopped = int(m.group(1))
    with open(args.resumed_log, errors="replace") as f:
        rtext = f.read()
    r = re.search(r"resumed from \S+ at iteration (\d+)", rtext)
    if not r or int(r.group(1)) != stopped:
        raise CheckFailed(f"the resumed run did not resume at iteration {stopped} "
                          f"({'found ' + r.group(0) if r else 'no resume line'})")
    if total is None or sorted(full) != list(range(1, total + 1)):
        raise CheckFailed(f"the uninterrupted run logged iterations {sorted(full)[:3]}..., "
                          f"not 1..{total}")
    if not 0 < stopped < total:
        raise CheckFailed(f"the SIGTERM stopped the run after iteration {stopped} of {total}: "
                          f"not mid-run")
    if sorted(first) != list(range(1, stopped + 1)):
        raise CheckFailed(f"the interrupted run logged {sorted(first)}, not 1..{stopped}")
    if sorted(resumed) != list(range(stopped + 1, total + 1)):
        raise CheckFailed(f"the resumed run logged {sorted(resumed)}, not "
                          f"{stopped + 1}..{total}")
    combined = {**first, **resumed}
    floats = {i: float(v) for i, v in combined.items()}
    ref = {i: float(v) for i, v in full.items()}
    if not all(math.isfinite(v) for v in list(floats.values()) + list(ref.values())):
        raise CheckFailed("a logged loss is not finite")
    before = max(_rel(floats[i], ref[i]) for i in range(1, stopped + 1))
    after = max(_rel(floats[i], ref[i]) for i in range(stopped + 1, total + 1))
    log_identical = all(combined[i] == full[i] for i in full)

    tb_full, hist_full = tensorboard_scalars(args.full_tb)
    tb_resumed, hist_resumed = tensorboard_scalars(args.resumed_tb)
    if sorted(tb_full) != list(range(1, total + 1)) or sorted(tb_resumed) != sorted(tb_full):
        raise CheckFailed(f"TensorBoard 'lm loss' steps: uninterrupted {len(tb_full)}, "
                          f"interrupted + resumed {len(tb_resumed)}, expected {total} each")
    tb_identical = all(tb_full[i] == tb_resumed[i] for i in tb_full)
    tb_after = max(_rel(tb_resumed[i], tb_full[i]) for i in range(stopped + 1, total + 1))
    level_histograms = sorted(h for h in hist_full if h.endswith("/levels"))
    fragment = dict(
        iterations=total, stopped_after=stopped, rtol=args.rtol, exact_required=args.exact,
        max_rel_diff_before_signal=before, max_rel_diff_after_resume=after,
        max_rel_diff_tensorboard_after_resume=tb_after,
        log_losses_identical=log_identical, tensorboard_losses_identical=tb_identical,
        level_histograms=level_histograms,
        first_loss=ref[1], last_loss=ref[total],
        median_tokens_per_s=sorted(speeds)[len(speeds) // 2] if speeds else None,
        losses_uninterrupted=[ref[i] for i in range(1, total + 1)],
        losses_interrupted_resumed=[floats[i] for i in range(1, total + 1)])

    def fail(reason: str):
        fragment["matched"] = False
        _write(args.json, fragment)
        raise CheckFailed(reason)

    if not level_histograms or not hist_resumed:
        fail("no DynaMoE level histograms in the TensorBoard events")
    if args.exact and not (log_identical and tb_identical):
        worst = max(full, key=lambda i: _rel(floats[i], ref[i]))
        fail(f"resume is not bit-identical: iteration {worst} logged {combined[worst]} vs "
             f"{full[worst]} uninterrupted")
    if max(before, after, tb_after) > args.rtol:
        fail(f"loss curves differ by {max(before, after, tb_after):.3g} relative (> rtol "
             f"{args.rtol}): before the signal {before:.3g}, after the resume {after:.3g}")
    if not ref[total] < ref[1]:
        fail(f"the loss did not decrease over {total} iterations ({ref[1]:.4f} -> "
             f"{ref[total]:.4f})")
    fragment["matched"] = True
    how = "bit-identical" if (log_identical and tb_identical) else \
        f"within rtol {args.rtol} (max {max(before, after, tb_after):.2e})"
    print(f"resume: SIGTERM after iteration {stopped}/{total}, resumed run {how}; loss "
          f"{ref[1]:.4f} -> {ref[total]:.4f}; {len(level_histograms)} level histograms")
    return fragment


# ---------------------------------------------------------------------------------- evaluate
def _row_key(row) -> str:
    if row["family"] == "dynamoe" and row.get("budget") is not None:
        return f"dynamoe budget {row['budget']}"
    return f"{row['family']} {row['setting']}"


def cmd_evaluate(args) -> dict:
    with open(args.device_results) as f:
        dev = json.load(f)
    with open(args.cpu_results) as f:
        cpu = json.load(f)
    dev_rows = {_row_key(r): r for r in dev["rows"]}
    cpu_rows = {_row_key(r): r for r in cpu["rows"]}
    if set(dev_rows) != set(cpu_rows) or not dev_rows:
        raise CheckFailed(f"evaluate rows differ: device {sorted(dev_rows)} vs CPU "
                          f"{sorted(cpu_rows)}")
    worst = dict(perplexity=0.0, ffn_fraction=0.0, relative_flops=0.0, accuracy=0.0)
    problems, rows = [], []
    for key in sorted(dev_rows):
        d, c = dev_rows[key], cpu_rows[key]
        ppl = _rel(d["perplexity"], c["perplexity"])
        ffn = abs(d["ffn_fraction"] - c["ffn_fraction"])
        flops = abs(d["relative_flops"] - c["relative_flops"])
        acc = 0.0
        for task, metrics in c["tasks"].items():
            for metric in ("acc", "acc_norm"):
                if metric in metrics:
                    acc = max(acc, abs(d["tasks"][task][metric] - metrics[metric]))
        for name, value in (("perplexity", ppl), ("ffn_fraction", ffn),
                            ("relative_flops", flops), ("accuracy", acc)):
            worst[name] = max(worst[name], value)
        rows.append(dict(row=key, perplexity_device=d["perplexity"],
                         perplexity_cpu=c["perplexity"], perplexity_rel_diff=ppl,
                         ffn_device=d["ffn_fraction"], ffn_cpu=c["ffn_fraction"],
                         max_accuracy_diff=acc))
        limits = dict(perplexity=args.ppl_rtol, ffn_fraction=args.ffn_atol,
                      relative_flops=args.ffn_atol, accuracy=args.acc_atol)
        for name, value in (("perplexity", ppl), ("ffn_fraction", ffn),
                            ("relative_flops", flops), ("accuracy", acc)):
            if value > limits[name]:
                problems.append(f"{key}: {name} differs by {value:.3g} (limit {limits[name]})")
    fragment = dict(rows=rows, max_diffs=worst, tolerances=dict(
        perplexity_rtol=args.ppl_rtol, ffn_atol=args.ffn_atol, accuracy_atol=args.acc_atol),
        identical=all(v == 0.0 for v in worst.values()))
    if problems:
        fragment["matched"] = False
        _write(args.json, fragment)
        raise CheckFailed(f"evaluate on the device vs the CPU reference: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    fragment["matched"] = True
    print(f"evaluate: {len(rows)} rows match the CPU reference "
          + ("exactly" if fragment["identical"] else
             f"(max ppl rel diff {worst['perplexity']:.2e}, FFN {worst['ffn_fraction']:.2e}, "
             f"accuracy {worst['accuracy']:.3f})"))
    return fragment


# ------------------------------------------------------------------------------------ export
def cmd_export(args) -> dict:
    with open(args.export_log, errors="replace") as f:
        log = f.read()
    parity = re.findall(r"parity \(([^)]*)\): max \|logit diff\| / max \|logit\| = (\S+) "
                        r"\(tolerance (\S+)\)", log)
    names = [p[0] for p in parity]
    if not any("dense export" in n for n in names) or not any("reloaded HF" in n for n in names):
        raise CheckFailed(f"export.py's parity checks did not both run (found {names})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_dynamoe.data.corpora import load_texts, token_windows

    with open(args.evaluate_results) as f:
        result = json.load(f)
    meta = result["meta"]
    theta1 = [r for r in result["rows"] if r["family"] == "dynamoe" and r["theta"] == 1.0]
    if not theta1:
        raise CheckFailed("evaluate's results have no DynaMoE theta = 1 row")
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.hf)
    texts = load_texts(meta["text"])
    windows = token_windows(tokenizer, texts[-meta["held_out_docs"]:], meta["seq_length"],
                            meta["eval_tokens"] // meta["seq_length"])
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            batch = windows[start:start + 4].to(device)
            logits = model(batch).logits
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                batch[:, 1:].reshape(-1), reduction="none")
            nll += float(losses.double().sum())
            count += batch[:, 1:].numel()
    ppl = math.exp(nll / count)
    reference = theta1[0]["perplexity"]
    diff = _rel(ppl, reference)
    fragment = dict(parity_checks={n: float(e) for n, e, _ in parity}, parity_passed=True,
                    hf_device=str(device), hf_perplexity=ppl,
                    evaluate_theta1_perplexity=reference, rel_diff=diff, rtol=args.rtol,
                    files=sorted(os.listdir(args.hf)))
    if diff > args.rtol:
        fragment["matched"] = False
        _write(args.json, fragment)
        raise CheckFailed(f"the exported HF model's held-out perplexity {ppl:.6g} differs from "
                          f"evaluate's theta = 1 perplexity {reference:.6g} by {diff:.3g} "
                          f"(> {args.rtol})")
    fragment["matched"] = True
    print(f"export: parity {', '.join(f'{n} {float(e):.1e}' for n, e, _ in parity)}; HF "
          f"reload on {device}: held-out ppl {ppl:.4f} vs evaluate theta=1 {reference:.4f} "
          f"(rel {diff:.1e})")
    return fragment


# ----------------------------------------------------------------------------------- summary
def cmd_summary(args) -> dict:
    steps = []
    if os.path.exists(args.steps):
        with open(args.steps) as f:
            for line in f:
                name, seconds, rc = line.rstrip("\n").split("\t")
                steps.append(dict(step=name, seconds=float(seconds), rc=int(rc)))
    summary = dict(ok=args.failure is None, failure=args.failure, mode=args.mode,
                   device=args.device, total_seconds=args.total_seconds, steps=steps)
    if args.header and os.path.exists(args.header):
        with open(args.header) as f:
            summary["environment"] = json.load(f)
    for name in ("resume", "evaluate", "export"):
        path = os.path.join(args.fragments, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                summary[name] = json.load(f)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("resume")
    r.add_argument("--full-log", required=True)
    r.add_argument("--interrupted-log", required=True)
    r.add_argument("--resumed-log", required=True)
    r.add_argument("--full-tb", required=True)
    r.add_argument("--resumed-tb", required=True)
    r.add_argument("--rtol", type=float, required=True)
    r.add_argument("--exact", action="store_true", help="require bit-identical losses")
    e = sub.add_parser("evaluate")
    e.add_argument("--device-results", required=True)
    e.add_argument("--cpu-results", required=True)
    e.add_argument("--ppl-rtol", type=float, required=True)
    e.add_argument("--ffn-atol", type=float, required=True)
    e.add_argument("--acc-atol", type=float, required=True)
    x = sub.add_parser("export")
    x.add_argument("--hf", required=True)
    x.add_argument("--export-log", required=True)
    x.add_argument("--evaluate-results", required=True)
    x.add_argument("--device", default="cpu")
    x.add_argument("--rtol", type=float, required=True)
    s = sub.add_parser("summary")
    s.add_argument("--steps", required=True)
    s.add_argument("--fragments", required=True)
    s.add_argument("--header")
    s.add_argument("--output", required=True)
    s.add_argument("--mode", required=True)
    s.add_argument("--device", required=True)
    s.add_argument("--total-seconds", type=float, required=True)
    s.add_argument("--failure")
    for parser in (r, e, x):
        parser.add_argument("--json", help="write the check's JSON fragment here")
    args = p.parse_args(argv)
    command = dict(resume=cmd_resume, evaluate=cmd_evaluate, export=cmd_export,
                   summary=cmd_summary)[args.command]
    try:
        fragment = command(args)
    except CheckFailed as failure:
        print(f"FAIL: {failure}")
        return 1
    if args.command != "summary":
        _write(args.json, fragment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
