"""Evaluation results as JSON, a Markdown table and a PNG plot of quality vs FFN compute.

Rows come from `harness.evaluate_variant`. Besides the table, `compare_at_matched_compute`
puts each DynaMoE row next to the static sub-network at the same mean FFN compute: static
widths exist only at the levels, so its perplexity is interpolated linearly in log-perplexity
(= mean NLL) and its accuracy linearly, between the two levels around the DynaMoE row's
compute (what a token-random mixture of the two widths would spend). Level K is the
DynaMoE row at full compute when there is one (every token at level K). `monotone` says whether
the DynaMoE curve over sensitivities is monotone (perplexity non-increasing and mean accuracy
non-decreasing with compute), the property the sensitivity knob promises.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

FAMILY_LABELS = {"dense": "dense", "dynamoe": "DynaMoE (per-token levels)",
                 "static": "static sub-network", "topk": "top-k router (same shells)"}
FAMILY_STYLES = {"dynamoe": dict(color="tab:blue", marker="o"),
                 "static": dict(color="tab:orange", marker="s"),
                 "topk": dict(color="tab:green", marker="^"),
                 "dense": dict(color="black", marker="*", markersize=12)}


def _series(rows: Sequence[dict], family: str) -> List[dict]:
    return sorted((r for r in rows if r["family"] == family), key=lambda r: r["ffn_fraction"])


def _interpolate(points: Sequence[tuple], x: float) -> Optional[float]:
    """Linear interpolation in sorted (x, y) points; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def compare_at_matched_compute(rows: Sequence[dict]) -> List[dict]:
    """For each DynaMoE row: the static sub-network interpolated at its FFN compute, and both
    models' loss against the dense row (accuracy points lost, perplexity ratio)."""
    # A DynaMoE row at full compute routes every token to level K: it is the static
    # sub-network of level K (the full fine-tuned FFN), the static curve's right end.
    full = [r for r in rows if r["family"] == "dynamoe" and r["ffn_fraction"] == 1.0]
    static = sorted(_series(rows, "static") + full[:1], key=lambda r: r["ffn_fraction"])
    dense = next((r for r in rows if r["family"] == "dense"), None)
    out = []
    for row in _series(rows, "dynamoe"):
        x = row["ffn_fraction"]
        log_ppl = _interpolate([(r["ffn_fraction"], math.log(r["perplexity"])) for r in static],
                               x)
        acc = (_interpolate([(r["ffn_fraction"], r["mean_accuracy"]) for r in static], x)
               if row["mean_accuracy"] is not None else None)
        item = dict(setting=row["setting"], ffn_fraction=x, perplexity=row["perplexity"],
                    mean_accuracy=row["mean_accuracy"],
                    static_perplexity=None if log_ppl is None else math.exp(log_ppl),
                    static_mean_accuracy=acc)
        if dense is not None:
            item["perplexity_vs_dense"] = row["perplexity"] / dense["perplexity"]
            item["static_perplexity_vs_dense"] = (None if log_ppl is None else
                                                  math.exp(log_ppl) / dense["perplexity"])
            if dense["mean_accuracy"] is not None and acc is not None:
                item["accuracy_drop"] = dense["mean_accuracy"] - row["mean_accuracy"]
                item["static_accuracy_drop"] = dense["mean_accuracy"] - acc
        out.append(item)
    return out


def monotone(rows: Sequence[dict]) -> Dict[str, bool]:
    """Whether the DynaMoE rows, ordered by FFN compute, have non-increasing perplexity and
    non-decreasing mean accuracy."""
    series = _series(rows, "dynamoe")
    ppl = [r["perplexity"] for r in series]
    acc = [r["mean_accuracy"] for r in series if r["mean_accuracy"] is not None]
    return dict(perplexity=all(b <= a for a, b in zip(ppl, ppl[1:])),
                accuracy=all(b >= a for a, b in zip(acc, acc[1:])))


