"""Bad configurations fail early with a message that names the fix."""

import pytest
import torch

from megatron_dynamoe.models.architectures import (
    PRESETS,
    ModelArchitecture,
    get_architecture,
    transformer_config,
)
from megatron_dynamoe.dynamoe.config import DynaMoEConfig, check_sensitivity
from megatron_dynamoe.runtime.parallel import ParallelLayout
from megatron_dynamoe.utils.ranges import Interval


def test_defaults_are_four_levels_of_quarters():
    cfg = DynaMoEConfig()
    assert cfg.level_shells == (1, 2, 3, 4)
    assert cfg.num_levels == 4
    cfg = DynaMoEConfig(num_shells=8)
    assert cfg.level_shells == (2, 4, 6, 8)
    assert DynaMoEConfig.from_dict(cfg.to_dict()) == cfg


def test_ffn_not_divisible_into_shells():
    with pytest.raises(ValueError, match="not divisible into 5 shells: choose --dynamoe-num-shells"):
        DynaMoEConfig(num_shells=5, level_fractions=(0.2, 0.4, 1.0)).validate_for_model(1536, 30)


def test_shells_not_divisible_by_ep():
    with pytest.raises(ValueError, match="--expert-model-parallel-size must divide"):
        DynaMoEConfig(num_shells=4).validate_for_model(1536, 30, expert_model_parallel_size=3)


def test_shell_size_not_divisible_by_expert_tp():
    with pytest.raises(ValueError, match="not divisible by the expert tensor-parallel size"):
        DynaMoEConfig(num_shells=8).validate_for_model(1544, 30, expert_tensor_parallel_size=2)


@pytest.mark.parametrize("fractions", [(0.5, 0.25, 1.0), (0.25, 0.25, 1.0), (0.0, 1.0)])
def test_levels_not_increasing(fractions):
    with pytest.raises(ValueError, match="strictly increasing"):
        DynaMoEConfig(level_fractions=fractions)


def test_levels_must_end_at_full_ffn():
    with pytest.raises(ValueError, match="must end at 1.0"):
        DynaMoEConfig(level_fractions=(0.25, 0.5))


def test_level_not_whole_number_of_shells():
    with pytest.raises(ValueError, match="not a whole number of shells: choose --dynamoe-num-shells "
                                         "as a multiple of 3"):
        DynaMoEConfig(num_shells=4, level_fractions=(1 / 3, 2 / 3, 1.0))


@pytest.mark.parametrize("theta", [-0.1, 1.01, float("nan")])
def test_theta_outside_unit_interval(theta):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        check_sensitivity(theta)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        DynaMoEConfig(sensitivity=theta)


@pytest.mark.parametrize("kwargs,match", [
    (dict(label_fraction=1.5), "--dynamoe-label-fraction"),
    (dict(label_tolerance=-0.1), "--dynamoe-label-tolerance"),
    (dict(label_tolerance_max=0.01), r"--dynamoe-label-tolerance-max 0.01 must lie in \[--dynamoe"),
    (dict(label_reference="hidden"), "--dynamoe-label-reference 'hidden'"),
    (dict(shell_placement="random"), "--dynamoe-shell-placement"),
    (dict(importance="magic"), "--dynamoe-importance"),
    (dict(moefied_layers=(-1,)), "0-based layer"),
])
def test_other_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynaMoEConfig(**kwargs)


def test_config_round_trip_and_checkpoints_written_before_soft_labels():
    cfg = DynaMoEConfig(label_reference="ffn", label_tolerance=0.05, label_tolerance_max=0.4)
    assert DynaMoEConfig.from_dict(cfg.to_dict()) == cfg and cfg.soft_labels
    assert not DynaMoEConfig(label_tolerance=0.3, label_tolerance_max=0.3).soft_labels
    # A checkpoint's metadata from before label_reference existed keeps its meaning: hard labels
    # relative to the FFN output at its tolerance.
    old = {k: v for k, v in DynaMoEConfig().to_dict().items()
           if k not in ("label_reference", "label_tolerance_max")}
    old["label_tolerance"] = 0.5
    loaded = DynaMoEConfig.from_dict(old)
    assert (loaded.label_reference, loaded.label_tolerance, loaded.label_tolerance_max) == (
        "ffn", 0.5, None)


