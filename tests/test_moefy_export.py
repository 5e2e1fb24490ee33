"""tools/moefy.py and tools/export.py as real processes, and checkpoint resharding.

- moefy of a plain Megatron-Core checkpoint (no model.json): theta = 1 equals dense;
- export at level K equals dense, export at level e equals the DynaMoE model with every token
  at level e (Megatron and Hugging Face forms);
- a checkpoint written at TP=2 / EP=2 loads at TP=1 and vice versa with equal logits;
- bad input: one `error:` line, non-zero exit, nothing left behind.
"""

import glob
import os

import pytest
import torch

from megatron_dynamoe.models.architectures import PRESETS, transformer_config
from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint, read_info
from megatron_dynamoe.utils.parity import megatron_logits
from megatron_dynamoe.models.export import dense_state_dict, exported_architecture
from megatron_dynamoe.models.builder import build_gpt_model
from megatron_dynamoe.dynamoe.control import set_sensitivity, set_static_level
from tests.builders import build_dense
from tests.multiproc import run_processes
from tests.tool_runner import run_tool_here, run_tool_process

ARCH = PRESETS["tiny-llama"]
TOKENS = torch.randint(0, ARCH.vocab_size, (3, 32), generator=torch.Generator().manual_seed(9))

pytestmark = pytest.mark.usefixtures("single_rank")


def _tool(name, *args):
    """The tool as a real process: exit code and stderr as a user sees them."""
    return run_tool_process(f"tools/{name}", *args)


def _tool_here(name, *args):
    """The same tool in this process (saves ~6 s of imports per call)."""
    return run_tool_here(f"tools/{name}", *args)


def _assert_clean_failure(result, phrase, output=None, code=2):
    assert result.returncode == code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, last
    assert "Traceback" not in result.stderr
    if output is not None:
        assert not os.path.exists(output)
        parent, base = os.path.split(output)
        assert not glob.glob(os.path.join(parent, f".{base}.tmp-*"))


@pytest.fixture(scope="module")
def plain_dense(tmp_path_factory):
    """A dense tiny LLaMA saved by plain Megatron-Core (dist_checkpointing.save, no json)."""
    from megatron.core import dist_checkpointing

    folder = str(tmp_path_factory.mktemp("plain") / "dense")
    os.makedirs(folder)
    model = build_dense(seed=31)
    dist_checkpointing.save(model.sharded_state_dict(), folder)
    return folder, megatron_logits(model, TOKENS)


@pytest.fixture(scope="module")
def moefied(plain_dense, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("moefied") / "dynamoe")
    result = _tool("moefy.py", "--load", plain_dense[0], "--model", "tiny-llama",
                   "--output", folder, "--dynamoe-importance", "weight",
                   "--dynamoe-num-shells", "8")
    assert result.returncode == 0, result.stderr
    return folder


def _load_dynamoe(folder):
    info = read_info(folder)
    model = build_gpt_model(info.architecture,
                            transformer_config(info.architecture, dynamoe=info.dynamoe),
                            info.dynamoe)
    load_checkpoint(model, folder)
    return model, info


def test_moefy_plain_megatron_checkpoint_reproduces_dense(plain_dense, moefied):
    model, info = _load_dynamoe(moefied)
    assert info.architecture == ARCH
    assert info.dynamoe.num_shells == 8 and info.dynamoe.level_shells == (2, 4, 6, 8)
    assert info.extra["theta1_parity"] <= 1e-4
    set_sensitivity(model, 1.0)
    logits = megatron_logits(model, TOKENS)
    reference = plain_dense[1]
    assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max()
    # and the routers really are DynaMoE routers, zero-initialised
    router = model.decoder.layers[0].mlp.router
    assert router.weight.shape == (4, ARCH.hidden_size) and not router.weight.any()


