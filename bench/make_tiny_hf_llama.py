#!/usr/bin/env python
"""A randomly initialised LLaMA-shaped Hugging Face model (transformers LlamaConfig +
LlamaForCausalLM, `save_pretrained` safetensors), with SmolLM2's vocabulary (49152 ids, tied
embeddings, RoPE base 1e5) so that text tokenised with SmolLM2's tokenizer fits it; the
tokenizer folder is copied in, which makes the folder a complete HF model for
tools/convert_checkpoint.py. Seeded: the same arguments give the same weights.

    python bench/make_tiny_hf_llama.py --output W/hf --tokenizer .gpu_smoke_data/tokenizer \
        --layers 2 --hidden 64 --ffn 128 --heads 4 --kv-heads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder to copy in")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(args.output):
        print(f"error: {args.output} exists", file=sys.stderr)
        return 2
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(args.output)  # safetensors
    for name in os.listdir(args.tokenizer):
        shutil.copyfile(os.path.join(args.tokenizer, name), os.path.join(args.output, name))
    params = sum(t.numel() for t in model.parameters())
    with open(os.path.join(args.output, "config.json")) as f:
        arch = json.load(f)["architectures"]
    print(f"make_tiny_hf_llama: {args.output}: {arch[0]}, {args.layers} layers, hidden "
          f"{args.hidden}, FFN {args.ffn}, {args.heads} heads / {args.kv_heads} KV, vocab "
          f"{args.vocab}, {params / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
