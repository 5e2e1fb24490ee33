"""tools/moefy.py as a distributed job: TP = 2 and PP = 2 over gloo write the checkpoint one
process writes.

A dense tiny LLaMA with SmolLM2's vocabulary is MoEfied with activation importance on real
text (the shipped speeches, the shipped tokenizer) and fitted routers, once in one process
and once per layout in 2 real processes. Checked per layout: the importance each stage
computes equals the one-process importance (1e-6); every tensor of the written checkpoint
(permuted and cut shells, the rest) equals the one-process checkpoint's (1e-6 relative to
the tensor's scale), the fitted routers too (1e-6 at PP = 2; 5e-6 at TP = 2, whose split
matrix products change the router inputs by ~1e-7 in fp32 and 60 Adam steps carry that
into the weights); the router-fit statistics in model.json agree.
"""

import os

import pytest
import torch

from megatron_dynamoe.models.architectures import PRESETS, transformer_config
from tests.multiproc import run_processes
from tests.tool_runner import run_tool_process

ARCH = PRESETS["tiny-smollm2"]
CALIBRATION = ["--tokenizer", "smollm2", "--calibration-sequences", "4",
               "--calibration-seq-length", "64", "--router-fit-steps", "60",
               "--router-fit-sequences", "2",
               "--dynamoe-num-shells", "4", "--dynamoe-level-fractions", "0.5,1"]
LAYOUTS = {"tp2": ("--tensor-model-parallel-size", "2"),
           "pp2": ("--pipeline-model-parallel-size", "2")}

pytestmark = pytest.mark.usefixtures("single_rank")


def _tokens():
    from megatron_dynamoe.checkpoint.hf import load_tokenizer
    from megatron_dynamoe.data.corpora import load_texts, token_windows

    return token_windows(load_tokenizer("smollm2"), load_texts("sotu", limit=4), 64, 3)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.models.builder import build_gpt_model

    torch.manual_seed(5)
    model = build_gpt_model(ARCH, transformer_config(ARCH))
    folder = str(tmp_path_factory.mktemp("dense") / "dense")
    save_checkpoint(model, folder, CheckpointInfo(ARCH, None, {}))
    return folder


@pytest.fixture(scope="module")
def one_process(dense_checkpoint, tmp_path_factory):
    """(checkpoint folder, {layer: importance}) of the one-process MoEfy."""
    import torch.nn.functional as F

    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint
    from megatron_dynamoe.dynamoe.moefy import calibrate_importance
    from megatron_dynamoe.models.builder import build_gpt_model
    from megatron_dynamoe.utils.parity import model_batches

    folder = str(tmp_path_factory.mktemp("one") / "dynamoe")
    result = run_tool_process("tools/moefy.py", "--load", dense_checkpoint, "--output", folder,
                              *CALIBRATION)
    assert result.returncode == 0, result.stderr[-3000:]
    dense = build_gpt_model(ARCH, transformer_config(ARCH))
    load_checkpoint(dense, dense_checkpoint)
    importance = calibrate_importance(dense, model_batches(_tokens(), 2), gated=True,
                                      activation=F.silu)
    return folder, importance


def _worker(rank, world_size, layout_flags, dense, output, reference_importance):
    import torch.nn.functional as F

    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint
    from megatron_dynamoe.cli.common import run_tool
    from megatron_dynamoe.dynamoe.moefy import calibrate_importance
    from megatron_dynamoe.models.builder import build_gpt_model
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel
    from megatron_dynamoe.utils.parity import model_batches
    from tests.tool_runner import tool_main

    # The importance this layout computes: every stage's layers, all-gathered over TP.
    tp = 2 if layout_flags[0] == "--tensor-model-parallel-size" else 1
    layout = ParallelLayout(tensor_model_parallel_size=tp, pipeline_model_parallel_size=3 - tp)
    initialize_parallel(layout)
    model = build_gpt_model(ARCH, transformer_config(ARCH, layout))
    load_checkpoint(model, dense)
    importance = calibrate_importance(model, model_batches(_tokens(), 2), gated=True,
                                      activation=F.silu)
    assert importance, "a stage ranked no layer"
    for index, scores in importance.items():
        expected = reference_importance[index]
        assert scores.shape == expected.shape
        assert torch.allclose(scores, expected, rtol=1e-6, atol=0), index
    del model
    # The tool re-creates the model-parallel groups of the world this test started.
    code = run_tool(tool_main("tools/moefy.py"),
                    ["--load", dense, "--output", output, *CALIBRATION, *layout_flags])
    assert code == 0, f"rank {rank}: moefy exited {code}"


