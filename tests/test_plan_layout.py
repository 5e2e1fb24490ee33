"""The layout planner against hand arithmetic: LLaMA-2-70B at the default layout of
slurm/moefy_70b.sh, Korthikanti et al.'s activation table, Megatron's pipeline in-flight
counts, refusals with a layout that fits, and tools/plan_layout.py's exit contract."""

import dataclasses
import json

import pytest

from megatron_dynamoe.models.architectures import ModelArchitecture, get_architecture
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.planning.planner import (
    GIB,
    PlanRequest,
    communication_bytes,
    layer_activation_bytes,
    plan,
    stage_layers,
    stage_parameters,
)
from megatron_dynamoe.planning.search import suggest
from megatron_dynamoe.runtime.parallel import ParallelLayout
from tests.tool_runner import run_tool_here

MIB = 2 ** 20
# slurm/moefy_70b.sh defaults: 8 nodes x 8 GPUs, TP=8 PP=4 VPP=5 EP=8 ETP=1 -> DP=2, EDP=2.
LLAMA2 = PlanRequest(
    model="llama2-70b", arch=get_architecture("llama2-70b"), dynamoe=DynaMoEConfig(num_shells=8),
    num_gpus=64, gpus_per_node=8,
    layout=ParallelLayout(tensor_model_parallel_size=8, pipeline_model_parallel_size=4,
                          virtual_pipeline_model_parallel_size=5, expert_model_parallel_size=8,
                          expert_tensor_parallel_size=1),
    micro_batch=1, global_batch=128, seq_length=4096, sequence_parallel=True,
    recompute="selective", bf16=True)
DEFAULT_FLAGS = ["--model", "llama2-70b", "--nodes", "8", "--gpus-per-node", "8",
                 "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
                 "--virtual-pipeline-model-parallel-size", "5", "--expert-model-parallel-size",
                 "8", "--expert-tensor-parallel-size", "1", "--dynamoe-num-shells", "8",
                 "--sequence-parallel", "--micro-batch-size", "1", "--global-batch-size", "128",
                 "--seq-length", "4096", "--recompute-granularity", "selective", "--bf16"]

