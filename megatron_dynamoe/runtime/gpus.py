"""The GPUs the planner and the training log know: memory, peak FLOP/s, NVLink bandwidth.

Memory is nvidia-smi's total (MiB / 1024: the nominal "80 GB" / "141 GB" overstate what the
allocator can have). Peaks are NVIDIA's dense tensor-core figures (no sparsity) for bf16 and
plain fp32 (torch does not use TF32 for fp32 matmuls by default). NVLink is one direction's
bandwidth per GPU; between nodes the planner assumes one 400 Gb/s NIC per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

INTER_NODE_BYTES_PER_S = 50e9  # one 400 Gb/s InfiniBand / RoCE NIC per GPU


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model: `pattern` is matched (case-insensitively) in torch's device name."""

    pattern: str
    memory_gib: float
    bf16_flops: float
    fp32_flops: float
    nvlink_bytes_per_s: float


# Planner names (--gpu, GPU_TYPE) -> spec. Matching a device name tries them in this order,
# so the more specific patterns come first.
GPUS = {
    "h100-pcie": GpuSpec("H100 PCIe", 79.6, 756e12, 51.2e12, 300e9),
    "h200": GpuSpec("H200", 140.4, 989.4e12, 66.9e12, 450e9),
    "h100": GpuSpec("H100", 79.6, 989.4e12, 66.9e12, 450e9),
    "a100-40gb": GpuSpec("A100-SXM4-40GB", 40.0, 312e12, 19.5e12, 300e9),
    "a100": GpuSpec("A100", 80.0, 312e12, 19.5e12, 300e9),
}


def spec_for_device(device_name: str) -> Optional[GpuSpec]:
    """The spec whose pattern appears in `device_name` (torch.cuda.get_device_name); None
    for a GPU not in GPUS."""
    for spec in GPUS.values():
        if spec.pattern.lower() in device_name.lower():
            return spec
    return None