def test_moefied_layer_beyond_model():
    with pytest.raises(ValueError, match="names a layer >= num_layers=30"):
        DynaMoEConfig(moefied_layers=(3, 30)).validate_for_model(1536, 30)


def test_layout_must_divide_model():
    arch = get_architecture("smollm2-135m")
    with pytest.raises(ValueError, match="TP=2 must divide the attention heads"):
        transformer_config(arch, ParallelLayout(tensor_model_parallel_size=2))
    with pytest.raises(ValueError, match="PP=4 must divide the 30 layers"):
        transformer_config(arch, ParallelLayout(pipeline_model_parallel_size=4))
    with pytest.raises(ValueError, match="world size 6 is not divisible by TP x PP = 4"):
        ParallelLayout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2
                       ).data_parallel_size(6)


def test_dynamoe_refuses_biased_ffn():
    with pytest.raises(ValueError, match="bias-free FFNs"):
        transformer_config(get_architecture("tiny-gpt2"), dynamoe=DynaMoEConfig())


def test_unknown_family_and_preset():
    with pytest.raises(ValueError, match="unknown model family 'mamba'"):
        ModelArchitecture(family="mamba", num_layers=1, hidden_size=8, ffn_hidden_size=8,
                          num_attention_heads=2, vocab_size=8, max_position_embeddings=8)
    with pytest.raises(ValueError, match="unknown model 'llama9'"):
        get_architecture("llama9")


def test_transformer_config_for_llama_and_gpt2():
    llama = transformer_config(get_architecture("llama3-70b"), dynamoe=DynaMoEConfig(num_shells=8))
    assert (llama.normalization, llama.gated_linear_unit, llama.add_bias_linear) == \
        ("RMSNorm", True, False)
    assert llama.activation_func is torch.nn.functional.silu
    assert (llama.num_query_groups, llama.num_moe_experts, llama.moe_ffn_hidden_size) == \
        (8, 8, 28672 // 8)
    gpt2 = transformer_config(get_architecture("gpt2"))
    assert (gpt2.normalization, gpt2.gated_linear_unit, gpt2.add_bias_linear) == \
        ("LayerNorm", False, True)
    assert gpt2.num_moe_experts is None


@pytest.mark.parametrize("name,expected", [
    ("smollm2-135m", 134_515_008),   # HF SmolLM2-135M reports 134,515,008 parameters
    ("llama2-70b", 68_976_648_192),  # Llama-2-70B: 68.98 B
    ("llama3-70b", 70_553_706_496),  # Llama-3-70B: 70.55 B
    ("llama2-7b", 6_738_415_616),    # Llama-2-7B: 6,738,415,616
    ("llama2-13b", 13_015_864_320),  # Llama-2-13B: 13,015,864,320
    ("llama3.1-8b", 8_030_261_248),  # Llama-3.1-8B: 8,030,261,248
    ("mistral-7b-v0.3", 7_248_023_552),  # Mistral-7B-v0.3: 7,248,023,552
    ("gpt2", 124_439_808),           # GPT-2 small: 124,439,808
])
def test_preset_parameter_counts_match_published_models(name, expected):
    assert PRESETS[name].num_parameters() == expected


@pytest.mark.parametrize("interval,value,message", [
    (Interval(int, 1), 0, "--x 0 is out of range: give a value in [1, inf)"),
    (Interval(float, 0, 1, high_open=True), 1.0,
     "--x 1.0 is out of range: give a value in [0, 1)"),
    (Interval(float, 0, 1e4, low_open=True), 0.0,
     "--x 0.0 is out of range: give a value in (0, 10000]"),
    (Interval(float, None, 0.5), 0.75, "--x 0.75 is out of range: give a value in (-inf, 0.5]"),
    (Interval(float, 0), float("inf"), "--x inf: give a finite number"),
    (Interval(int, 1), float("nan"), "--x nan: give a finite number"),
])
def test_interval_messages(interval, value, message):
    with pytest.raises(ValueError) as e:
        interval.check("--x", value)
    assert str(e.value) == message
    assert interval.message("'v'", value) == message.replace(f"--x {value}", "'v'")


def test_interval_bounds():
    assert Interval(float, 0, 1).describe() == "[0, 1]"
    assert Interval(float, 0, 1, low_open=True, high_open=True).describe() == "(0, 1)"
    assert Interval(float).describe() == "(-inf, inf)"
    assert Interval(float, 0, 1).check("--x", 0) == 0
    assert Interval(float, 0, 1).check("--x", 1) == 1
    assert not Interval(float, 0, 1, low_open=True).contains(0)
    assert Interval(int, 1).contains(10**9)


def test_train_config_and_tool_flags_word_ranges_alike():
    # TrainConfig's RANGES and the tools' argparse types state ranges with the same Interval.
    import argparse

    from megatron_dynamoe.cli.common import COUNT, number
    from megatron_dynamoe.training.config import TrainConfig

    with pytest.raises(ValueError, match=r"^--micro-batch-size 0 is out of range: give a value "
                                         r"in \[1, inf\)$"):
        TrainConfig(model="tiny-llama", micro_batch_size=0)
    with pytest.raises(ValueError, match=r"^--router-lr-mult 0.0 is out of range: give a value "
                                         r"in \(0, 10000\]$"):
        TrainConfig(model="tiny-llama", router_lr_mult=0.0)
    with pytest.raises(ValueError, match="^--weight-decay nan: give a finite number$"):
        TrainConfig(model="tiny-llama", weight_decay=float("nan"))
    with pytest.raises(argparse.ArgumentTypeError,
                       match=r"^'0' is out of range: give a value in \[1, inf\)$"):
        COUNT("0")
    with pytest.raises(argparse.ArgumentTypeError,
                       match=r"^'0' is out of range: give a value in \(0, 1\]$"):
        number(float, 0, 1, low_open=True)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="^'1.5' is not an integer$"):
        COUNT("1.5")
    assert number(float, 0, 1)("0.25") == 0.25 and COUNT("3") == 3