# Hand arithmetic, LLaMA-2-70B: h=8192, FFN 28672, 64 heads, 8 KV groups (head dim 128),
# vocabulary 32000, 80 layers.
H, F, V = 8192, 28672, 32000
ATTN = H * (H + 2 * 8 * 128) + H * H          # QKV + output projection = 150,994,944
ROUTER = 4 * (H + 1)                          # [K=4 levels, H] weight + bias
EXPERTS = 3 * H * F                           # SwiGLU FFN cut into 8 shells = 704,643,072
STAGE0_DENSE = 20 * (ATTN // 8 + 2 * H + ROUTER) + V * H // 8  # + vocab-parallel embedding
STAGE0_EXPERT = 20 * EXPERTS // 8             # 1 shell of 8 per GPU (EP=8, expert TP=1)
SBH = 4096 * 1 * H                            # s * b * h


def test_llama2_70b_parameters():
    assert ATTN == 150_994_944 and EXPERTS == 704_643_072
    assert get_architecture("llama2-70b").num_parameters() == \
        80 * (ATTN + EXPERTS + 2 * H) + 2 * V * H + H == 68_976_648_192
    assert STAGE0_DENSE == 411_238_480 and STAGE0_EXPERT == 1_761_607_680
    assert stage_parameters(LLAMA2, 0) == (pytest.approx(STAGE0_DENSE, abs=1e-3),
                                           pytest.approx(STAGE0_EXPERT, abs=1e-3))
    # Last stage: the untied output layer instead of the embedding, plus the final norm.
    assert stage_parameters(LLAMA2, 3)[0] == pytest.approx(STAGE0_DENSE + H, abs=1e-3)
    # Interleaving: stage 1 holds chunks of layers 4-7, 20-23, 36-39, 52-55, 68-71.
    assert stage_layers(LLAMA2, 1) == [i + j for i in (4, 20, 36, 52, 68) for j in range(4)]


def test_llama2_70b_memory_per_gpu_at_default_layout():
    p = plan(LLAMA2)
    assert p.problems == [] and p.fits
    worst = p.worst
    assert worst.stage == 0  # most micro-batches in flight, and the embedding
    params = STAGE0_DENSE + STAGE0_EXPERT                          # 2,172,846,160
    assert worst.params == pytest.approx(params)
    assert worst.weights == pytest.approx(2 * params)              # bf16: 4.05 GiB
    assert worst.grads == pytest.approx(4 * params)                # fp32 main grads: 8.09 GiB
    # Distributed optimizer: fp32 main params + Adam m, v (12 B) over DP=2, experts over EDP=2.
    assert worst.optimizer == pytest.approx(12 * STAGE0_DENSE / 2 + 12 * STAGE0_EXPERT / 2)
    # Activations per layer (bytes / sbh), TP=8 with SP, selective recompute, bf16, no dropout:
    #   attention: norm in 2/8 + QKV in 2/8 + Q,K,V 2*(1 + 2*8/64)/8 + projection in 2/8
    #   MoE FFN:   norm in 2/8 + fp32 router in 4/8 + 8 shell copies in and out 2*2*8*1/8
    #              + SwiGLU fc1 out 2*2*3.5/8 + activation out 2*3.5/8
    per_layer = (0.25 + 0.25 + 0.3125 + 0.25) + (0.25 + 0.5 + 4 + 1.75 + 0.875)
    assert per_layer == 8.4375
    assert layer_activation_bytes(LLAMA2, True, "selective") == pytest.approx(per_layer * SBH)
    # Stage 0 of the interleaved 1F1B keeps 2(PP-1) + (VPP-1) PP + 1 = 23 chunks of 4 layers:
    # 92 = 80 x (1 + (PP-1)/(PP VPP)), Megatron-LM's interleaving penalty; + int64 token ids.
    activations = 23 * 4 * per_layer * SBH + 8 * 4096 * 4
    assert worst.activations == pytest.approx(activations)
    total = 2 * params + 4 * params + 6 * params + activations  # 52,120,912,832 B
    assert worst.total == pytest.approx(total) == 52_120_912_832
    assert worst.total / GIB == pytest.approx(48.541, abs=1e-3)
    assert p.required_gib == pytest.approx(total * 1.10 / GIB + 4.0)  # 57.40 GiB of 80
    assert [round(s.total / GIB, 2) for s in p.stages] == [48.54, 46.07, 43.96, 42.32]


def test_llama2_70b_communication_per_step():
    c = communication_bytes(LLAMA2)
    x = SBH * 2 * 7 / 8  # one bf16 [s, b, h] tensor through an 8-way ring
    # 64 micro-batches x 20 layers; attention with SP: 2 all-gathers + 2 reduce-scatters
    # (forward, backward) + 1 re-gather of the saved input = 5 ring passes.
    assert c["tensor-parallel"] == pytest.approx(64 * 20 * 5 * x) == 350 * GIB
    # Shell dispatch: each GPU's sb/8 tokens x 8 shells, in and out, forward and backward.
    assert c["expert-parallel all-to-all"] == pytest.approx(64 * 20 * 4 * SBH * 2 * 7 / 8)
    assert c["expert-parallel all-to-all"] == 280 * GIB
    assert c["pipeline p2p"] == pytest.approx(64 * 2 * 5 * SBH * 2 / 8) == 5 * GIB
    # Distributed optimizer: reduce-scatter fp32 grads + all-gather bf16 params, half of each
    # crossing the 2-way DP ring, for the largest stage (the last: + final norm).
    assert c["data-parallel"] == pytest.approx(
        0.5 * (STAGE0_DENSE + H) * 6 + 0.5 * STAGE0_EXPERT * 6)
    assert c["data-parallel"] / GIB == pytest.approx(6.071, abs=1e-3)


GPT_LIKE = ModelArchitecture(family="gpt2", num_layers=8, hidden_size=1024,
                             ffn_hidden_size=4096, num_attention_heads=16, vocab_size=50304,
                             max_position_embeddings=2048)


@pytest.mark.parametrize("tp, sp, recompute, expected", [
    (1, False, None, lambda a, s, h, t: 34 + 5 * a * s / h),
    (8, False, None, lambda a, s, h, t: 10 + 24 / t + 5 * a * s / (h * t)),
    (8, True, None, lambda a, s, h, t: (34 + 5 * a * s / h) / t),
    (8, True, "selective", lambda a, s, h, t: 34 / t),
])
def test_korthikanti_table_for_gpt_layers(tp, sp, recompute, expected):
    """Table 2 of Korthikanti et al. (2022): a GPT layer (FFN 4h, MHA, dropout) stores
    sbh * (34 + 5as/h) bytes in 16-bit, and the TP / SP / selective variants (Megatron's
    local attention, which keeps the s x s scores: --attention-backend local)."""
    r = PlanRequest(model="gpt", arch=GPT_LIKE, dynamoe=None, num_gpus=tp,
                    layout=ParallelLayout(tensor_model_parallel_size=tp), seq_length=2048,
                    micro_batch=2, sequence_parallel=sp, recompute=recompute, bf16=True,
                    dropout=True, flash_attention=False)
    sbh = 2048 * 2 * 1024
    assert layer_activation_bytes(r, False, recompute) == \
        pytest.approx(sbh * expected(16, 2048, 1024, tp), rel=1e-12)


def test_pipeline_in_flight_micro_batches():
    r = LLAMA2.with_layout(virtual_pipeline_model_parallel_size=None)
    per_layer = layer_activation_bytes(r, True, "selective")
    tokens = 8 * 4096 * 4
    # 1F1B: stage 0 holds PP=4 micro-batches of its 20 layers; the last stage 1.
    assert plan(r).stages[0].activations == pytest.approx(4 * 20 * per_layer + tokens)
    # Fewer micro-batches than stages: only those exist.
    few = dataclasses.replace(r, global_batch=4)  # 2 micro-batches per DP rank
    assert plan(few).stages[0].activations == pytest.approx(2 * 20 * per_layer + 8 * 4096 * 2)
    # Full recompute, uniform 1: one stored input per layer + one layer recomputed.
    full = dataclasses.replace(r, recompute="full")
    layer_input = SBH * 2 / 8
    assert plan(full).stages[0].activations == pytest.approx(
        4 * 20 * layer_input + layer_activation_bytes(full, True, None) + tokens)


@pytest.mark.parametrize("changes, sizes, message", [
    (dict(num_gpus=60), {}, "60 GPUs are not divisible by TP x PP x CP = 8 x 4 x 1"),
    (dict(gpus_per_node=16), dict(tensor_model_parallel_size=16),
     "TP=16 must divide the 64 attention heads and 8 query"),
    ({}, dict(virtual_pipeline_model_parallel_size=3),
     "PP x VPP = 4 x 3 must divide the 80 layers"),
    ({}, dict(virtual_pipeline_model_parallel_size=1),
     "the interleaved schedule needs PP > 1 and VPP > 1"),
    ({}, dict(expert_tensor_parallel_size=None),
     "not divisible by expert TP x EP x PP = 8 x 8 x 4"),
    ({}, dict(expert_model_parallel_size=16),
     "16 shells|8 shells cannot be split over expert-parallel size 16"),
    (dict(sequence_parallel=False), {}, "MoE layers with TP > 1 need --sequence-parallel"),
    (dict(global_batch=101), {},
     "global batch 101 is not divisible by micro batch x DP = 1 x 2"),
    (dict(global_batch=4), {}, "needs the 2 micro-batches per step to be a multiple of PP=4"),
    (dict(seq_length=4100), {}, "splits the 4100 tokens over TP x CP = 8"),
])
def test_divisibility_rules(changes, sizes, message):
    import re

    problems = plan(dataclasses.replace(LLAMA2.with_layout(**sizes), **changes)).problems
    assert any(re.search(message, p) for p in problems), problems


def test_request_reads_its_layout():
    assert (LLAMA2.tp, LLAMA2.pp, LLAMA2.vpp, LLAMA2.ep, LLAMA2.etp) == (8, 4, 5, 8, 1)
    assert (LLAMA2.expert_tp, LLAMA2.dp, LLAMA2.edp, LLAMA2.chunks) == (1, 2, 2, 5)
    assert LLAMA2.with_layout(expert_tensor_parallel_size=None).expert_tp == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        LLAMA2.tp = 2
    # The layout's own sizes are checked by ParallelLayout (integers >= 1).
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"^--expert-tensor-parallel-size must be an "
                                             r"integer >= 1, got "):
            LLAMA2.with_layout(expert_tensor_parallel_size=bad)
    with pytest.raises(ValueError, match=r"^plan: cp = 0 must be an integer >= 1$"):
        dataclasses.replace(LLAMA2, cp=0)
    with pytest.raises(ValueError, match="must be a ParallelLayout"):
        dataclasses.replace(LLAMA2, layout=(8, 4))


