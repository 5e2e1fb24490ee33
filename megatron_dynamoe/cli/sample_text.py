"""Sample calibration text from a dense Hugging Face model (MoEfy's --calibration-text).

The model generates `--num-samples` texts of exactly `--new-tokens` tokens from its
beginning-of-sequence token (nucleus sampling, seeded), written as a .jsonl file (one
{"text": ...} object per line) that `tools/moefy.py --calibration-text FILE` reads. MoEfy
calibrated on the model's own text keeps general ability that calibration on one corpus
loses (docs/recipe-study.md).

    python tools/sample_text.py --hf-model smollm2 --output data/self-samples.jsonl
    python tools/moefy.py --load ckpt/smollm2 --output ckpt/smollm2-dynamoe \\
        --tokenizer smollm2 --calibration-text data/self-samples.jsonl

Each sample yields one MoEfy calibration window of --calibration-seq-length tokens (256 by
default) when --new-tokens is a little longer (272 by default: decoded text tokenises back to
about as many tokens). Any other generator (an inference server for a 70B model) can write
the same .jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_dynamoe.cli.common import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    SMOLLM2,
    ArgumentParser,
    resolve_hf_folder,
    run_tool,
)
from megatron_dynamoe.utils.errors import ToolError
from megatron_dynamoe.utils.log import log


def parse_args(argv=None):
    from megatron_dynamoe.runtime.device import DEVICE_CHOICES

    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--hf-model", required=True, metavar="FOLDER",
                   help=f"Hugging Face model folder, or '{SMOLLM2}' for the shipped SmolLM2-135M")
    p.add_argument("--gguf-file", metavar="NAME", help="GGUF file inside --hf-model")
    p.add_argument("--output", required=True, help=".jsonl file to write")
    p.add_argument("--overwrite", action="store_true")
    s = p.add_argument_group("sampling")
    s.add_argument("--num-samples", type=COUNT, default=32)
    s.add_argument("--new-tokens", type=COUNT, default=272,
                   help="tokens per sample (end-of-sequence suppressed until then)")
    s.add_argument("--batch-size", type=COUNT, default=64,
                   help="samples generated together (more: faster, more KV-cache memory)")
    s.add_argument("--temperature", type=NON_NEGATIVE, default=1.0,
                   help="0: greedy decoding (every sample the same)")
    s.add_argument("--top-p", type=POSITIVE, default=0.95)
    s.add_argument("--seed", type=int, default=0, help="batch b is seeded with SEED + b")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.output.endswith(".jsonl"):
        raise ToolError(f"--output {args.output!r} must end in .jsonl (what --calibration-text "
                        f"reads as one text per line)")
    if os.path.exists(args.output) and not args.overwrite:
        raise ToolError(f"{args.output} exists; pass --overwrite or choose another --output")
    from megatron_dynamoe.data.self_samples import SamplingConfig

    try:
        config = SamplingConfig(count=args.num_samples, new_tokens=args.new_tokens,
                                batch_size=args.batch_size, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise ToolError(f"{e}: fix the sampling flag") from None
    folder, gguf = resolve_hf_folder(args.hf_model, args.gguf_file, "--hf-model")

    from megatron_dynamoe.checkpoint.hf import load_hf_model
    from megatron_dynamoe.data.self_samples import decode_samples, sample_token_ids
    from megatron_dynamoe.runtime.device import resolve
    from megatron_dynamoe.utils.outputs import atomic_file

    device = resolve(args.device).device
    model, tokenizer = load_hf_model(folder, gguf)
    model.to(device)
    log(f"sampling {config.count} texts of {config.new_tokens} tokens from "
        f"{os.path.join(folder, gguf) if gguf else folder} on {device} (temperature "
        f"{config.temperature}, top-p {config.top_p}, seed {config.seed})")

    def report(done: int, total: int, seconds: float) -> None:
        log(f"  {done}/{total} samples, {done * config.new_tokens / seconds:.0f} tokens/s")

    ids = sample_token_ids(model, tokenizer, config, on_batch=report)
    texts = decode_samples(tokenizer, ids)
    with atomic_file(args.output) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for number, text in enumerate(texts):
                f.write(json.dumps(dict(text=text, sample=number, seed=args.seed)) + "\n")
    log(f"wrote {len(texts)} samples ({ids.numel()} tokens) to {args.output}")
    return 0


def entry() -> None:
    """The `dynamoe-sample-text` console command."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
