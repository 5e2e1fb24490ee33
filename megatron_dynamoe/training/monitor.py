"""Training logs: a Megatron-style line per log interval and TensorBoard scalars/histograms.

One rank writes: the first tensor- and data-parallel rank of the last pipeline stage (it
holds the loss). DynaMoE statistics are those of the layers on that rank's stage (local
tokens), summed on the device over every micro-batch of the iteration
(`DynaMoELayer.stat_sums`).

Host synchronisation: the layers never wait for the device. The monitor reads their sums
only when it writes them (a log-interval line, or TensorBoard, written every iteration) and
then with ONE device-to-host copy for all layers (`read_stat_sums`); the line, the scalars
and the level histograms are built from that host copy. Off log iterations without
TensorBoard it reads nothing. Every call (every rank, logging or not) ends by resetting
every layer's sums (DynaMoE layers and adaptive routers), so each window is one iteration.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from megatron_dynamoe.training.config import TrainConfig


def stat_holders(model) -> List[torch.nn.Module]:
    """Every module of `model` (or a list of chunks) that keeps running routing statistics
    (`stat_sums`: DynaMoE layers, adaptive routers), in module order."""
    from megatron_dynamoe.dynamoe.layer import StatSums

    chunks = model if isinstance(model, (list, tuple, torch.nn.ModuleList)) else [model]
    return [m for chunk in chunks for m in chunk.modules()
            if isinstance(getattr(m, "stat_sums", None), StatSums)]


def reset_stats(model) -> None:
    """Start a new statistics window in every statistics holder of `model` (device only)."""
    for holder in stat_holders(model):
        holder.stat_sums.reset()


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
        self._holders_of = None   # (model, its stat holders): the module walk, once
        if self.enabled and cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.tensorboard_dir)

    def text(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=self.stream, flush=True)

    def _holders(self, model) -> List[torch.nn.Module]:
        if self._holders_of is None or self._holders_of[0] is not model:
            self._holders_of = (model, stat_holders(model))
        return self._holders_of[1]

    def iteration(self, iteration: int, cfg: TrainConfig, *, loss, theta, grad_norm, lr,
                  seconds, model, skipped=False, scalars=None, distill_kl=None,
                  level=None, timings=None, step_flops=None, peak_flops=None) -> None:
        """Log iteration `iteration`; `scalars` is a callable returning the model family's
        extra TensorBoard scalars (tag -> value), called only when TensorBoard is written.
        `level` is a static-sampled run's level of the iteration (shown instead of theta).
        `timings`: the step's seconds by part (StepResult.timings); `step_flops(ffn_fraction,
        labelled)`: its model FLOPs (training.throughput), shown as TFLOP/s per GPU, and MFU
        against `peak_flops` (FLOP/s of one GPU; None: not shown).
        Called once per iteration on every rank: it also resets the statistics windows."""
        holders = self._holders(model)
        try:
            if self.enabled:
                self._log(iteration, cfg, loss=loss, theta=theta, grad_norm=grad_norm, lr=lr,
                          seconds=seconds, skipped=skipped, scalars=scalars,
                          distill_kl=distill_kl, holders=holders, level=level,
                          timings=timings or {}, step_flops=step_flops,
                          peak_flops=peak_flops)
        finally:
            for holder in holders:
                holder.stat_sums.reset()

    def _log(self, iteration: int, cfg: TrainConfig, *, loss, theta, grad_norm, lr, seconds,
             skipped, scalars, distill_kl, holders, level=None, timings=None,
             step_flops=None, peak_flops=None) -> None:
        from megatron_dynamoe.dynamoe.layer import DynaMoELayer, read_stat_sums

        if self.first_iteration is None:
            self.first_iteration = iteration - 1
        tokens_per_s = cfg.global_batch_size * cfg.seq_length / max(seconds, 1e-9)
        layers = [h for h in holders if isinstance(h, DynaMoELayer)]
        w = self.writer
        log_line = iteration % cfg.log_interval == 0 or iteration == cfg.train_iters
        summaries: List[Dict[str, Any]] = []
        if layers and (w is not None or log_line):
            # The one device-to-host copy of this call.
            summaries = [layer.summarize_stats(sums)
                         for layer, sums in zip(layers, read_stat_sums(layers))]
        fractions = [s["ffn_fraction"] for s in summaries if s["ffn_fraction"] is not None]
        ffn = sum(fractions) / len(fractions) if fractions else 1.0
        rates = _rates(seconds, step_flops, peak_flops, ffn if layers else None,
                       any(s["labelled_forwards"] for s in summaries))
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
            if layers and level is not None:
                # Static-sampled: the level every token ran at (theta routes nothing).
                w.add_scalar("dynamoe/static-level", level, iteration)
            elif layers:
                w.add_scalar("dynamoe/sensitivity", theta, iteration)
            if layers:
                w.add_scalar("dynamoe/ffn-compute-fraction", ffn, iteration)
            w.add_scalar("memory/max-rss-gb",
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, iteration)
            for part, value in (timings or {}).items():
                w.add_scalar(f"time/{part}-ms", value * 1e3, iteration)
            for tag, value in rates.items():
                w.add_scalar(f"throughput/{tag}", value, iteration)
            for tag, value in _cuda_memory_gib().items():
                w.add_scalar(f"memory/cuda-{tag}-gb", value, iteration)
            for layer, summary in zip(layers, summaries):
                self._layer_events(w, layer, summary, iteration)
        if log_line:
            done = iteration - self.first_iteration
            eta = (time.time() - self.started) / max(done, 1) * (cfg.train_iters - iteration)
            loss_text = f"{loss:.6E}" if loss is not None else "n/a"
            gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
            print(f" iteration {iteration:8d}/{cfg.train_iters:8d} | lm loss: {loss_text} | "
                  f"lr: {lr:.3E} | grad norm: {gn} | "
                  + (f"distill kl: {distill_kl:.4E} | " if distill_kl is not None else "")
                  # theta (or a static-sampled run's level) and FFN compute mean something
                  # only for DynaMoE layers.
                  + ((f"level: {level} | " if level is not None else f"theta: {theta:.3f} | ")
                     + f"FFN compute: {ffn:.3f} | " if layers else "")
                  + f"tokens/s: {tokens_per_s:.1f} | "
                  + _throughput_text(rates, timings or {})
                  + f"ETA: {eta:.0f} s" + (" | skipped" if skipped else ""),
                  file=self.stream, flush=True)
        if w is not None:
            w.flush()

    @staticmethod
    def _layer_events(w, layer, summary: Dict[str, Any], iteration: int) -> None:
        """One DynaMoE layer's TensorBoard events from its host summary (plain Python)."""
        n = layer.layer_number
        if not summary["tokens"]:
            return
        tag = f"dynamoe/layer{n:03d}"
        w.add_scalar(f"{tag}/ffn-compute-fraction", summary["ffn_fraction"], iteration)
        _add_level_histogram(w, f"{tag}/levels", summary["level_counts"], iteration)
        per_expert = summary["tokens_per_expert"]
        ep = layer.ep_group.size()
        per = len(per_expert) // ep   # EP rank r holds physical slots [r per, (r+1) per)
        per_rank = [sum(per_expert[r * per:(r + 1) * per]) for r in range(ep)]
        total = sum(per_rank)
        if total > 0:
            w.add_scalar(f"{tag}/ep-load-imbalance", max(per_rank) / (total / ep), iteration)
        for rank, load in enumerate(per_rank):
            w.add_scalar(f"{tag}/ep-rank{rank}-tokens", load, iteration)
        if summary["labelled_tokens"]:
            w.add_scalar(f"{tag}/router-loss", summary["router_loss"], iteration)
            w.add_scalar(f"{tag}/router-accuracy", summary["router_accuracy"], iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _rates(seconds: float, step_flops, peak_flops, ffn_fraction, labelled) -> Dict[str, float]:
    """tflops-per-gpu (the step's model FLOPs over its time and the world's GPUs) and mfu
    (that over the GPU's peak), where known."""
    import torch.distributed as dist

    if step_flops is None or seconds <= 0:
        return {}
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_gpu = step_flops(ffn_fraction, labelled) / seconds / world
    rates = {"tflops-per-gpu": per_gpu / 1e12}
    if peak_flops:
        rates["mfu"] = per_gpu / peak_flops
    return rates


def _cuda_memory_gib() -> Dict[str, float]:
    """This process's CUDA memory (allocated, reserved by the caching allocator, peak
    allocated since the start) in GiB; empty off CUDA. Host-side counters: no sync."""
    from megatron_dynamoe.runtime.device import current

    if not current().is_cuda:
        return {}
    return {"allocated": torch.cuda.memory_allocated() / 2 ** 30,
            "reserved": torch.cuda.memory_reserved() / 2 ** 30,
            "peak": torch.cuda.max_memory_allocated() / 2 ** 30}


def _throughput_text(rates: Dict[str, float], timings: Dict[str, float]) -> str:
    """The log line's throughput, time split and CUDA memory fields."""
    text = ""
    if "tflops-per-gpu" in rates:
        text += f"TFLOP/s/GPU: {rates['tflops-per-gpu']:.2f} | "
    if "mfu" in rates:
        text += f"MFU: {100 * rates['mfu']:.1f}% | "
    parts = [p for p in ("forward-backward", "optimizer", "data", "teacher") if p in timings]
    if parts:
        text += (f"ms ({'/'.join(parts)}): "
                 + "/".join(f"{1e3 * timings[p]:.0f}" for p in parts) + " | ")
    memory = _cuda_memory_gib()
    if memory:
        text += ("GiB (alloc/reserved/peak): "
                 + "/".join(f"{memory[k]:.1f}" for k in ("allocated", "reserved", "peak"))
                 + " | ")
    return text


def _add_level_histogram(w, tag: str, counts: List[float], iteration: int) -> None:
    """TensorBoard histogram of levels 1..K from their token counts (host numbers): one
    bucket per level, (e - 1/2, e + 1/2], without materialising one value per token."""
    levels = [e for e, c in enumerate(counts, start=1) if c > 0]
    if not levels:
        return
    total = sum(counts)
    w.add_histogram_raw(
        tag, min=float(levels[0]), max=float(levels[-1]), num=int(total),
        sum=float(sum(e * c for e, c in enumerate(counts, start=1))),
        sum_squares=float(sum(e * e * c for e, c in enumerate(counts, start=1))),
        bucket_limits=[e + 0.5 for e in range(1, len(counts) + 1)],
        bucket_counts=[float(c) for c in counts], global_step=iteration)
