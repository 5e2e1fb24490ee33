"""Training throughput: the DynaMoE model at a few sensitivities vs the dense model, same
architecture, same layout, same data, one run (issue #4).

Each case trains `--iters` iterations (after `--warmup` untimed ones) with Megatron's schedule,
DDP and distributed optimizer; the table is tokens/s and the ratio to dense. The routers are
zero-initialised (uniform levels), so theta = f puts every token at FFN fraction f;
`--label-fraction` adds the label steps' full-FFN pass.

    python bench/bench_train_step.py                       # 4 layers, hidden 512, FFN 2048
    torchrun --nproc-per-node 2 bench/bench_train_step.py --tensor-model-parallel-size 2
    python bench/bench_train_step.py --quick               # tiny sizes, seconds (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


from megatron_dynamoe.models.architectures import ModelArchitecture
from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.models.builder import causal_attention_mask
from megatron_dynamoe.runtime.parallel import initialize_parallel
from megatron_dynamoe.training.config import TrainConfig
from megatron_dynamoe.training.trainer import train


def _source(seq_length: int, vocab: int):
    table = torch.randint(0, vocab, (256, seq_length + 1),
                          generator=torch.Generator().manual_seed(0))
    # As the trainer's batches: no mask with the default sdpa attention (causal by the
    # layers' mask type, the flash path on GPUs).
    from megatron_dynamoe.runtime.transformer_impl import attention_backend

    mask = causal_attention_mask(seq_length) if attention_backend() == "local" else None

    def source(position, mbs):
        rows = table[[(position + i) % 256 for i in range(mbs)]]
        return dict(tokens=rows[:, :-1], labels=rows[:, 1:], loss_mask=torch.ones(mbs, seq_length),
                    position_ids=torch.arange(seq_length).expand(mbs, seq_length),
                    attention_mask=mask)

    return source


# Tiny sizes for --quick: the same code path and output in seconds (flags still override).
QUICK = dict(layers=2, hidden=64, ffn=256, vocab=256, seq_length=32, micro_batch_size=2,
             global_batch_size=2, iters=2, warmup=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sensitivities", default="0.25,0.5,0.75,1.0")
    p.add_argument("--label-fraction", type=float, default=0.0)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--no-level-sorted-experts", action="store_true",
                   help="route through Megatron's token dispatcher at EP = 1 (the reference "
                        "path; --no-dynamoe-level-sorted-experts)")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="tiny sizes (" + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + "), seconds")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)   # explicit flags still win

    arch = ModelArchitecture(family="llama", num_layers=args.layers, hidden_size=args.hidden,
                             ffn_hidden_size=args.ffn, num_attention_heads=8,
                             num_query_groups=4, vocab_size=args.vocab,
                             max_position_embeddings=args.seq_length)
    base = dict(model="tiny-llama", micro_batch_size=args.micro_batch_size,
                global_batch_size=args.global_batch_size, seq_length=args.seq_length,
                train_iters=args.iters + args.warmup, lr=1e-4, log_interval=10 ** 6,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                expert_model_parallel_size=args.expert_model_parallel_size,
                sequence_parallel=args.tensor_model_parallel_size > 1,
                dynamoe_level_sorted_experts=not args.no_level_sorted_experts)
    cases = [("dense", None, None)]
    cases += [(f"theta={t}", float(t), DynaMoEConfig(label_fraction=args.label_fraction))
              for t in args.sensitivities.split(",")]
    rows = []
    for name, theta, dyn in cases:
        # The dense model has no experts to spread: at EP > 1 it runs data-parallel over
        # the same GPUs (Megatron folds EP into DP for non-expert layers anyway).
        cfg = TrainConfig(**{**base, **(dict(expert_model_parallel_size=1) if theta is None
                                        else dict(dynamoe_sensitivity_min=theta,
                                                  dynamoe_sensitivity_max=theta))})
        initialize_parallel(cfg.layout)
        times = []
        last = [time.perf_counter()]

        def tick(iteration, times=times, last=last):
            now = time.perf_counter()
            if iteration > args.warmup:
                times.append(now - last[0])
            last[0] = now

        train(cfg, CheckpointInfo(arch, dyn, {}), _source(args.seq_length, args.vocab),
              on_iteration=tick)
        seconds = statistics.median(times)
        rows.append(dict(case=name, seconds_per_iter=seconds,
                         tokens_per_s=args.global_batch_size * args.seq_length / seconds))
    dense = rows[0]["tokens_per_s"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"training step: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, "
              f"seq {args.seq_length}, global batch {args.global_batch_size}, "
              f"TP={args.tensor_model_parallel_size} EP={args.expert_model_parallel_size}, "
              f"label fraction {args.label_fraction}, median of {args.iters}, "
              f"{'dispatcher' if args.no_level_sorted_experts else 'level-sorted'} experts")
        print(f"{'case':<12} {'s/iter':>8} {'tokens/s':>10} {'vs dense':>9}")
        for r in rows:
            r["ratio_to_dense"] = r["tokens_per_s"] / dense
            print(f"{r['case']:<12} {r['seconds_per_iter']:>8.3f} {r['tokens_per_s']:>10.1f} "
                  f"{r['ratio_to_dense']:>9.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