def markdown_table(rows: Sequence[dict], task_names: Sequence[str]) -> str:
    """The results table: one line per row, FFN compute, FLOPs, perplexity, task metrics."""
    heads = ["model", "setting", "mean FFN compute", "fwd FLOPs vs dense", "held-out ppl"]
    heads += [f"{t} {_primary(t)}" for t in task_names]
    if "lambada" in task_names:
        heads.append("lambada ppl")
    heads.append("mean acc")
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [FAMILY_LABELS.get(r["family"], r["family"]), r["setting"],
                 f"{r['ffn_fraction']:.3f}", f"{r['relative_flops']:.3f}",
                 f"{r['perplexity']:.2f}"]
        cells += [f"{100 * r['tasks'][t]['primary']:.1f}" for t in task_names]
        if "lambada" in task_names:
            cells.append(f"{r['tasks']['lambada']['perplexity']:.1f}")
        cells.append("-" if r["mean_accuracy"] is None else f"{100 * r['mean_accuracy']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _primary(task: str) -> str:
    """The task's primary metric name (OLMo's choice)."""
    from megatron_dynamoe.evaluation.tasks import TASKS

    return TASKS[task].primary_metric


def comparison_table(items: Sequence[dict]) -> str:
    """Markdown: DynaMoE vs the static sub-network at the same FFN compute."""
    lines = ["| DynaMoE setting | mean FFN compute | DynaMoE ppl / dense | static ppl / dense "
             "| DynaMoE acc drop (points) | static acc drop (points) |",
             "|---|---|---|---|---|---|"]

    def fmt(value, scale=1.0, digits=3):
        return "-" if value is None else f"{scale * value:.{digits}f}"

    for it in items:
        lines.append(f"| {it['setting']} | {it['ffn_fraction']:.3f} | "
                     f"{fmt(it.get('perplexity_vs_dense'))} | "
                     f"{fmt(it.get('static_perplexity_vs_dense'))} | "
                     f"{fmt(it.get('accuracy_drop'), 100, 1)} | "
                     f"{fmt(it.get('static_accuracy_drop'), 100, 1)} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """PNG: mean task accuracy and held-out perplexity against mean FFN compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(r["mean_accuracy"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4.2))
    axes = list(axes) if has_acc else [axes]
    panels = [("perplexity", "held-out perplexity (log)")]
    if has_acc:
        panels.insert(0, ("mean_accuracy", "mean zero-shot accuracy (%)"))
    for ax, (key, label) in zip(axes, panels):
        for family in ("dynamoe", "static", "topk", "dense"):
            series = [r for r in _series(rows, family) if r[key] is not None]
            if not series:
                continue
            scale = 100.0 if key == "mean_accuracy" else 1.0
            ax.plot([r["ffn_fraction"] for r in series], [scale * r[key] for r in series],
                    label=FAMILY_LABELS[family], linestyle="-" if family != "dense" else "",
                    **FAMILY_STYLES[family])
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("mean FFN compute (fraction of dense)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(folder: str, rows: Sequence[dict], task_names: Sequence[str],
                 meta: dict, title: str = "") -> dict:
    """results.json, results.md and quality_vs_compute.png in `folder`; returns the JSON."""
    comparison = compare_at_matched_compute(rows)
    result = dict(meta=meta, rows=list(rows), matched_compute=comparison,
                  monotone=monotone(rows))
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = [markdown_table(rows, task_names)]
    if comparison:
        text += ["", "DynaMoE vs the static sub-network at the same FFN compute "
                     "(static interpolated between its levels):", "",
                 comparison_table(comparison), "",
                 f"DynaMoE curve monotone over sensitivities: perplexity "
                 f"{result['monotone']['perplexity']}, accuracy {result['monotone']['accuracy']}"]
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    plot(rows, os.path.join(folder, "quality_vs_compute.png"), title)
    return result