@pytest.mark.parametrize("level", [4, 2, 1])
def test_export_megatron_matches_dynamoe_at_level(moefied, plain_dense, level, tmp_path):
    output = str(tmp_path / f"dense-level{level}")
    run = _tool if level == 2 else _tool_here  # one real process is enough
    result = run("export.py", "--load", moefied, "--output", output, "--level", level)
    assert result.returncode == 0, result.stderr
    info = read_info(output)
    assert info.dynamoe is None
    assert info.architecture.ffn_hidden_size == ARCH.ffn_hidden_size * level // 4
    dense = build_gpt_model(info.architecture, transformer_config(info.architecture))
    load_checkpoint(dense, output)
    exported = megatron_logits(dense, TOKENS)

    model, _ = _load_dynamoe(moefied)
    set_static_level(model, level)
    expected = megatron_logits(model, TOKENS)
    assert (exported - expected).abs().max() <= 1e-5 * expected.abs().max()
    if level == 4:  # the full level is the dense model
        reference = plain_dense[1]
        assert (exported - reference).abs().max() <= 1e-4 * reference.abs().max()
    else:  # a real cut: the sub-network differs from the dense model
        assert (exported - plain_dense[1]).abs().max() > 1e-3


def test_export_hf_runs_in_vanilla_transformers(moefied, tmp_path):
    from transformers import AutoModelForCausalLM

    output = str(tmp_path / "hf-level3")
    result = _tool_here("export.py", "--load", moefied, "--output", output, "--level", 3,
                        "--format", "hf")
    assert result.returncode == 0, result.stderr
    hf = AutoModelForCausalLM.from_pretrained(output).eval()
    assert hf.config.intermediate_size == ARCH.ffn_hidden_size * 3 // 4
    model, _ = _load_dynamoe(moefied)
    set_static_level(model, 3)
    expected = megatron_logits(model, TOKENS)
    with torch.no_grad():
        got = hf(TOKENS).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_dense_state_dict_level_cut_is_the_prefix_of_shells(moefied):
    model, info = _load_dynamoe(moefied)
    state = dense_state_dict(model.state_dict(), info.dynamoe, gated=True, level=1)
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]
    shells = model.decoder.layers[0].mlp.experts.local_experts
    size = ARCH.ffn_hidden_size // 8
    # level 1 = shells 0 and 1: gate rows of both, then up rows of both
    assert torch.equal(fc1[:size], shells[0].linear_fc1.weight[:size])
    assert torch.equal(fc1[size:2 * size], shells[1].linear_fc1.weight[:size])
    assert torch.equal(fc1[2 * size:3 * size], shells[0].linear_fc1.weight[size:])
    with pytest.raises(ValueError, match="outside 1..4"):
        dense_state_dict(model.state_dict(), info.dynamoe, gated=True, level=5)
    partial = info.dynamoe.__class__(num_shells=8, moefied_layers=(1,))
    with pytest.raises(ValueError, match="needs one FFN width"):
        exported_architecture(ARCH, partial, 2)


def _reshard_worker(rank, world_size, source, target, mode):
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.runtime.parallel import (
        ParallelLayout,
        destroy_parallel,
        initialize_parallel,
    )
    from tests.builders import build_dynamoe

    info = read_info(source)
    layout = ParallelLayout(tensor_model_parallel_size=2 if mode == "tp2" else 1,
                            expert_model_parallel_size=2 if mode == "ep2" else 1,
                            pipeline_model_parallel_size=2 if mode == "pp2" else 1)
    initialize_parallel(layout)
    model = build_dynamoe(info.dynamoe, layout, sequence_parallel=False)
    load_checkpoint(model, source)
    if mode != "pp2":  # a pipeline stage alone has no logits; its weights are checked below
        set_sensitivity(model, 0.5)
        model.eval()
        logits = megatron_logits(model, TOKENS)
        if rank == 0:
            torch.save(logits, target + ".logits.pt")
    save_checkpoint(model, target, CheckpointInfo(info.architecture, info.dynamoe, {}))
    destroy_parallel()


@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["tp2", "ep2", "pp2"])
def test_checkpoint_reshards_between_layouts(moefied, tmp_path, mode):
    """TP=1 checkpoint -> loaded at TP=2 (or EP=2 with the balanced placement, or PP=2) ->
    saved there -> loaded back at TP=1: the same logits (routed, theta = 0.5) and weights."""
    model, _ = _load_dynamoe(moefied)
    with torch.no_grad():
        for layer in model.decoder.layers:  # routers that spread tokens over levels
            layer.mlp.router.weight.normal_(generator=torch.Generator().manual_seed(2))
    set_sensitivity(model, 0.5)
    reference = megatron_logits(model, TOKENS)
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint

    info = read_info(moefied)
    source = str(tmp_path / "tp1")
    save_checkpoint(model, source, CheckpointInfo(info.architecture, info.dynamoe, {}))
    target = str(tmp_path / mode)
    run_processes(_reshard_worker, 2, source, target, mode)
    if mode != "pp2":
        at_two = torch.load(target + ".logits.pt")
        assert (at_two - reference).abs().max() <= 1e-5 * reference.abs().max()
    back, _ = _load_dynamoe(target)
    set_sensitivity(back, 0.5)
    assert (megatron_logits(back, TOKENS) - reference).abs().max() <= 1e-5 * reference.abs().max()
    for name, param in model.state_dict().items():
        if torch.is_tensor(param) and not name.endswith("_extra_state"):
            assert torch.equal(back.state_dict()[name], param), name