def test_tool_accepts_the_default_70b_layout(capsys):
    result = run_tool_here("tools/plan_layout.py", *DEFAULT_FLAGS)
    out = capsys.readouterr().out
    assert result.returncode == 0, result.stderr
    assert "TP=8 PP=4 VPP=5 EP=8 ETP=1 CP=1 -> DP=2, expert DP=2" in out
    assert "48.54 GiB; with 10% fragmentation + 4 GiB reserved: 57.40 GiB of 80 GiB" in out
    assert "verdict: fits (57.4 GiB <= 80 GiB per GPU)" in out
    result = run_tool_here("tools/plan_layout.py", *DEFAULT_FLAGS, "--json")
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["worst_stage"] == 0 and len(data["stages"]) == 4
    assert data["required_gib"] == pytest.approx(57.40, abs=5e-3)
    assert data["communication_bytes"]["tensor-parallel"] == 350 * GIB
    assert data["suggestion"] is None


def test_memory_refusal_names_reason_and_a_layout_that_fits(capsys):
    # LLaMA-3-70B at 8192 tokens: the interleaved schedule's extra in-flight chunks overflow.
    flags = [f if f != "llama2-70b" else "llama3-70b" for f in DEFAULT_FLAGS]
    flags[flags.index("4096")] = "8192"
    result = run_tool_here("tools/plan_layout.py", *flags)
    out = capsys.readouterr().out
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: layout refused: llama3-70b needs 85.3 GiB per GPU at TP=8 PP=4 VPP=5")
    assert "but a GPU has 80 GiB; a layout that fits (78.3 GiB): TP=8 PP=4 VPP= EP=8 ETP=1 " \
           "MICRO_BATCH=1 RECOMPUTE=selective" in lines[0]
    assert "verdict: REFUSED" in out
    assert "flags: --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4" in out
    # The suggestion re-plans as fitting, and changes one knob (VPP) of the request.
    request = dataclasses.replace(LLAMA2, model="llama3-70b",
                                  arch=get_architecture("llama3-70b"), seq_length=8192)
    fallback = suggest(request)
    assert plan(fallback.request).fits and \
        fallback.request == request.with_layout(virtual_pipeline_model_parallel_size=None)


