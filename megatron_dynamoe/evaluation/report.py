"""Evaluation results as JSON, a Markdown table and a PNG plot of quality vs FFN compute.

Rows come from `harness.evaluate_variant`. Besides the table, `compare_at_matched_compute`
puts each DynaMoE row next to the static sub-network at the same mean FFN compute: the one
fine-tuned with static-sampled routing ('static-trained', `--static-load`) when the rows have
it, else the untrained one (the DynaMoE weights at a fixed level). Static widths exist only
at the levels, so its perplexity is interpolated linearly in log-perplexity (= mean NLL) and
its accuracy linearly, between the two levels around the DynaMoE row's compute (what a
token-random mixture of the two widths would spend). The untrained baseline's level K is the
DynaMoE row at full compute when there is one (every token at level K); the trained one has
its own. On another text (--ood-text) the comparison is at the compute spent on that text.
`monotone` says whether the DynaMoE curve over sensitivities is monotone (perplexity
non-increasing and mean accuracy non-decreasing with compute), the property the sensitivity
knob promises.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Dict, List, Optional, Sequence

FAMILY_LABELS = {"dense": "dense", "dynamoe": "DynaMoE (per-token levels)",
                 "static": "static sub-network",
                 "static-trained": "static sub-network, trained (static-sampled)",
                 "topk": "top-k router (same shells)"}
FAMILY_STYLES = {"dynamoe": dict(color="tab:blue", marker="o"),
                 "static": dict(color="tab:orange", marker="s"),
                 "static-trained": dict(color="tab:red", marker="D"),
                 "topk": dict(color="tab:green", marker="^"),
                 "dense": dict(color="black", marker="*", markersize=12)}
PLOT_ORDER = ("dynamoe", "static", "static-trained", "topk", "dense")


def _series(rows: Sequence[dict], family: str) -> List[dict]:
    return sorted((r for r in rows if r["family"] == family), key=lambda r: r["ffn_fraction"])


def _interpolate(points: Sequence[tuple], x: float) -> Optional[float]:
    """Linear interpolation in sorted (x, y) points; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def ood_names(rows: Sequence[dict]) -> List[str]:
    """The other texts (--ood-text) the rows have a perplexity on, in first-seen order."""
    names: List[str] = []
    for r in rows:
        names += [n for n in r.get("perplexity_ood") or {} if n not in names]
    return names


def _ood_fraction(row: dict, name: str) -> float:
    """The row's FFN compute on text `name` (rows written before it was measured: the
    in-domain one)."""
    return (row.get("ffn_fraction_ood") or {}).get(name, row["ffn_fraction"])


def with_dense_ratios(rows: Sequence[dict]) -> List[dict]:
    """Copies of `rows` with `perplexity_vs_dense` and `perplexity_ood_vs_dense` ({text:
    ratio}) against the first dense row; the rows unchanged when there is none."""
    dense = next((r for r in rows if r["family"] == "dense"), None)
    if dense is None:
        return list(rows)
    out = []
    for r in rows:
        dense_ood = dense.get("perplexity_ood") or {}
        out.append(dict(r, perplexity_vs_dense=r["perplexity"] / dense["perplexity"],
                        perplexity_ood_vs_dense={
                            name: ppl / dense_ood[name]
                            for name, ppl in (r.get("perplexity_ood") or {}).items()
                            if name in dense_ood}))
    return out


def static_baseline(rows: Sequence[dict]) -> str:
    """The static family the DynaMoE rows are compared with: the trained one
    ('static-trained', fine-tuned with static-sampled routing) when the rows have it, else
    the untrained sub-networks of the DynaMoE weights ('static')."""
    return "static-trained" if any(r["family"] == "static-trained" for r in rows) else "static"