def test_bad_inputs_fail_cleanly(plain_dense, moefied, tmp_path):
    out = str(tmp_path / "out")
    _assert_clean_failure(_tool("moefy.py", "--load", str(tmp_path / "absent"), "--output", out,
                                "--model", "tiny-llama"), "does not exist", out)
    _assert_clean_failure(_tool_here("moefy.py", "--load", plain_dense[0], "--output", out,
                                "--dynamoe-importance", "weight"), "pass --model PRESET", out)
    _assert_clean_failure(_tool_here("moefy.py", "--load", plain_dense[0], "--model", "tiny-llama",
                                "--output", out, "--dynamoe-importance", "weight",
                                "--dynamoe-num-shells", "3"),
                          "not a whole number of shells", out)
    _assert_clean_failure(_tool_here("moefy.py", "--load", plain_dense[0], "--model", "tiny-llama",
                                "--output", out, "--dynamoe-importance", "weight",
                                "--expert-model-parallel-size", "3"),
                          "--expert-model-parallel-size must divide", out)
    _assert_clean_failure(_tool_here("moefy.py", "--load", plain_dense[0], "--model", "tiny-gpt2",
                                "--output", out, "--dynamoe-importance", "weight"),
                          "bias-free FFNs", out)
    _assert_clean_failure(_tool_here("moefy.py", "--load", plain_dense[0], "--model", "tiny-llama",
                                "--output", out), "needs calibration text", out)
    _assert_clean_failure(_tool_here("moefy.py", "--load", plain_dense[0], "--model", "tiny-llama",
                                "--output", out, "--dynamoe-importance", "weight",
                                "--dynamoe-fit-routers"), "--dynamoe-fit-routers needs calibration", out)
    _assert_clean_failure(_tool_here("moefy.py", "--load", plain_dense[0], "--model", "tiny-llama",
                                "--output", out, "--dynamoe-importance", "weight",
                                "--dynamoe-label-tolerance", "0.5",
                                "--dynamoe-label-tolerance-max", "0.2"),
                          "--dynamoe-label-tolerance-max 0.2 must lie in", out)
    _assert_clean_failure(_tool_here("export.py", "--load", plain_dense[0], "--output", out),
                          "not a DynaMoE checkpoint", out)
    _assert_clean_failure(_tool_here("export.py", "--load", moefied, "--output", out, "--level", 7),
                          "outside 1..4", out)
    # existing output is never clobbered
    os.makedirs(out)
    marker = os.path.join(out, "keep")
    open(marker, "w").close()
    result = _tool_here("export.py", "--load", moefied, "--output", out)
    assert result.returncode == 2 and "pass --overwrite" in result.stderr
    assert os.path.exists(marker)


def test_corrupt_and_mismatched_checkpoints(moefied, tmp_path):
    import shutil

    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(moefied, corrupt)
    shard = sorted(glob.glob(os.path.join(corrupt, "*.distcp")))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    out = str(tmp_path / "out")
    _assert_clean_failure(_tool_here("export.py", "--load", corrupt, "--output", out),
                          "is truncated", out)
    with open(os.path.join(corrupt, "model.json"), "w") as f:
        f.write("{not json")
    _assert_clean_failure(_tool_here("export.py", "--load", corrupt, "--output", out),
                          "unreadable or corrupt", out)
    incomplete = str(tmp_path / "incomplete")
    shutil.copytree(moefied, incomplete)
    os.remove(os.path.join(incomplete, "metadata.json"))
    _assert_clean_failure(_tool_here("export.py", "--load", incomplete, "--output", out),
                          "not a complete Megatron torch_dist checkpoint", out)
