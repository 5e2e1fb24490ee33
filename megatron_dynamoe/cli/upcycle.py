"""Upcycle a dense Megatron-Core checkpoint into an MoE checkpoint with ordinary experts
(adaptive top-2, top-k or top-p gating).

Every FFN becomes `--num-experts` experts: copies of the FFN (`replicate`), or its neurons
split into equal groups by calibration importance (`split-importance`) or by co-activation
clusters (`split-coactivation`); routers are fitted on calibration text to pick the experts
that carry each token's output (see megatron_dynamoe/adaptive/upcycle.py). Before writing,
the tool checks the construction: replicated experts must reproduce the dense logits under
the configured gating, split experts with every expert at weight 1 (exit 3 otherwise); it
then reports how close the configured gating starts (logit error, perplexity on the
calibration text, experts per token). The checkpoint records the gating config and loads
at any TP / PP / EP layout.

    python tools/upcycle.py --load ckpt/smollm2 --output ckpt/smollm2-adaptive \\
        --tokenizer smollm2 --method split-coactivation --num-experts 4 --threshold 0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

from megatron_dynamoe.adaptive.config import DROP_POLICIES, GATING_MODES, AdaptiveGatingConfig
from megatron_dynamoe.cli.common import (
    add_architecture_arguments,
    architecture_flags,
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    ArgumentParser,
    add_config_arguments,
    add_layout_arguments,
    add_parity_arguments,
    add_runtime_arguments,
    calibration_windows,
    config_from_args,
    layer_list,
    finite_float,
    number,
    run_tool,
)

# AdaptiveGatingConfig field -> (flag, argparse keywords, help); defaults come from the
# dataclass (`add_config_arguments`). Fields without a flag (combine, scale, expert size)
# are set by `upcycled_gating` from --method.
GATING_FLAGS = {
    "num_experts": ("--num-experts", dict(type=COUNT), None),
    "gating": ("--gating", dict(choices=GATING_MODES), None),
    "threshold": ("--threshold", dict(type=finite_float),
                  "adaptive T: top-1 when p1 - p2 > T"),
    "topk": ("--topk", dict(type=COUNT), None),
    "top_p": ("--top-p", dict(type=number(float, 0, 1, low_open=True)), None),
    "max_experts": ("--max-experts", dict(type=COUNT), None),
    "capacity_factor": ("--capacity-factor", dict(type=POSITIVE), "default: dropless"),
    "drop_policy": ("--drop-policy", dict(choices=DROP_POLICIES), None),
    "aux_loss_coeff": ("--aux-loss-coeff", dict(type=NON_NEGATIVE), None),
    "moe_layers": ("--moe-layers", dict(type=layer_list),
                   "'all' (default) or 0-based layer indices to upcycle"),
}


def parse_args(argv=None):
    from megatron_dynamoe.adaptive.upcycle import UPCYCLE_METHODS

    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--load", required=True, help="dense torch_dist checkpoint folder")
    p.add_argument("--model", help="architecture preset, for a plain Megatron-Core checkpoint")
    p.add_argument("--output", required=True, help="MoE checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("experts and gating")
    g.add_argument("--method", choices=UPCYCLE_METHODS, default="split-coactivation")
    add_config_arguments(g, AdaptiveGatingConfig, GATING_FLAGS)
    g.add_argument("--router-logit-std", type=NON_NEGATIVE, default=0.1,
                   help="scale of the fitted router's logits on the calibration tokens")
    g.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    c = p.add_argument_group("calibration text")
    c.add_argument("--tokenizer", help="Hugging Face folder with a tokenizer, or 'smollm2'; "
                                       "needed by every method but data-free split-importance")
    c.add_argument("--gguf-file")
    add_parity_arguments(c, sequences=8, tolerance_help="construction parity")
    add_layout_arguments(p)
    add_architecture_arguments(p)
    add_runtime_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider, adaptive_layers
    from megatron_dynamoe.adaptive.upcycle import (
        capture_ffn_inputs,
        upcycle_state_dict,
        upcycled_gating,
    )
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint, resolve_architecture, \
        save_checkpoint
    from megatron_dynamoe.utils.outputs import check_output_path, tree_size
    from megatron_dynamoe.cli.common import layout_from_args, start_runtime
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.utils.log import log
    from megatron_dynamoe.utils.parity import (
        check_parity,
        megatron_logits,
        model_batches,
        relative_logit_error,
    )
    from megatron_dynamoe.models.builder import ModelProvider
    from megatron_dynamoe.runtime.parallel import ParallelLayout

    from megatron_dynamoe.models.registry import family_of

    check_output_path(args.output, args.overwrite, (args.load, args.tokenizer),
                      needed_bytes=tree_size(args.load))
    arch, info = resolve_architecture(args.load, args.model, architecture_flags(args))
    if family_of(info) != "dense":
        raise ToolError(f"{args.load} is already an MoE checkpoint; upcycle a dense one")
    gating = upcycled_gating(config_from_args(args, AdaptiveGatingConfig, GATING_FLAGS),
                             args.method, arch.ffn_hidden_size)
    provider = AdaptiveMoEProvider(arch, gating)
    layout = layout_from_args(args)
    provider.transformer_config(layout)   # refuse a layout that cannot hold the model
    if args.tokenizer is None and args.method != "split-importance":
        raise ToolError(f"--method {args.method} needs calibration text: pass --tokenizer "
                        f"(a Hugging Face folder, or 'smollm2')")
    log(f"upcycling {args.load}: {args.method}, {gating.num_experts} experts, "
        f"{gating.gating} gating; layout TP={layout.tensor_model_parallel_size} "
        f"PP={layout.pipeline_model_parallel_size} EP={layout.expert_model_parallel_size} "
        f"validated")

    start_runtime(args, local_weights=True)
    dense_provider = ModelProvider(arch, None)
    dense = dense_provider.build(dense_provider.transformer_config(
        ParallelLayout(), perform_initialization=False))  # the checkpoint replaces it
    load_checkpoint(dense, args.load, verify_checksums=args.verify_checksums)
    inputs = None
    if args.tokenizer is not None:
        tokens = calibration_windows(args)
        inputs = capture_ffn_inputs(dense, model_batches(tokens, args.batch_size),
                                    max_tokens=tokens.numel())
    else:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, arch.vocab_size, (2, min(64, arch.max_position_embeddings)),
                               generator=generator)
    state = upcycle_state_dict(dense.state_dict(), gating, args.method, arch.gated,
                               arch.activation_func, inputs, logit_std=args.router_logit_std,
                               seed=args.seed)

    def build(g, weights):
        p = AdaptiveMoEProvider(arch, g)
        model = p.build(p.transformer_config(ParallelLayout()), parallel_output=False)
        model.load_state_dict(weights, strict=False)
        return model

    probe = tokens[:2]
    dense_logits = megatron_logits(dense, probe)
    if args.method == "replicate":
        check_parity(dense_logits, megatron_logits(build(gating, state), probe),
                     args.tolerance, "replicated experts vs dense")
    else:
        uniform = {k: (torch.zeros_like(v) if k.endswith("router.weight") else v)
                   for k, v in state.items()}
        every = dataclasses.replace(gating, gating="topk", topk=gating.num_experts)
        check_parity(dense_logits, megatron_logits(build(every, uniform), probe),
                     args.tolerance, "every split expert at weight 1 vs dense")

    model = build(gating, state)
    nll, count, experts = 0.0, 0, []
    with torch.no_grad():
        for b in model_batches(probe, args.batch_size):
            out = model.eval()(b["tokens"], b["position_ids"], b["attention_mask"]).float()
            nll += F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                                   b["tokens"][:, 1:].reshape(-1), reduction="sum").item()
            count += b["tokens"][:, 1:].numel()
            experts += [float(l.router.last_stats["mean_experts_per_token"])
                        for l in adaptive_layers(model)]
    dense_nll = F.cross_entropy(dense_logits[:, :-1].reshape(-1, dense_logits.shape[-1]),
                                probe[:, 1:].reshape(-1)).item()
    closeness = dict(relative_logit_error=relative_logit_error(dense_logits,
                                                               megatron_logits(model, probe)),
                     perplexity=math.exp(nll / count), dense_perplexity=math.exp(dense_nll),
                     experts_per_token=sum(experts) / len(experts))
    log(f"{gating.gating} gating starts at relative logit error "
        f"{closeness['relative_logit_error']:.2e}, perplexity {closeness['perplexity']:.3f} "
        f"(dense {closeness['dense_perplexity']:.3f}) on the calibration text, "
        f"{closeness['experts_per_token']:.2f} experts per token")
    extra = dict(source=os.path.abspath(args.load), method=args.method,
                 calibration_text=args.calibration_text if inputs else None,
                 tokenizer=args.tokenizer, router_logit_std=args.router_logit_std,
                 closeness=closeness, tool="tools/upcycle.py")
    save_checkpoint(model, args.output, provider.checkpoint_info(extra), args.overwrite)
    log(f"wrote MoE checkpoint {args.output}")
    return 0


def entry() -> None:
    """The console command (see setup.py) and `python tools/upcycle.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