def compare_at_matched_compute(rows: Sequence[dict]) -> List[dict]:
    """For each DynaMoE row: the static baseline (`static_baseline`) interpolated at its FFN
    compute, and both models' loss against the dense row (accuracy points lost, perplexity
    ratio); `ood` holds the same per other text, at the compute spent on that text."""
    family = static_baseline(rows)
    if family == "static-trained":
        # Its own level K (the fine-tuned full FFN) is the right end of its curve.
        static = _series(rows, family)
    else:
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
                    mean_accuracy=row["mean_accuracy"], static_family=family,
                    static_perplexity=None if log_ppl is None else math.exp(log_ppl),
                    static_mean_accuracy=acc)
        if dense is not None:
            item["perplexity_vs_dense"] = row["perplexity"] / dense["perplexity"]
            item["static_perplexity_vs_dense"] = (None if log_ppl is None else
                                                  math.exp(log_ppl) / dense["perplexity"])
            if dense["mean_accuracy"] is not None and acc is not None:
                item["accuracy_drop"] = dense["mean_accuracy"] - row["mean_accuracy"]
                item["static_accuracy_drop"] = dense["mean_accuracy"] - acc
        ood = {}
        for name, ppl in (row.get("perplexity_ood") or {}).items():
            x_ood = _ood_fraction(row, name)
            points = [(_ood_fraction(r, name), math.log(r["perplexity_ood"][name]))
                      for r in static if name in (r.get("perplexity_ood") or {})]
            log_static = _interpolate(sorted(points), x_ood)
            entry = dict(ffn_fraction=x_ood, perplexity=ppl,
                         static_perplexity=None if log_static is None else math.exp(log_static))
            dense_ppl = ((dense or {}).get("perplexity_ood") or {}).get(name)
            if dense_ppl is not None:
                entry["perplexity_vs_dense"] = ppl / dense_ppl
                entry["static_perplexity_vs_dense"] = (
                    None if log_static is None else math.exp(log_static) / dense_ppl)
            ood[name] = entry
        if ood:
            item["ood"] = ood
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
    """The results table: one line per row, FFN compute, FLOPs, perplexity (held-out text,
    then each other text with its ratio to dense and the FFN compute spent on it), task
    metrics (LAMBADA also as target-word perplexity)."""
    rows = with_dense_ratios(rows)
    names = ood_names(rows)
    has_dense = any(r["family"] == "dense" for r in rows)
    heads = ["model", "setting", "mean FFN compute", "fwd FLOPs vs dense", "held-out ppl"]
    for name in names:
        heads += [f"{name} ppl"] + ([f"{name} ppl / dense"] if has_dense else []) + \
            [f"{name} FFN compute"]
    heads += [f"{t} {_primary(t)}" for t in task_names]
    if "lambada" in task_names:
        heads.append("lambada target-word ppl")
    heads.append("mean acc")
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [FAMILY_LABELS.get(r["family"], r["family"]), r["setting"],
                 f"{r['ffn_fraction']:.3f}", f"{r['relative_flops']:.3f}",
                 f"{r['perplexity']:.2f}"]
        for name in names:
            ppl = (r.get("perplexity_ood") or {}).get(name)
            cells.append("-" if ppl is None else f"{ppl:.2f}")
            if has_dense:
                ratio = (r.get("perplexity_ood_vs_dense") or {}).get(name)
                cells.append("-" if ratio is None else f"{ratio:.3f}")
            cells.append("-" if ppl is None else f"{_ood_fraction(r, name):.3f}")
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


def comparison_title(items: Sequence[dict]) -> str:
    """The comparison table's title, naming the static baseline it uses."""
    trained = bool(items) and items[0]["static_family"] == "static-trained"
    which = ("the trained static sub-network (its own fine-tune, static-sampled routing)"
             if trained else "the static sub-network (the DynaMoE weights at a fixed level, "
                             "not trained as such)")
    return (f"DynaMoE vs {which} at the same FFN compute (static interpolated between its "
            f"levels; on other texts at the compute spent on that text):")


