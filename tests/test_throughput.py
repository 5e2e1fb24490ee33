"""Model FLOPs of a training step (TFLOP/s per GPU, MFU) against hand arithmetic, and the
log line's step-time split and throughput fields."""

from __future__ import annotations

import pytest

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.models.architectures import get_architecture
from megatron_dynamoe.training.throughput import peak_flops, step_model_flops


def test_step_flops_by_hand():
    """tiny-llama: 2 layers, H 64, FFN 128 (SwiGLU), 4 heads / 2 groups (head dim 16), V
    vocabulary; s = 32 (mean causal context 16.5), 8 x 32 tokens; DynaMoE, 4 levels."""
    arch = get_architecture("tiny-llama")
    h, f, v, kv, c = 64, 128, arch.vocab_size, 2 * 16, 16.5
    attention = 2 * (2 * h * (h + 2 * kv) + 2 * h * h + 4 * h * c)
    ffn = 2 * (2 * 3 * h * f)
    head = 2 * h * v
    tokens = 8 * 32
    dense = step_model_flops(arch, None, 32, tokens, None, False, False)
    assert dense == pytest.approx(3 * (attention + ffn + head) * tokens, rel=1e-12)
    dyn = DynaMoEConfig(num_shells=4)
    router = 2 * (2 * h * dyn.num_levels)
    routed = step_model_flops(arch, dyn, 32, tokens, 0.4, False, False)
    assert routed == pytest.approx(3 * (attention + 0.4 * ffn + router + head) * tokens,
                                   rel=1e-12)
    # A labelled step runs every shell for every token: the full FFN, whatever was routed.
    labelled = step_model_flops(arch, dyn, 32, tokens, 0.4, True, False)
    assert labelled == pytest.approx(3 * (attention + ffn + router + head) * tokens, rel=1e-12)
    # Distillation adds the teacher's dense forward.
    distilled = step_model_flops(arch, dyn, 32, tokens, 0.4, False, True)
    assert distilled == pytest.approx(routed + (attention + ffn + head) * tokens, rel=1e-12)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H200", bf16=True) == 989.4e12
    assert peak_flops("NVIDIA H100 80GB HBM3", bf16=True) == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", bf16=False) == 19.5e12
    assert peak_flops("NVIDIA GeForce RTX 4090", bf16=True) is None


@pytest.mark.usefixtures("single_rank")
def test_log_line_has_the_time_split_and_tflops():
    """The trainer's log line: TFLOP/s per GPU equal to the step's model FLOPs (measured FFN
    fraction, labelled steps at the full FFN) over its time, and a time split whose parts
    add up to the step's time (within the few host operations between them)."""
    import io
    import re

    from megatron_dynamoe.dynamoe.layer import is_label_step
    from megatron_dynamoe.runtime.parallel import initialize_parallel
    from megatron_dynamoe.training.config import TrainConfig
    from megatron_dynamoe.training.monitor import TrainingMonitor
    from megatron_dynamoe.training.trainer import Trainer
    from tests.builders import synthetic_source
    from tests.test_training import BASE, INFO

    cfg = TrainConfig(**{**BASE, "train_iters": 3, "log_interval": 1})
    initialize_parallel(cfg.layout, seed=cfg.seed)
    stream = io.StringIO()
    trainer = Trainer(cfg, INFO, synthetic_source(), logger=TrainingMonitor(cfg, stream))
    steps = [trainer.train_step() for _ in range(2)]
    for step in steps:
        assert set(step.timings) == {"data", "forward-backward", "optimizer"}
        assert all(v >= 0 for v in step.timings.values())
        assert sum(step.timings.values()) <= step.seconds + 1e-3
        assert sum(step.timings.values()) >= 0.5 * step.seconds
    trainer.run()  # the third step, logged
    line = [x for x in stream.getvalue().splitlines() if "iteration        3/" in x][0]
    tflops = float(re.search(r"TFLOP/s/GPU: ([0-9.]+)", line).group(1))
    ffn = float(re.search(r"FFN compute: ([0-9.]+)", line).group(1))
    tokens_per_s = float(re.search(r"tokens/s: ([0-9.]+)", line).group(1))
    seconds = 8 * 32 / tokens_per_s
    labelled = is_label_step(2, INFO.dynamoe.label_fraction)  # iteration 3 is step 2
    expected = trainer.step_flops(ffn, labelled)
    assert expected > trainer.step_flops(0.0, False)
    # The line rounds FFN compute to 3 digits and TFLOP/s to 2.
    assert tflops == pytest.approx(expected / seconds / 1e12, rel=0.02, abs=0.006)
    assert re.search(r"ms \(forward-backward/optimizer/data\): \d+/\d+/\d+", line), line
    assert "MFU" not in line  # no GPU peak known on the CPU
