"""Plain Megatron checkpoints whose shape no preset has: the architecture from Megatron-LM's
architecture flags or from the arguments Megatron-LM saves in common.pt
(checkpoint/megatron_args.py), through tools/moefy.py and tools/convert_checkpoint.py."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_dynamoe.checkpoint.megatron_args import (
    architecture_from_megatron_args,
    default_ffn_hidden_size,
    read_saved_arguments,
)
from megatron_dynamoe.models.architectures import ModelArchitecture
from tests.tool_runner import run_tool_here

pytestmark = pytest.mark.usefixtures("single_rank")

# 3 layers, hidden 96, FFN 256, 6 heads in 2 query groups, vocabulary 512: no preset.
SHAPE = dict(num_layers=3, hidden_size=96, ffn_hidden_size=256, num_attention_heads=6,
             group_query_attention=True, num_query_groups=2, max_position_embeddings=128,
             normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
             rotary_base=10000, untie_embeddings_and_output_weights=True, vocab_size=512,
             add_bias_linear=False)
EXPECTED = ModelArchitecture(family="llama", num_layers=3, hidden_size=96, ffn_hidden_size=256,
                             num_attention_heads=6, num_query_groups=2, vocab_size=512,
                             max_position_embeddings=128, tie_embeddings=False)
FLAGS = ("--num-layers", 3, "--hidden-size", 96, "--ffn-hidden-size", 256,
         "--num-attention-heads", 6, "--group-query-attention", "--num-query-groups", 2,
         "--max-position-embeddings", 128, "--normalization", "RMSNorm", "--swiglu",
         "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
         "--vocab-size", 512, "--disable-bias-linear")
TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))


def test_llama_and_gpt2_shapes_from_megatron_arguments():
    assert architecture_from_megatron_args(SHAPE, "test") == EXPECTED
    # Megatron-LM's defaults: SwiGLU FFN 2/3 x 4h rounded down to 64, max positions from
    # --seq-length, padded vocabulary first.
    trimmed = {k: v for k, v in SHAPE.items() if k not in ("ffn_hidden_size",
                                                           "max_position_embeddings")}
    arch = architecture_from_megatron_args({**trimmed, "seq_length": 64,
                                            "padded_vocab_size": 640}, "test")
    assert (arch.ffn_hidden_size, arch.max_position_embeddings, arch.vocab_size) == \
        (default_ffn_hidden_size(96, True), 64, 640) == (256, 64, 640)
    assert (default_ffn_hidden_size(100, True), default_ffn_hidden_size(100, False)) == \
        (256, 400)  # 266.7 rounded down to a multiple of 64
    gpt2 = architecture_from_megatron_args(dict(num_layers=2, hidden_size=64,
                                                num_attention_heads=4, seq_length=32,
                                                vocab_size=100, openai_gelu=True), "test")
    assert (gpt2.family, gpt2.activation, gpt2.ffn_hidden_size, gpt2.tie_embeddings) == \
        ("gpt2", "gelu_tanh", 256, True)


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=None), "lacks hidden_size: give --hidden-size"),
    (dict(swiglu=False), "neither LLaMA-shaped"),
    (dict(add_bias_linear=True), "needs --disable-bias-linear"),
])
def test_unsupported_or_incomplete_arguments_name_the_flag(change, message):
    with pytest.raises(ValueError, match=message):
        architecture_from_megatron_args({**SHAPE, **change}, "the architecture flags")


def _plain_megatron_core_model():
    """The shape built by Megatron-Core alone (its local layer spec, its GPTModel)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(17)
    config = TransformerConfig(num_layers=3, hidden_size=96, ffn_hidden_size=256,
                               num_attention_heads=6, num_query_groups=2,
                               normalization="RMSNorm", gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False,
                               layernorm_epsilon=1e-5, hidden_dropout=0.0,
                               attention_dropout=0.0, use_cpu_initialization=True,
                               init_method_std=0.05)
    model = GPTModel(config=config,
                     transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=512, max_sequence_length=128, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False, rotary_base=10000)
    return model.eval()


@pytest.fixture(scope="module")
def plain_checkpoints(tmp_path_factory):
    """(bare folder, Megatron-LM-style folder with args in common.pt, reference logits)."""
    from megatron.core import dist_checkpointing

    from megatron_dynamoe.utils.parity import megatron_logits

    model = _plain_megatron_core_model()
    root = tmp_path_factory.mktemp("plain-megatron")
    bare, with_args = str(root / "bare"), str(root / "megatron-lm")
    os.makedirs(bare)
    os.makedirs(with_args)
    dist_checkpointing.save(model.sharded_state_dict(), bare)
    saved = argparse.Namespace(**SHAPE, seq_length=64, padded_vocab_size=512,
                               params_dtype=torch.float32, iteration=10)
    dist_checkpointing.save({**model.sharded_state_dict(), "args": saved,
                             "checkpoint_version": 3.0}, with_args)
    return bare, with_args, megatron_logits(model, TOKENS)


def test_saved_arguments_are_read_safely(plain_checkpoints):
    bare, with_args, _ = plain_checkpoints
    assert read_saved_arguments(bare) is None
    assert architecture_from_megatron_args(read_saved_arguments(with_args), "x") == EXPECTED


def test_moefy_with_architecture_flags_keeps_the_logits(plain_checkpoints, tmp_path):
    from megatron_dynamoe.checkpoint.loading import load_for_evaluation
    from megatron_dynamoe.dynamoe.control import set_sensitivity
    from megatron_dynamoe.utils.parity import megatron_logits

    bare, _, reference = plain_checkpoints
    out = tmp_path / "dynamoe"
    done = run_tool_here("tools/moefy.py", "--load", bare, "--output", out, *FLAGS,
                         "--dynamoe-importance", "weight")
    assert done.returncode == 0, done.stderr
    loaded = load_for_evaluation(str(out))
    assert loaded.info.architecture == EXPECTED and loaded.info.dynamoe is not None
    set_sensitivity(loaded.model, 1.0)
    logits = megatron_logits(loaded.model, TOKENS)
    assert (logits - reference).abs().max() <= 1e-5 * reference.abs().max()
    # Without the flags the bare checkpoint is refused with the way out named.
    refused = run_tool_here("tools/moefy.py", "--load", bare, "--output", tmp_path / "x",
                            "--dynamoe-importance", "weight")
    assert refused.returncode == 2 and "--num-layers" in refused.stderr.splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_megatron_lm_checkpoint_converts_to_hf_from_its_saved_arguments(plain_checkpoints,
                                                                        tmp_path):
    from transformers import AutoModelForCausalLM

    _, with_args, reference = plain_checkpoints
    out = tmp_path / "hf"
    done = run_tool_here("tools/convert_checkpoint.py", "megatron-to-hf", "--load", with_args,
                         "--output", out)
    assert done.returncode == 0, done.stderr
    assert "saved in common.pt" in done.stderr
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = hf(TOKENS).logits
    assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max()
    # Flags that contradict nothing are still refused together with --model.
    both = run_tool_here("tools/convert_checkpoint.py", "megatron-to-hf", "--load", with_args,
                         "--output", tmp_path / "y", "--model", "tiny-llama", *FLAGS)
    assert both.returncode == 2 and "not both" in both.stderr.splitlines()[-1]
