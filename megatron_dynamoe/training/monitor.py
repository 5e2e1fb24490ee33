"""Training logs: a Megatron-style line per log interval and TensorBoard scalars/histograms.

One rank writes: the first tensor- and data-parallel rank of the last pipeline stage (it
holds the loss). DynaMoE statistics are those of the layers on that rank's stage, from its
last micro-batch (`DynaMoELayer.last_stats`).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Optional

import torch

from megatron_dynamoe.training.config import TrainConfig


def is_logging_rank() -> bool:
    """Last pipeline stage, TP rank 0, DP rank 0."""
    from megatron.core import parallel_state

    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


class TrainingMonitor:
    """Prints progress and writes TensorBoard events (when `tensorboard_dir` is set)."""

    def __init__(self, cfg: TrainConfig, stream=sys.stdout):
        self.enabled = is_logging_rank()
        self.stream = stream
        self.writer = None
        self.started = time.time()
        self.first_iteration: Optional[int] = None
        if self.enabled and cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.tensorboard_dir)

    def text(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=self.stream, flush=True)

    def iteration(self, iteration: int, cfg: TrainConfig, *, loss, theta, grad_norm, lr,
                  seconds, model, skipped=False, scalars=None, distill_kl=None) -> None:
        """Log iteration `iteration`; `scalars` is a callable returning the model family's
        extra TensorBoard scalars (tag -> value), called only when TensorBoard is written."""
        if not self.enabled:
            return
        from megatron_dynamoe.model_builder import dynamoe_layers

        if self.first_iteration is None:
            self.first_iteration = iteration - 1
        tokens_per_s = cfg.global_batch_size * cfg.seq_length / max(seconds, 1e-9)
        layers = dynamoe_layers(model)
        fractions = [float(l.last_stats["ffn_fraction"]) for l in layers if l.last_stats]
        ffn = sum(fractions) / len(fractions) if fractions else 1.0
        w = self.writer
        if w is not None:
            if loss is not None:
                w.add_scalar("lm loss", loss, iteration)
            w.add_scalar("learning-rate", lr, iteration)
            if grad_norm is not None:
                w.add_scalar("grad-norm", grad_norm, iteration)
            w.add_scalar("tokens-per-second", tokens_per_s, iteration)
            if distill_kl is not None:
                w.add_scalar("distill kl", distill_kl, iteration)
            # The provider's statistics are gathered only where they are written.
            for tag, value in (scalars() if scalars else {}).items():
                w.add_scalar(tag, value, iteration)
            if layers:
                w.add_scalar("dynamoe/sensitivity", theta, iteration)
                w.add_scalar("dynamoe/ffn-compute-fraction", ffn, iteration)
            w.add_scalar("memory/max-rss-gb",
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, iteration)
            for layer in layers:
                self._layer_events(w, layer, iteration)
        if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
            done = iteration - self.first_iteration
            eta = (time.time() - self.started) / max(done, 1) * (cfg.train_iters - iteration)
            loss_text = f"{loss:.6E}" if loss is not None else "n/a"
            gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
            print(f" iteration {iteration:8d}/{cfg.train_iters:8d} | lm loss: {loss_text} | "
                  f"lr: {lr:.3E} | grad norm: {gn} | "
                  + (f"distill kl: {distill_kl:.4E} | " if distill_kl is not None else "")
                  # theta and FFN compute mean something only for DynaMoE layers.
                  + (f"theta: {theta:.3f} | FFN compute: {ffn:.3f} | " if layers else "")
                  + f"tokens/s: {tokens_per_s:.1f} | "
                  f"ETA: {eta:.0f} s" + (" | skipped" if skipped else ""),
                  file=self.stream, flush=True)
        if w is not None:
            w.flush()

    @staticmethod
    def _layer_events(w, layer, iteration: int) -> None:
        stats, n = layer.last_stats, layer.layer_number
        if not stats:
            return
        w.add_scalar(f"dynamoe/layer{n:03d}/ffn-compute-fraction", float(stats["ffn_fraction"]),
                     iteration)
        levels = stats["level_counts"].double()
        w.add_histogram(f"dynamoe/layer{n:03d}/levels",
                        torch.repeat_interleave(torch.arange(1, len(levels) + 1),
                                                stats["level_counts"].long()), iteration)
        per_expert = stats["tokens_per_expert"].double()
        ep = layer.ep_group.size()
        per_rank = per_expert.view(ep, -1).sum(dim=1)
        if per_rank.sum() > 0:
            w.add_scalar(f"dynamoe/layer{n:03d}/ep-load-imbalance",
                         float(per_rank.max() / per_rank.mean()), iteration)
        for rank, load in enumerate(per_rank.tolist()):
            w.add_scalar(f"dynamoe/layer{n:03d}/ep-rank{rank}-tokens", load, iteration)
        if "router_loss" in stats:
            w.add_scalar(f"dynamoe/layer{n:03d}/router-loss", float(stats["router_loss"]),
                         iteration)
            w.add_scalar(f"dynamoe/layer{n:03d}/router-accuracy",
                         float(stats["router_accuracy"]), iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