def _with(flags, **values):
    """DEFAULT_FLAGS with some flag values replaced ({'tensor_model_parallel_size': 3})."""
    out = list(flags)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = str(value)
    return out


@pytest.mark.parametrize("values, message", [
    (dict(tensor_model_parallel_size=16, gpus_per_node=16, nodes=4),
     "TP=16 must divide the 64 attention heads and 8 query groups"),
    (dict(nodes=6), "48 GPUs are not divisible by TP x PP x CP = 8 x 4 x 1: use a multiple of 32"),
    (dict(expert_tensor_parallel_size=8), "not divisible by expert TP x EP x PP = 8 x 8 x 4"),
    (dict(dynamoe_num_shells=4), "4 shells cannot be split over expert-parallel size 8"),
    # ParallelLayout refuses it before the planner runs; the same one-line refusal.
    (dict(pipeline_model_parallel_size=1),
     "--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1"),
])
def test_bad_layouts_exit_2_with_one_error_line(values, message, capsys):
    result = run_tool_here("tools/plan_layout.py", *_with(DEFAULT_FLAGS, **values))
    capsys.readouterr()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: layout refused: "), lines
    assert message in lines[0]


def test_teacher_memory_by_hand():
    """--distill: the dense teacher at the student's TP / PP (bf16 weights, nothing else)
    and, on the last stage, the step's teacher logits [b, s, V / TP] for all 64 micro-batches."""
    import dataclasses

    from megatron_dynamoe.planning.planner import stage_memory, teacher_bytes

    r = dataclasses.replace(LLAMA2, distill=True)
    dense_layer = (ATTN + EXPERTS) // 8 + 2 * H  # the dense FFN TP-split like attention
    assert teacher_bytes(r, 0) == pytest.approx(2 * (20 * dense_layer + V * H // 8))
    logits = 64 * 1 * 4096 * V // 8 * 2
    assert logits / GIB == pytest.approx(1.953125)  # 64 x 4096 x 4000 x 2 bytes
    assert teacher_bytes(r, 3) == pytest.approx(2 * (20 * dense_layer + V * H // 8 + H)
                                                + logits)
    assert teacher_bytes(LLAMA2, 3) == 0.0
    assert stage_memory(r, 3).total == pytest.approx(stage_memory(LLAMA2, 3).total
                                                     + teacher_bytes(r, 3))


def test_gpu_presets_and_attention_backend_flags(capsys):
    """--gpu sets the memory (nvidia-smi totals), --gpu-memory-gib wins; --attention-backend
    local keeps the s x s scores (more activation memory than the default sdpa)."""
    import json

    from megatron_dynamoe.cli.plan_layout import main

    def run(*extra):
        main(DEFAULT_FLAGS + ["--json", *extra])
        return json.loads(capsys.readouterr().out)

    assert run("--gpu", "h200")["gpu_memory_gib"] == 140.4
    assert run("--gpu", "h100")["gpu_memory_gib"] == 79.6
    assert run("--gpu", "h200", "--gpu-memory-gib", "100")["gpu_memory_gib"] == 100
    assert run()["gpu_memory_gib"] == 80.0
    sdpa = run()["stages"][0]["activations"]
    local = run("--attention-backend", "local", "--recompute-granularity", "full",
                "--recompute-method", "uniform")["stages"][0]["activations"]
    assert run("--recompute-granularity", "full",
               "--recompute-method", "uniform")["stages"][0]["activations"] < local
    assert sdpa > 0
    with_teacher = run("--distill")["stages"][3]
    assert with_teacher["teacher"] > 2 * GIB
    assert with_teacher["total"] == pytest.approx(run()["stages"][3]["total"]
                                                  + with_teacher["teacher"])


def test_critical_path_by_hand_for_three_layouts():
    """8 shells in 4 levels (2 / 4 / 6 / 8 shells), a skewed level profile p = (0.1, 0.2,
    0.3, 0.4): shells 0-1 serve every token, 2-3 serve 0.9, 4-5 serve 0.7, 6-7 serve 0.4
    (mean FFN (2 + 1.8 + 1.4 + 0.8) / 8 = 0.75)."""
    from megatron_dynamoe.planning.critical_path import (
        ffn_critical_path,
        mean_ffn_fraction,
        rank_loads,
        shell_loads,
    )

    dyn, p = DynaMoEConfig(num_shells=8), (0.1, 0.2, 0.3, 0.4)
    assert shell_loads(dyn, p) == pytest.approx([1, 1, .9, .9, .7, .7, .4, .4])
    assert mean_ffn_fraction(dyn, p) == pytest.approx(0.75)
    # EP = 1 (expert TP only): every GPU a slice of every shell, the mean fraction.
    assert ffn_critical_path(dyn, p, 1) == pytest.approx(0.75)
    # EP = 8: one shell per rank; rank 0 holds shell 0, which every token needs.
    assert rank_loads(dyn, p, 8) == pytest.approx([1, 1, .9, .9, .7, .7, .4, .4])
    assert ffn_critical_path(dyn, p, 8) == pytest.approx(1.0)
    # EP = 4, serpentine: ranks hold {0, 7}, {1, 6}, {2, 5}, {3, 4}; 4/8 of their loads.
    assert rank_loads(dyn, p, 4) == pytest.approx([0.7, 0.7, 0.8, 0.8])
    assert ffn_critical_path(dyn, p, 4) == pytest.approx(0.8)


def test_expert_layout_ranking_for_the_70b_default():
    """LLaMA-2-70B at TP=8 PP=4 VPP=5 on 64 H100, uniform levels: EP=8 (one shell per GPU)
    saves nothing (critical path 1); EP=4 with ETP=1 reaches the mean FFN fraction 0.625
    and fits; EP=1 with ETP=8 would too but needs every token's 8 shell copies on every GPU
    (label steps) and does not fit. The all-to-all by hand: 64 micro-batches x 4096 tokens
    / 8 (SP) x 5 copies (0.625 x 8) x 3/4 off the GPU x 2 bytes x h, in and out, forward and
    backward, x 20 MoE layers of stage 0."""
    from megatron_dynamoe.planning.critical_path import layout_time, rank_expert_layouts

    ranked = rank_expert_layouts(LLAMA2)
    first, plan_first = ranked[0]
    assert (first.etp, first.ep) == (1, 4) and plan_first.fits
    assert first.critical_path == pytest.approx(0.625)
    current = layout_time(LLAMA2, (0.25,) * 4)
    assert (current.etp, current.ep, current.critical_path) == (1, 8, pytest.approx(1.0))
    assert first.all_to_all_bytes == pytest.approx(
        4 * 64 * 4096 / 8 * 5 * 3 / 4 * 2 * H * 20)
    assert first.ffn_seconds == pytest.approx(0.625 * current.ffn_seconds)
    no_ep = [(t, q) for t, q in ranked if (t.etp, t.ep) == (8, 1)][0]
    assert no_ep[0].critical_path == pytest.approx(0.625) and not no_ep[1].fits


def test_plan_layout_prints_the_critical_path_and_a_faster_grid(capsys):
    from megatron_dynamoe.cli.plan_layout import main

    assert main(DEFAULT_FLAGS + ["--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "ETP=1 EP=8 ranks at 1.000, 1.000, 0.750, 0.750, 0.500, 0.500, 0.250, 0.250 x " \
           "dense -> 1.000" in out
    assert "faster expert grid that fits: ETP=1 EP=4 (critical path 0.625" in out
    assert main(DEFAULT_FLAGS + ["--level-profile", "0.1,0.2,0.3,0.4", "--rank-expert-layouts",
                                 "--expert-model-parallel-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "ranks at 0.700, 0.700, 0.800, 0.800 x dense -> 0.800" in out
    assert "expert grids (fastest first)" in out and "faster expert grid" not in out


DOC_FLAGS = ["--model", "llama2-70b", "--nodes", "8", "--gpus-per-node", "8",
             "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
             "--virtual-pipeline-model-parallel-size", "5", "--expert-model-parallel-size", "4",
             "--expert-tensor-parallel-size", "1", "--dynamoe-num-shells", "8",
             "--sequence-parallel", "--micro-batch-size", "1", "--global-batch-size", "128",
             "--seq-length", "4096", "--bf16", "--gpu", "h100"]


def test_tool_on_the_documented_70b_command(capsys):
    """docs/launching.md's command (the SLURM default layout): the recorded numbers."""
    result = run_tool_here("tools/plan_layout.py", *DOC_FLAGS, "--rank-expert-layouts")
    out = capsys.readouterr().out
    assert result.returncode == 0, result.stderr
    assert "TP=8 PP=4 VPP=5 EP=4 ETP=1 CP=1 -> DP=2, expert DP=4" in out
    assert "58.39 GiB; with 10% fragmentation + 4 GiB reserved: 68.22 GiB of 79.6 GiB" in out
    assert "expert-parallel all-to-all      240.00 GiB" in out
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()
            if line.startswith("    ") and line.split()[0].isdigit()}
    assert rows[("1", "4")] == ["0.625", "2.11", "yes", "68.2"]
    assert rows[("1", "8")] == ["1.000", "3.22", "yes", "57.4"]
    assert rows[("8", "1")] == ["0.625", "1.75", "no", "145.9"]


def test_dense_request_has_only_dense_layer_activations():
    """A dense model (no DynaMoE config) is planned with dense layers only (the MoE term is
    never evaluated: it needs a shell count)."""
    import dataclasses

    from megatron_dynamoe.planning.planner import layer_activation_bytes, stage_memory

    dense = dataclasses.replace(LLAMA2, dynamoe=None, layout=ParallelLayout(
        tensor_model_parallel_size=8, pipeline_model_parallel_size=4,
        virtual_pipeline_model_parallel_size=5))
    per_layer = layer_activation_bytes(dense, False, "selective")
    memory = stage_memory(dense, 1)  # a middle stage: layers only
    # 2 (PP - 1 - 1) + (VPP - 1) PP + 1 = 21 chunks of 4 layers in flight on stage 1.
    assert memory.activations == pytest.approx(21 * 4 * per_layer)


def test_conversion_job_estimate_by_hand():
    """planning/conversion.py on llama2-70b at TP=8 in bf16 on H100s, against hand arithmetic
    (h 8192, F 28672, 8 query groups of 128, vocab 32000, 80 layers)."""
    from megatron_dynamoe.planning.conversion import INTERPRETER_BYTES, JobAssumptions, estimate
    from megatron_dynamoe.runtime.gpus import GPUS

    arch = get_architecture("llama2-70b")
    dyn = DynaMoEConfig(num_shells=8)
    e = estimate(arch, dyn, GPUS["h100"], tp=8, pp=1, bf16=True)
    layer = 8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    assert layer == 855_654_400
    params = arch.num_parameters()
    assert params == 80 * layer + 2 * 32000 * 8192 + 8192
    assert e.source_bytes == 2 * params
    # The layer check (two fp32 one-layer models + both sides' bf16 layer) outweighs three
    # bf16 copies of the largest tensor (a layer: more than the 32000-row embedding).
    assert e.convert_host_bytes == 2 * layer * 4 + 2 * layer * 2 + INTERPRETER_BYTES
    # Read + write + checksum read, and the layer check reading both checkpoints.
    assert e.convert_seconds == pytest.approx(5 * 2 * params / 1e9)
    assert e.logit_check_host_bytes == 8 * params + INTERPRETER_BYTES
    # Router data: 32768 tokens x (8192 + 4) fp32 per layer; 4 GiB holds 3 layers.
    assert 3 * 32768 * 8196 * 4 <= 4 * 2 ** 30 < 4 * 32768 * 8196 * 4
    assert e.moefy_router_groups == -(-80 // 3) == 27
    # Two bf16 models' TP shares dominate each GPU: between 2 x 2 x params / 8 and + 20 GiB.
    assert 4 * params / 8 < e.moefy_gpu_bytes < 4 * params / 8 + 20 * 2 ** 30
    fp32 = estimate(arch, dyn, GPUS["h100"], tp=8, pp=1, bf16=False)
    assert fp32.moefy_gpu_bytes > 79.6 * 2 ** 30 > e.moefy_gpu_bytes
    halved = estimate(arch, dyn, GPUS["h100"], tp=8, pp=2, bf16=False)
    assert halved.moefy_gpu_bytes < 0.65 * fp32.moefy_gpu_bytes  # fixed costs stay
    # More router memory: fewer passes, less time.
    roomy = estimate(arch, dyn, GPUS["h100"], tp=8, pp=1,
                     assume=JobAssumptions(router_fit_bytes=16 * 2 ** 30))
    assert roomy.moefy_router_groups == -(-80 // 15) and roomy.moefy_seconds < e.moefy_seconds
    # One forward of 1M tokens at 25 % of 8 x 989.4 TFLOP/s.
    assert e.evaluate_seconds_per_million_tokens == pytest.approx(
        2 * params * 1e6 / (8 * 989.4e12 * 0.25))


def test_plan_layout_job_convert_prints_and_refuses(capsys):
    flags = ["--job", "convert", "--model", "llama2-70b", "--gpu", "h100",
             "--tensor-model-parallel-size", "8", "--host-memory-gib", "2000"]
    assert run_tool_here("tools/plan_layout.py", *flags, "--bf16").returncode == 0
    out = capsys.readouterr().out
    assert "step 1, streaming hf-to-megatron" in out and "(fits this node)" in out
    assert "step 2, MoEfy on 8 GPUs" in out and "verdict: fits" in out
    result = run_tool_here("tools/plan_layout.py", *flags)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the convert job needs") and "use --bf16" in last