def test_dynamoe_flags_default_to_the_config():
    # The --dynamoe-* flags take their defaults from DynaMoEConfig, stated once.
    import argparse

    from megatron_dynamoe.cli.common import add_dynamoe_config_arguments, \
        dynamoe_config_from_args
    from megatron_dynamoe.dynamoe.config import IMPORTANCE_METHODS

    parser = argparse.ArgumentParser()
    add_dynamoe_config_arguments(parser)
    assert dynamoe_config_from_args(parser.parse_args([])) == DynaMoEConfig()
    cfg = dynamoe_config_from_args(parser.parse_args(
        ["--dynamoe-num-shells", "8", "--dynamoe-level-fractions", "0.5,1",
         "--dynamoe-layers", "1,3", "--dynamoe-label-tolerance-max", "none"]))
    assert (cfg.num_shells, cfg.level_fractions, cfg.moefied_layers,
            cfg.label_tolerance_max) == (8, (0.5, 1.0), (1, 3), None)
    helps = {a.dest: (a.help, a.choices) for a in parser._actions}
    assert helps["dynamoe_level_fractions"][0].endswith("; default: 0.25,0.5,0.75,1.0")
    assert helps["dynamoe_moefied_layers"][0].endswith("; default: all")
    assert tuple(helps["dynamoe_importance"][1]) == IMPORTANCE_METHODS
    # A subset of the flags (tools/plan_layout.py): the other fields keep their defaults.
    parser = argparse.ArgumentParser()
    add_dynamoe_config_arguments(parser, names=("num_shells", "level_fractions"))
    assert dynamoe_config_from_args(parser.parse_args(["--dynamoe-num-shells", "2",
                                                       "--dynamoe-level-fractions", "0.5,1"])) \
        == DynaMoEConfig(num_shells=2, level_fractions=(0.5, 1.0))
