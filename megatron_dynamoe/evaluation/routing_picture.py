"""A picture of routing: every token of a text coloured by its nested level at every layer.

`token_levels` runs the model once over the text and returns the level of each token at each
DynaMoE layer; `write_png` draws layers x tokens as a heat map (token strings along the
bottom, the mean level over layers as the top strip) and `write_html` writes a
self-contained page: the text with each token shaded by its mean level (hover for the
per-layer levels) above the same layers x tokens grid. Darker = more FFN = harder token.
"""

from __future__ import annotations

import html
from typing import List, Tuple

import torch

from megatron_dynamoe.evaluation.recorder import FFNComputeRecorder
from megatron_dynamoe.models.builder import causal_attention_mask
from megatron_dynamoe.runtime.device import place_batch
from megatron_dynamoe.runtime.forward_only import pipeline_forward

# Sequential palette, level 1 (lightest) .. level K (darkest); interpolated for other K.
_PALETTE = ["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"]


@torch.no_grad()
def token_levels(model, tokenizer, text: str, max_tokens: int = 96
                 ) -> Tuple[List[str], torch.Tensor, int]:
    """(token strings, levels [L_moe, s] int64, K) of the first `max_tokens` tokens of `text`
    at the model's current sensitivity; one row per DynaMoE layer, in layer order (every
    pipeline stage's; every rank of a TP / PP layout calls it and gets the same)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the routing picture needs a text of at least 2 tokens")
    tokens = torch.tensor(ids).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with FFNComputeRecorder(model) as recorder:
            rows = [i for i, info in enumerate(recorder.layer_info) if info.kind == "dynamoe"]
            if not rows:
                raise ValueError("the routing picture needs a DynaMoE model")
            b = place_batch(dict(tokens=tokens, position_ids=torch.arange(len(ids)).unsqueeze(0),
                                 attention_mask=causal_attention_mask(len(ids))))
            pipeline_forward(model, b)
            recorder.commit(torch.ones_like(b["tokens"], dtype=torch.bool))
    finally:
        model.train(was_training)
    pieces = [tokenizer.decode([i]) for i in ids]
    return pieces, recorder.last_levels[rows, 0], recorder.layer_info[rows[0]].router_outputs


def _color(level: float, num_levels: int) -> str:
    """Hex colour of a (possibly fractional) level in 1..K."""
    t = 0.0 if num_levels == 1 else (level - 1) / (num_levels - 1)
    x = t * (len(_PALETTE) - 1)
    i = min(int(x), len(_PALETTE) - 2)
    a, b = _PALETTE[i], _PALETTE[i + 1]
    mix = [round(int(a[j:j + 2], 16) * (1 - (x - i)) + int(b[j:j + 2], 16) * (x - i))
           for j in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def write_png(path: str, pieces: List[str], levels: torch.Tensor, num_levels: int,
              title: str = "") -> None:
    """Heat map PNG: rows = DynaMoE layers (+ the mean on top), columns = tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    num_layers, count = levels.shape
    cmap = ListedColormap([_color(e, num_levels) for e in range(1, num_levels + 1)])
    fig, (top, ax) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.2 * count + 1.5), 1.2 + 0.16 * num_layers + 1.2),
        gridspec_kw=dict(height_ratios=[1, max(num_layers, 4) / 4]), sharex=True)
    mean = levels.double().mean(dim=0, keepdim=True).numpy()
    top.imshow(mean, aspect="auto", cmap="Blues", vmin=1, vmax=num_levels)
    top.set_yticks([0], ["mean"])
    image = ax.imshow(levels.numpy(), aspect="auto", cmap=cmap, vmin=0.5,
                      vmax=num_levels + 0.5, interpolation="nearest")
    ax.set_ylabel("DynaMoE layer")
    step = max(1, num_layers // 6)
    ax.set_yticks(range(0, num_layers, step), [str(i + 1) for i in range(0, num_layers, step)])
    ax.set_xticks(range(count), [repr(p)[1:-1] for p in pieces], rotation=90, fontsize=6)
    bar = fig.colorbar(image, ax=[top, ax], ticks=range(1, num_levels + 1), fraction=0.02)
    bar.set_label("level (FFN shells used)")
    if title:
        top.set_title(title, fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def write_html(path: str, pieces: List[str], levels: torch.Tensor, num_levels: int,
               title: str = "") -> None:
    """Self-contained HTML: the text shaded by mean level, then the layers x tokens grid."""
    mean = levels.double().mean(dim=0).tolist()
    ink = lambda level: "#fff" if level > 1 + 0.55 * (num_levels - 1) else "#000"  # noqa: E731
    spans = []
    for j, piece in enumerate(pieces):
        per_layer = " ".join(str(int(v)) for v in levels[:, j])
        spans.append(f'<span style="background:{_color(mean[j], num_levels)};'
                     f'color:{ink(mean[j])}" title="mean level {mean[j]:.2f}; per layer: '
                     f'{per_layer}">{html.escape(piece)}</span>')
    head = "".join(f"<th>{html.escape(repr(p)[1:-1])}</th>" for p in pieces)
    grid = []
    for i in range(levels.shape[0]):
        cells = "".join(f'<td style="background:{_color(int(v), num_levels)}" '
                        f'title="layer {i + 1}: level {int(v)}"></td>' for v in levels[i])
        grid.append(f"<tr><th>{i + 1}</th>{cells}</tr>")
    legend = " ".join(f'<span style="background:{_color(e, num_levels)};color:{ink(e)};'
                      f'padding:0 6px">level {e}</span>' for e in range(1, num_levels + 1))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title or "DynaMoE routing")}</title>
<style>
body {{ font-family: sans-serif; max-width: 70em; margin: 1em auto; }}
.text span {{ white-space: pre-wrap; line-height: 1.8; }}
table {{ border-collapse: collapse; font-size: 9px; }}
td {{ width: 12px; height: 10px; }}
th {{ font-weight: normal; writing-mode: vertical-rl; }}
tr th:first-child {{ writing-mode: horizontal-tb; }}
</style></head><body>
<h3>{html.escape(title or "DynaMoE routing")}</h3>
<p>Each token is shaded by its mean level over the {levels.shape[0]} DynaMoE layers (darker =
more FFN shells = harder); hover for the level at every layer. {legend}</p>
<div class="text">{"".join(spans)}</div>
<h4>Level per layer (rows) and token (columns)</h4>
<table><tr><th></th>{head}</tr>
{chr(10).join(grid)}
</table></body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
