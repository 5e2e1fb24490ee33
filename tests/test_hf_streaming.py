"""`convert_checkpoint.py megatron-to-hf --streaming` (checkpoint/hf_streaming.py): one layer in
host memory at a time, the checkpoint's dtype kept, the same tensors as the whole-model
conversion bit for bit."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_dynamoe.checkpoint.hf import megatron_to_hf_state_dict
from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
from megatron_dynamoe.models.architectures import PRESETS, transformer_config
from megatron_dynamoe.models.builder import build_gpt_model
from tests.tool_runner import REPO, run_tool_here

pytestmark = pytest.mark.usefixtures("single_rank")

# 24 layers of ~15.7 MB (fp32): 377 MB of layers, so that holding the model would show.
BIG = dataclasses.replace(PRESETS["tiny-llama"], num_layers=24, hidden_size=512,
                          ffn_hidden_size=2048, num_attention_heads=8, num_query_groups=4,
                          vocab_size=512)
LAYER_BYTES = 4 * (512 * (512 + 2 * 256) + 512 * 512 + 3 * 512 * 2048 + 2 * 512)


def _checkpoint(folder, arch, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = build_gpt_model(arch, transformer_config(arch, params_dtype=dtype))
    with torch.no_grad():
        for p in model.parameters():  # norms are ones at init: make every tensor distinct
            p.add_(0.01 * torch.randn(p.shape).to(dtype))
    save_checkpoint(model, str(folder), CheckpointInfo(arch, None, {}))
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}


def _read_folder(folder) -> dict:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for path in sorted(glob.glob(str(folder / "*.safetensors"))):
        tensors.update(load_file(path))
    assert sorted(index["weight_map"]) == sorted(tensors)
    return tensors


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big") / "ckpt"
    return folder, _checkpoint(folder, BIG)


def test_streaming_peak_memory_is_a_few_layers(big, tmp_path):
    folder, state = big
    out = tmp_path / "hf"
    # The process's own high-water mark (VmHWM: getrusage's maxrss would start from the
    # forking test process's), against its resident size once the libraries are imported.
    code = (
        "import re, sys, psutil, torch, transformers, safetensors, megatron.core\n"
        "from megatron_dynamoe.cli.common import run_tool\n"
        "from megatron_dynamoe.cli.convert_checkpoint import main\n"
        "before = psutil.Process().memory_info().rss\n"
        f"code = run_tool(main, ['megatron-to-hf', '--load', {str(folder)!r}, '--output',"
        f" {str(out)!r}, '--streaming', '--no-logit-parity'])\n"
        "status = open('/proc/self/status').read()\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024\n"
        "print('GROWTH', peak - before)\n"
        "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.split("GROWTH")[1])
    model_bytes = 24 * LAYER_BYTES
    # The rest of the start-up (a gloo world, the remaining imports) is the fixed part; the
    # model is 377 MB: holding it, or the HF copy, would show.
    assert growth < 4 * LAYER_BYTES + 96 * 2 ** 20 < model_bytes / 2, (growth, LAYER_BYTES)
    assert len(glob.glob(str(out / "*.safetensors"))) == 25  # one per layer + the rest
    expected = megatron_to_hf_state_dict(state, BIG)
    found = _read_folder(out)
    assert sorted(found) == sorted(expected)
    assert all(torch.equal(found[k], expected[k]) for k in expected)


def test_bf16_stays_bf16_and_round_trips_exactly(tmp_path):
    arch = PRESETS["tiny-llama"]
    state = _checkpoint(tmp_path / "ckpt", arch, dtype=torch.bfloat16, seed=3)
    done = run_tool_here("tools/convert_checkpoint.py", "megatron-to-hf", "--load",
                         tmp_path / "ckpt", "--output", tmp_path / "hf", "--streaming")
    assert done.returncode == 0, done.stderr
    assert "relative logit error" in done.stderr  # the fp32 logit check ran and held
    found = _read_folder(tmp_path / "hf")
    expected = megatron_to_hf_state_dict(state, arch)
    assert {t.dtype for t in found.values()} == {torch.bfloat16}
    assert all(torch.equal(found[k], expected[k]) for k in expected)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"


def test_no_logit_parity_needs_streaming(big, tmp_path):
    done = run_tool_here("tools/convert_checkpoint.py", "megatron-to-hf", "--load", big[0],
                         "--output", tmp_path / "x", "--no-logit-parity")
    assert done.returncode == 2 and "--streaming only" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "x").exists()