def comparison_table(items: Sequence[dict]) -> str:
    """Markdown: DynaMoE vs the static baseline at the same FFN compute (held-out text, tasks
    and each other text)."""
    static = "trained static" if items and items[0]["static_family"] == "static-trained" \
        else "static"
    names = list(dict.fromkeys(n for it in items for n in it.get("ood", {})))
    heads = ["DynaMoE setting", "mean FFN compute", "DynaMoE ppl / dense",
             f"{static} ppl / dense", "DynaMoE acc drop (points)",
             f"{static} acc drop (points)"]
    for name in names:
        heads += [f"{name} FFN compute", f"{name}: DynaMoE ppl / dense",
                  f"{name}: {static} ppl / dense"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]

    def fmt(value, scale=1.0, digits=3):
        return "-" if value is None else f"{scale * value:.{digits}f}"

    for it in items:
        cells = [it["setting"], f"{it['ffn_fraction']:.3f}",
                 fmt(it.get("perplexity_vs_dense")), fmt(it.get("static_perplexity_vs_dense")),
                 fmt(it.get("accuracy_drop"), 100, 1),
                 fmt(it.get("static_accuracy_drop"), 100, 1)]
        for name in names:
            ood = it.get("ood", {}).get(name, {})
            cells += [fmt(ood.get("ffn_fraction")), fmt(ood.get("perplexity_vs_dense")),
                      fmt(ood.get("static_perplexity_vs_dense"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """PNG: mean task accuracy and held-out perplexity against mean FFN compute, and one
    panel per other text (--ood-text): its perplexity against the FFN compute spent on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Panels: (label, x label, row -> (x, y) or None, log scale, scale).
    compute = "mean FFN compute (fraction of dense)"
    panels = []
    if any(r["mean_accuracy"] is not None for r in rows):
        panels.append(("mean zero-shot accuracy (%)", compute,
                       lambda r: None if r["mean_accuracy"] is None else
                       (r["ffn_fraction"], 100.0 * r["mean_accuracy"]), False))
    panels.append(("held-out perplexity (log)", compute,
                   lambda r: (r["ffn_fraction"], r["perplexity"]), True))
    for name in ood_names(rows):
        panels.append((f"{name} perplexity (log)", f"FFN compute on the {name} text",
                       functools.partial(_ood_point, name=name), True))
    fig, axes = plt.subplots(1, len(panels), figsize=(0.5 + 5.5 * len(panels), 4.2),
                             squeeze=False)
    axes = list(axes[0])
    for ax, (label, xlabel, point, log_scale) in zip(axes, panels):
        for family in PLOT_ORDER:
            series = sorted(p for p in map(point, _series(rows, family)) if p is not None)
            if not series:
                continue
            ax.plot([x for x, _ in series], [y for _, y in series],
                    label=FAMILY_LABELS[family], linestyle="-" if family != "dense" else "",
                    **FAMILY_STYLES[family])
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ood_point(row: dict, name: str) -> Optional[tuple]:
    """(FFN compute on text `name`, perplexity on it) of a row, None if not measured."""
    ppl = (row.get("perplexity_ood") or {}).get(name)
    return None if ppl is None else (_ood_fraction(row, name), ppl)


def write_report(folder: str, rows: Sequence[dict], task_names: Sequence[str],
                 meta: dict, title: str = "") -> dict:
    """results.json, results.md and quality_vs_compute.png in `folder`; returns the JSON
    (its rows carry their perplexity ratios to dense, `with_dense_ratios`)."""
    comparison = compare_at_matched_compute(rows)
    result = dict(meta=meta, rows=with_dense_ratios(rows), matched_compute=comparison,
                  matched_compute_baseline=static_baseline(rows), monotone=monotone(rows))
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = [markdown_table(rows, task_names)]
    if comparison:
        text += ["", comparison_title(comparison), "", comparison_table(comparison), "",
                 f"DynaMoE curve monotone over sensitivities: perplexity "
                 f"{result['monotone']['perplexity']}, accuracy {result['monotone']['accuracy']}"]
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    plot(rows, os.path.join(folder, "quality_vs_compute.png"), title)
    return result