def _tensors(folder):
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint, read_info
    from megatron_dynamoe.models.builder import build_gpt_model

    info = read_info(folder)
    model = build_gpt_model(info.architecture, transformer_config(
        info.architecture, dynamoe=info.dynamoe), info.dynamoe)
    load_checkpoint(model, folder)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
            and not k.endswith("_extra_state")}, info


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_distributed_moefy_writes_the_one_process_checkpoint(layout, dense_checkpoint,
                                                             one_process, tmp_path):
    reference_folder, importance = one_process
    output = str(tmp_path / f"dynamoe-{layout}")
    run_processes(_worker, 2, LAYOUTS[layout], dense_checkpoint, output, importance)

    expected, expected_info = _tensors(reference_folder)
    got, info = _tensors(output)
    assert sorted(got) == sorted(expected)
    assert any(".experts.local_experts.3." in k for k in got)
    for key, value in expected.items():
        scale = float(value.abs().max()) or 1.0
        error = float((got[key] - value).abs().max()) / scale
        tolerance = 5e-6 if layout == "tp2" and ".router." in key else 1e-6
        assert error <= tolerance, f"{key}: relative error {error:.2e}"
    routers = [k for k in got if k.endswith("router.weight")]
    assert len(routers) == ARCH.num_layers and all(got[k].abs().max() > 0 for k in routers)
    assert info.dynamoe == expected_info.dynamoe
    fits, reference_fits = info.extra["router_fit"], expected_info.extra["router_fit"]
    assert [f["layer"] for f in fits["layers"]] == list(range(ARCH.num_layers))
    # importance from every calibration window, the routers fitted on the first two
    assert fits["tokens"] == 2 * 64 < info.extra["calibration_tokens"]
    for fit, ref in zip(fits["layers"], reference_fits["layers"]):
        assert fit["tokens"] == ref["tokens"]
        assert fit["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert fit["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)
    assert info.extra["theta1_parity"] <= 1e-4
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_distributed_moefy_refuses_a_layout_with_replicas(dense_checkpoint, tmp_path):
    output = str(tmp_path / "never")
    result = run_tool_process("tools/moefy.py", "--load", dense_checkpoint, "--output", output,
                              "--expert-model-parallel-size", "2", "--dynamoe-importance",
                              "weight", "--no-dynamoe-fit-routers")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "expert" in result.stderr.strip().splitlines()[-1]
    assert not os.path.exists(output)


@pytest.mark.slow
def test_moefy_bf16_keeps_theta_one_within_bf16_rounding(dense_checkpoint, tmp_path):
    """--bf16: both models in bf16 (half the memory), shells fitted in groups of one layer
    (--router-fit-memory-gib below one layer's data); the checkpoint records bfloat16 and,
    loaded in fp32 at theta = 1, stays within bf16 rounding of the dense model."""
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint, read_info
    from megatron_dynamoe.dynamoe.control import set_sensitivity
    from megatron_dynamoe.models.builder import build_gpt_model
    from megatron_dynamoe.utils.parity import megatron_logits, relative_logit_error
    from tests.tool_runner import run_tool_here

    output = str(tmp_path / "bf16")
    result = run_tool_here("tools/moefy.py", "--load", dense_checkpoint, "--output", output,
                           *CALIBRATION, "--bf16", "--router-fit-memory-gib", "0.0001")
    assert result.returncode == 0, result.stderr[-3000:]
    info = read_info(output)
    assert info.extra["params_dtype"] == "bfloat16"
    assert 1e-5 < info.extra["theta1_parity"] <= 2e-2  # bf16 rounding, not fp32 exactness
    assert len(info.extra["router_fit"]["layers"]) == ARCH.num_layers
    dense = build_gpt_model(ARCH, transformer_config(ARCH))
    load_checkpoint(dense, dense_checkpoint)
    model = build_gpt_model(ARCH, transformer_config(ARCH, dynamoe=info.dynamoe), info.dynamoe)
    load_checkpoint(model, output)
    set_sensitivity(model, 1.0)
    tokens = _tokens()[:2]
    assert relative_logit_error(megatron_logits(dense, tokens),
                                megatron_logits(model, tokens)) <= 2e-2
