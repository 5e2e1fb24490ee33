"""The GPU benchmark: is DynaMoE's saved FFN work saved time on one GPU?

Two parts, one process, bf16 on CUDA (fp32 on the CPU), no Transformer Engine:

1. Training steps of a ~1B-parameter LLaMA shape (16 layers, hidden 2048, FFN 8192, 16 heads /
   8 query groups, vocabulary 32000, sequence 2048, micro-batch 4, global batch 8): dense, and
   DynaMoE (4 shells, 4 levels, zero routers, so theta = f puts every token at FFN fraction f)
   at f = 1/4, 1/2, 3/4, 1, through the real trainer (Megatron schedule, DDP, distributed
   optimizer, sdpa attention). Per case: tokens/s, ratio to dense, TFLOP/s and MFU
   (training.throughput: the FFN work actually done), peak CUDA memory against the layout
   planner's estimate of the live tensors.
2. The FFN of one LLaMA-70B layer at TP = 8, per-GPU shapes (hidden 8192, FFN 3584, 4096
   tokens): Megatron's dense MLP vs the DynaMoE layer at f = 1/4 .. 1, forward + backward.
   Target: layer time at f <= (f + 0.05) x dense for f >= 1/4.

    python bench/gpu_bench.py --json /tmp/gpu_bench.json   # on the GPU: ~4 min on an H200
    python bench/gpu_bench.py --quick                     # tiny sizes, CPU, seconds (a test runs it)

On the lent GPU machine (docs/gpu.md), after `bash bench/prepare_gpu_wheels.sh` here:

    run(command="python -m pip install -q --no-index --no-deps --no-compile --target "
        "/tmp/site .gpu_smoke_whl/*.whl && PYTHONPATH=/tmp/site:. python bench/gpu_bench.py "
        "--json $OUT/gpu_bench.json", carry=[".gpu_smoke_whl"], timeout_s=420)

`--max-seconds` (default 330) stops before a case that would not finish in time and says so.
Exit 1 when a layer row misses its target (not in --quick mode, where fixed overheads rule).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

# The recorded shapes; --quick replaces them with tiny ones (flags still win).
FULL = dict(layers=16, hidden=2048, ffn=8192, heads=16, groups=8, vocab=32000,
            seq_length=2048, micro_batch_size=4, global_batch_size=8, iters=5, warmup=2,
            layer_hidden=8192, layer_ffn=3584, layer_tokens=4096, repeats=10)
QUICK = dict(layers=2, hidden=64, ffn=256, heads=4, groups=2, vocab=256, seq_length=32,
             micro_batch_size=2, global_batch_size=4, iters=2, warmup=1, layer_hidden=64,
             layer_ffn=256, layer_tokens=128, repeats=2)
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {value} (--quick: {QUICK[key]})")
    p.add_argument("--max-seconds", type=float, default=330.0)
    p.add_argument("--json", help="write every number here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds, CPU is fine")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_rows(args, device, peak, deadline: float) -> list:
    """Part 1: one row per case (dense, then DynaMoE at each FFN fraction)."""
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo
    from megatron_dynamoe.dynamoe.config import DynaMoEConfig
    from megatron_dynamoe.models.architectures import ModelArchitecture
    from megatron_dynamoe.planning.planner import GIB, PlanRequest, stage_memory
    from megatron_dynamoe.training.config import TrainConfig
    from megatron_dynamoe.training.throughput import step_model_flops
    from megatron_dynamoe.training.trainer import train

    bf16 = device.type == "cuda"
    arch = ModelArchitecture(family="llama", num_layers=args.layers, hidden_size=args.hidden,
                             ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
                             num_query_groups=args.groups, vocab_size=args.vocab,
                             max_position_embeddings=args.seq_length)
    table = torch.randint(0, args.vocab, (64, args.seq_length + 1),
                          generator=torch.Generator().manual_seed(0))

    def source(position, mbs):
        rows = table[[(position + i) % 64 for i in range(mbs)]]
        return dict(tokens=rows[:, :-1], labels=rows[:, 1:],
                    loss_mask=torch.ones(mbs, args.seq_length),
                    position_ids=torch.arange(args.seq_length).expand(mbs, args.seq_length),
                    attention_mask=None)

    tokens = args.global_batch_size * args.seq_length
    rows = []
    cases = [("dense", None)] + [(f"DynaMoE f={f:g}", f) for f in FRACTIONS]
    for name, fraction in cases:
        if time.time() > deadline:
            print(f"skipped {name} and later cases: over --max-seconds", flush=True)
            break
        dyn = None if fraction is None else DynaMoEConfig(num_shells=4, label_fraction=0.0)
        cfg = TrainConfig(model="tiny-llama", micro_batch_size=args.micro_batch_size,
                          global_batch_size=args.global_batch_size,
                          seq_length=args.seq_length, train_iters=args.iters + args.warmup,
                          lr=1e-5, log_interval=10 ** 6, bf16=bf16,
                          device=device.type,
                          **({} if fraction is None else dict(
                              dynamoe_sensitivity_min=fraction,
                              dynamoe_sensitivity_max=fraction)))
        if device.type == "cuda":
            gc.collect()  # the previous case's model and optimizer state (train() frees them)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times, last = [], [time.perf_counter()]

        def tick(iteration, times=times, last=last):
            _sync(device)
            now = time.perf_counter()
            if iteration > args.warmup:
                times.append(now - last[0])
            last[0] = now

        train(cfg, CheckpointInfo(arch, dyn, {}), source, on_iteration=tick)
        seconds = statistics.median(times)
        flops = step_model_flops(arch, dyn, args.seq_length, tokens,
                                 fraction, False, False)
        estimate = stage_memory(PlanRequest(
            model="bench", arch=arch, dynamoe=dyn, num_gpus=1,
            micro_batch=args.micro_batch_size, global_batch=args.global_batch_size,
            seq_length=args.seq_length, bf16=bf16), 0).total / GIB
        row = dict(case=name, ffn_fraction=1.0 if fraction is None else fraction,
                   seconds_per_iter=seconds, tokens_per_s=tokens / seconds,
                   tflops=flops / seconds / 1e12,
                   mfu=flops / seconds / peak if peak else None,
                   peak_memory_gib=(torch.cuda.max_memory_allocated(device) / GIB
                                    if device.type == "cuda" else None),
                   planner_gib=estimate)
        row["vs_dense"] = row["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
        rows.append(row)
        print(f"  {name:<16} {seconds:8.3f} s/iter {row['tokens_per_s']:10.0f} tokens/s "
              f"{row['vs_dense']:6.3f} x dense {row['tflops']:8.2f} TFLOP/s"
              + (f" MFU {100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "")
              + (f" peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] else "")
              + f" (planner {estimate:.2f} GiB)", flush=True)
    return rows


def layer_rows(args, device) -> list:
    """Part 2: dense MLP vs the DynaMoE layer, forward + backward, at per-GPU 70B shapes."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dynamoe.dynamoe.config import DynaMoEConfig
    from megatron_dynamoe.models.architectures import ModelArchitecture, transformer_config
    from megatron_dynamoe.models.spec import dense_layer_spec, dynamoe_layer_spec

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch = ModelArchitecture(family="llama", num_layers=1, hidden_size=args.layer_hidden,
                             ffn_hidden_size=args.layer_ffn, num_attention_heads=8,
                             vocab_size=8, max_position_embeddings=8)
    dyn = DynaMoEConfig(num_shells=4, label_fraction=0.0)
    torch.manual_seed(0)
    dense = build_module(dense_layer_spec("RMSNorm", use_te=False).submodules.mlp,
                         config=transformer_config(arch, params_dtype=dtype)).to(device)
    layer = build_module(dynamoe_layer_spec(dyn, "RMSNorm", use_te=False).submodules.mlp,
                         config=transformer_config(arch, dynamoe=dyn, params_dtype=dtype))
    layer = layer.to(device)
    layer.set_layer_number(1)
    x = torch.randn(args.layer_tokens, 1, args.layer_hidden, device=device, dtype=dtype,
                    requires_grad=True)

    def step(module):
        if hasattr(module, "observe_residual"):
            module.observe_residual(x)
        out, _ = module(x)
        out.float().sum().backward()

    def timed(module) -> float:
        step(module)
        _sync(device)
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(module)
            _sync(device)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    dense.train()
    layer.train()
    base = timed(dense)
    rows = []
    for f in FRACTIONS:
        layer.set_sensitivity(f)
        seconds = timed(layer)
        measured = float(layer.last_stats["ffn_fraction"])
        rows.append(dict(ffn_fraction=measured, dense_ms=1e3 * base, layer_ms=1e3 * seconds,
                         ratio=seconds / base, target=measured + 0.05,
                         meets_target=seconds / base <= measured + 0.05))
        print(f"  f={measured:.3f} dense {1e3 * base:8.2f} ms layer {1e3 * seconds:8.2f} ms "
              f"ratio {seconds / base:6.3f} (target {measured + 0.05:.3f})"
              + ("" if rows[-1]["meets_target"] else "  MISSES TARGET"), flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    from megatron_dynamoe.runtime.device import current
    from megatron_dynamoe.runtime.parallel import destroy_parallel, initialize_parallel
    from megatron_dynamoe.runtime.parallel import ParallelLayout
    from megatron_dynamoe.training.throughput import peak_flops

    initialize_parallel(ParallelLayout())
    device = current().device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, bf16=True) if device.type == "cuda" else None
    print(f"gpu_bench on {name}, torch {torch.__version__}, "
          f"{'quick' if args.quick else 'full'} sizes, {time.strftime('%Y-%m-%d')}", flush=True)
    print(f"1. training steps: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, "
          f"seq {args.seq_length}, micro-batch {args.micro_batch_size}, global batch "
          f"{args.global_batch_size}, median of {args.iters}", flush=True)
    training = training_rows(args, device, peak, start + args.max_seconds * 0.75)
    print(f"2. one 70B layer's FFN at TP=8 (hidden {args.layer_hidden}, FFN {args.layer_ffn}, "
          f"{args.layer_tokens} tokens), forward + backward, median of {args.repeats}",
          flush=True)
    layers = layer_rows(args, device)
    destroy_parallel()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, quick=args.quick,
                           training=training, layer=layers,
                           seconds=time.time() - start), f, indent=2)
    print(f"done in {time.time() - start:.0f} s", flush=True)
    if args.quick:
        return 0
    return 0 if all(r["meets_target"] for r in layers) else 1


if __name__ == "__main__":
    sys.exit(main())
