"""`convert_checkpoint.py hf-to-megatron / megatron-to-hf --streaming`
(checkpoint/hf_streaming.py): one layer in host memory at a time, the source dtype kept, the
same tensors as the whole-model conversion bit for bit, HF -> Megatron -> HF bit-exact."""

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


def _hf_folder(folder, arch, state, dtype):
    """A Hugging Face folder (save_pretrained, safetensors) holding `state`'s weights."""
    from transformers import AutoModelForCausalLM

    from megatron_dynamoe.checkpoint.hf import hf_config_from_architecture

    model = AutoModelForCausalLM.from_config(hf_config_from_architecture(arch)).to(dtype)
    model.load_state_dict(megatron_to_hf_state_dict(state, arch), strict=True)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big") / "ckpt"
    return folder, _checkpoint(folder, BIG)


def _peak_growth(*args) -> int:
    """The tool's peak resident memory above the imported libraries, in bytes: its own
    high-water mark (VmHWM; getrusage's maxrss would start from the forking test
    process's) against its resident size once torch, transformers and Megatron are in."""
    code = (
        "import re, sys, psutil, torch, transformers, safetensors, megatron.core\n"
        "import transformers.models.llama.modeling_llama\n"
        "from megatron_dynamoe.cli.common import run_tool\n"
        "from megatron_dynamoe.cli.convert_checkpoint import main\n"
        "before = psutil.Process().memory_info().rss\n"
        f"code = run_tool(main, {[str(a) for a in args]!r})\n"
        "status = open('/proc/self/status').read()\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024\n"
        "print('GROWTH', peak - before)\n"
        "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split("GROWTH")[1])


# The rest of the start-up (a gloo world, the remaining imports) is the fixed part; the model
# is 377 MB: holding it, or a second copy, would show.
FEW_LAYERS = 4 * LAYER_BYTES + 96 * 2 ** 20
assert FEW_LAYERS < 24 * LAYER_BYTES / 2


def test_streaming_export_peak_memory_is_a_few_layers(big, tmp_path):
    folder, state = big
    out = tmp_path / "hf"
    growth = _peak_growth("megatron-to-hf", "--load", folder, "--output", out, "--streaming",
                          "--no-logit-parity")
    assert growth < FEW_LAYERS, (growth, LAYER_BYTES)
    assert len(glob.glob(str(out / "*.safetensors"))) == 25  # one per layer + the rest
    expected = megatron_to_hf_state_dict(state, BIG)
    found = _read_folder(out)
    assert sorted(found) == sorted(expected)
    assert all(torch.equal(found[k], expected[k]) for k in expected)


def test_streaming_import_peak_memory_is_a_few_layers(big, tmp_path):
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint, read_info

    _, state = big
    _hf_folder(tmp_path / "hf", BIG, state, torch.float32)
    out = tmp_path / "ckpt"
    growth = _peak_growth("hf-to-megatron", "--hf-model", tmp_path / "hf", "--output", out,
                          "--streaming", "--no-logit-parity")
    assert growth < FEW_LAYERS, (growth, LAYER_BYTES)
    # Megatron's own loader reads it; every tensor is the source's, bit for bit.
    model = build_gpt_model(BIG, transformer_config(BIG, perform_initialization=False))
    load_checkpoint(model, str(out))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert read_info(str(out)).extra["dtype"] == "float32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_megatron_hf_round_trip_is_bit_exact(tmp_path, dtype):
    from megatron_dynamoe.checkpoint.integrity import read_dcp_metadata

    arch = PRESETS["tiny-llama"]
    torch.manual_seed(5)
    model = build_gpt_model(arch, transformer_config(arch))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    original = _hf_folder(tmp_path / "hf", arch, state, dtype)
    done = run_tool_here("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-model",
                         tmp_path / "hf", "--output", tmp_path / "ckpt", "--streaming")
    assert done.returncode == 0, done.stderr
    assert "relative logit error" in done.stderr  # the fp32 logit check ran and held
    stored = read_dcp_metadata(str(tmp_path / "ckpt")).state_dict_metadata
    assert stored["embedding.word_embeddings.weight"].properties.dtype == dtype
    done = run_tool_here("tools/convert_checkpoint.py", "megatron-to-hf", "--load",
                         tmp_path / "ckpt", "--output", tmp_path / "back", "--streaming")
    assert done.returncode == 0, done.stderr
    back = _read_folder(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(back[k].dtype == dtype and torch.equal(back[k], original[k]) for k in back)


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


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_layer_by_layer_parity_holds_for_a_correct_conversion(tmp_path, preset):
    """Both directions log one error per layer and record the worst, within fp32 precision,
    with --no-logit-parity too (what a 70B conversion runs); GPT-2 as well as LLaMA."""
    from megatron_dynamoe.checkpoint.torch_dist import read_info

    arch = PRESETS[preset]
    state = _checkpoint(tmp_path / "src", arch, seed=7)
    _hf_folder(tmp_path / "hf", arch, state, torch.float32)
    done = run_tool_here("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-model",
                         tmp_path / "hf", "--output", tmp_path / "ckpt", "--streaming",
                         "--no-logit-parity")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("relative logit error") >= arch.num_layers
    recorded = read_info(str(tmp_path / "ckpt")).extra["layer_parity"]
    assert recorded["max_relative_logit_error"] <= 1e-5
    done = run_tool_here("tools/convert_checkpoint.py", "megatron-to-hf", "--load",
                         tmp_path / "ckpt", "--output", tmp_path / "back", "--streaming",
                         "--no-logit-parity")
    assert done.returncode == 0, done.stderr
    assert "parity (every layer, Hugging Face vs Megatron)" in done.stderr


def test_layer_by_layer_parity_catches_an_invertible_but_wrong_mapping(tmp_path, monkeypatch):
    """A conversion rule that swaps the SwiGLU gate and up halves converts back bit for bit
    (the per-tensor check passes) but computes another function: the layer check fails the
    conversion (exit 3, the layer named) and nothing is written."""
    from megatron_dynamoe.checkpoint import hf_streaming

    arch = PRESETS["tiny-llama"]
    state = _checkpoint(tmp_path / "src", arch, seed=8)
    _hf_folder(tmp_path / "hf", arch, state, torch.float32)
    right = hf_streaming._rules

    def swapped(a):
        rules = []
        for rule in right(a):
            if rule.mcore.endswith("mlp.linear_fc1.weight"):
                rule = dataclasses.replace(
                    rule, to_mcore=lambda gate, up: torch.cat([up, gate]),
                    to_hf=lambda t: tuple(reversed(t.chunk(2))))
            rules.append(rule)
        return rules

    monkeypatch.setattr(hf_streaming, "_rules", swapped)
    done = run_tool_here("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-model",
                         tmp_path / "hf", "--output", tmp_path / "ckpt", "--streaming",
                         "--no-logit-parity")
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "decoder layer 0" in last and "another function" in last
    assert not (tmp_path / "ckpt").exists()
