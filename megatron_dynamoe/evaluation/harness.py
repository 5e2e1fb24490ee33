"""One model variant through the whole evaluation: perplexity, zero-shot tasks, FFN compute.

`prepare_data` tokenises the held-out text and the task requests once; `evaluate_variant`
puts a model at a variant's setting and returns one result row (a dict, JSON-able):

    family, setting, theta, level, k, budget   what was evaluated
    perplexity                                 held-out text perplexity
    perplexity_ood                             {name: perplexity} on each other text
                                               (--ood-text), same window count and length
    ffn_fraction_ood                           {name: mean FFN compute on that text}
    tasks                                      {task: {acc, acc_norm | perplexity, primary, n}}
    mean_accuracy                              mean of the tasks' primary metrics
    ffn_fraction                               mean FFN compute over every evaluated token
                                               of the held-out text and the tasks (the other
                                               texts' tokens are not counted)
    ffn_fraction_text, ffn_fraction_tasks      the same over the text / the task tokens
    layer_ffn_fraction                         per decoder layer, every evaluated token
    relative_flops                             forward FLOPs per token / dense (flops.py), at
                                               the text windows' length
    tokens, seconds
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from megatron_dynamoe.evaluation import tasks as task_lib
from megatron_dynamoe.baselines.topk import Variant, apply_variant
from megatron_dynamoe.models.flops import causal_mean_context, relative_forward_flops
from megatron_dynamoe.evaluation.perplexity import perplexity
from megatron_dynamoe.evaluation.recorder import FFNComputeRecorder, LayerInfo
from megatron_dynamoe.utils.log import progress_counter
from megatron_dynamoe.evaluation.scoring import Encoded, encode_request, score_requests


@dataclass
class EvalData:
    """Tokenised evaluation inputs, shared by every variant."""

    windows: torch.Tensor                      # [n, s] held-out text
    docs: Dict[str, List[task_lib.Doc]]        # task -> documents
    requests: Dict[str, List[Encoded]]         # task -> one request per (doc, choice)
    ood_windows: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n, s]

    @property
    def units(self) -> int:
        """Work items of one variant: windows + requests (the progress bar's total)."""
        return (self.windows.shape[0] + sum(len(r) for r in self.requests.values())
                + sum(w.shape[0] for w in self.ood_windows.values()))


def prepare_data(tokenizer, task_names: Sequence[str], limit: Optional[int],
                 windows: torch.Tensor,
                 ood_windows: Optional[Dict[str, torch.Tensor]] = None) -> EvalData:
    """Load and tokenise the tasks (first `limit` documents each) next to `windows` (the
    held-out text) and `ood_windows` (other texts by name, perplexity only)."""
    docs, requests = {}, {}
    for name in task_names:
        docs[name] = task_lib.load_task(name, limit)
        requests[name] = [encode_request(tokenizer, d.context, c)
                          for d in docs[name] for c in d.choices]
    for name, extra in (ood_windows or {}).items():
        if extra.shape != windows.shape:
            raise ValueError(f"the {name} windows are {tuple(extra.shape)}, the held-out "
                             f"text's {tuple(windows.shape)}: they must match")
    return EvalData(windows, docs, requests, dict(ood_windows or {}))


def router_outputs(layer_info: Sequence[LayerInfo]) -> int:
    """Router outputs per MoE layer (K levels for DynaMoE, S shells for top-k, 0 dense), from
    `recorder.model_layer_info` (every pipeline stage's layers)."""
    return next((info.router_outputs for info in layer_info if info.router_outputs), 0)


def routed_layers(layer_info: Sequence[LayerInfo]) -> int:
    """How many decoder layers of the whole model have a router."""
    return sum(1 for info in layer_info if info.kind != "dense")


def evaluate_variant(model, variant: Variant, data: EvalData, arch, *, max_length: int,
                     tokens_per_batch: int = 2048, batch_size: int = 4,
                     family: Optional[str] = None) -> dict:
    """Evaluate `model` at `variant`'s setting on `data`; one result row (module docstring).
    `family` names the row's family when it is not the variant's (e.g. 'static-trained': a
    static variant of the checkpoint fine-tuned with static-sampled routing)."""
    started = time.time()
    apply_variant(model, variant)
    bar = progress_counter(data.units, f"{variant.family} {variant.setting}")
    try:
        with FFNComputeRecorder(model) as text_rec:
            ppl = perplexity(model, data.windows, batch_size, recorder=text_rec,
                             progress=bar.update)
        task_results = {}
        with FFNComputeRecorder(model) as task_rec:
            for name, docs in data.docs.items():
                scores = score_requests(model, data.requests[name], max_length=max_length,
                                        tokens_per_batch=tokens_per_batch, recorder=task_rec,
                                        progress=bar.update)
                per_doc, cursor = [], 0
                for doc in docs:
                    chunk = scores[cursor:cursor + len(doc.choices)]
                    per_doc.append([(s.loglik, s.greedy) for s in chunk])
                    cursor += len(doc.choices)
                task_results[name] = task_lib.task_metrics(task_lib.TASKS[name], docs, per_doc)
        # Other texts last, each with its own recorder: they add columns, never change the
        # in-domain numbers (ffn_fraction stays the held-out text + tasks).
        ood_ppl, ood_ffn = {}, {}
        for name, windows in data.ood_windows.items():
            with FFNComputeRecorder(model) as ood_rec:
                ood_ppl[name] = perplexity(model, windows, batch_size, recorder=ood_rec,
                                           progress=bar.update).perplexity
            ood_ffn[name] = ood_rec.mean_fraction()
    finally:
        bar.close()
    tokens = text_rec.tokens + task_rec.tokens
    sums = text_rec.fraction_sums + task_rec.fraction_sums
    layer_fractions = (sums / tokens).tolist()
    row = dict(
        family=family or variant.family, setting=variant.setting, theta=variant.theta,
        level=variant.level, k=variant.k, budget=variant.budget,
        layer_thetas=list(variant.layer_thetas) if variant.layer_thetas else None,
        perplexity=ppl.perplexity, perplexity_ood=ood_ppl, ffn_fraction_ood=ood_ffn,
        tasks=task_results,
        mean_accuracy=(sum(r["primary"] for r in task_results.values()) / len(task_results)
                       if task_results else None),
        ffn_fraction=sum(layer_fractions) / len(layer_fractions),
        ffn_fraction_text=text_rec.mean_fraction(),
        ffn_fraction_tasks=task_rec.mean_fraction() if task_rec.tokens else None,
        layer_ffn_fraction=layer_fractions,
        relative_flops=relative_forward_flops(
            arch, layer_fractions, causal_mean_context(data.windows.shape[1]),
            router_outputs(text_rec.layer_info), routed_layers(text_rec.layer_info)),
        tokens=tokens, seconds=time.time() - started)
    return row
