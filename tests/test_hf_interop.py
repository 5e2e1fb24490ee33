"""Hugging Face <-> Megatron weights: logit parity on the real SmolLM2 and on tiny random
LLaMA (GQA, untied) / GPT-2 models, exact round trips, save_pretrained reload, bad input."""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import (AutoModelForCausalLM, BertConfig, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

from megatron_dynamoe.models.architectures import PRESETS, transformer_config
from megatron_dynamoe.checkpoint.hf import (
    architecture_from_hf_config,
    find_smollm2_gguf,
    hf_config_from_architecture,
    hf_to_megatron_state_dict,
    load_hf_model,
    megatron_to_hf_state_dict,
)
from megatron_dynamoe.data.corpora import sotu_texts
from megatron_dynamoe.models.builder import build_gpt_model, causal_attention_mask

pytestmark = pytest.mark.usefixtures("single_rank")

RELATIVE_TOLERANCE = 1e-4  # max |logit diff| <= this x max |logit| (fp32)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# activation_function="gelu_new": the tanh-approximated GELU of the released GPT-2 checkpoints.
TINY_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128,
                 activation_function="gelu_new", bos_token_id=255, eos_token_id=255)


# --------------------------------------------------------------------------- helpers

def _jitter(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter, so that norms and biases are not their trivial init (1 / 0)
    and a swapped or misplaced tensor changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _tiny_hf(config, seed: int = 0):
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if config.model_type == "llama" else GPT2LMHeadModel)(config)
    _jitter(model, seed + 1)
    return model.eval()


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _without_extra_state(state):
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


def _megatron_model(arch, state=None, seed: int = 0):
    """Our GPTModel of `arch`; loads `state` strictly (the model's own `_extra_state` entries,
    which carry no weights, are added since conversion leaves them out)."""
    torch.manual_seed(seed)
    model = build_gpt_model(arch, transformer_config(arch))
    if state is not None:
        extra = {k: v for k, v in model.state_dict().items() if k.endswith("._extra_state")}
        model.load_state_dict({**extra, **state}, strict=True)
    return model.eval()


def _megatron_logits(model, tokens):
    batch, seq = tokens.shape
    positions = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        return model(tokens, positions, causal_attention_mask(seq))


def _assert_logits_match(ours, reference, what):
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    print(f"{what}: max |logit diff| {diff:.3e}, max |logit| {scale:.3e}, "
          f"ratio {diff / scale:.3e}")
    assert diff <= RELATIVE_TOLERANCE * scale, f"{what}: {diff} > {RELATIVE_TOLERANCE} x {scale}"


def _assert_same_tensors(got, expected):
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def _random_tokens(vocab_size, batch=2, seq=32, seed=0):
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- SmolLM2 (real)

@pytest.fixture(scope="module")
def smollm2():
    """The shipped SmolLM2-135M-Instruct GGUF in fp32, two 64-token sequences of real State of
    the Union text and the HF logits on them; loaded once (~40 s, mostly GGUF parsing)."""
    folder, gguf = find_smollm2_gguf()
    model, tokenizer = load_hf_model(folder, gguf, dtype=torch.float32)
    ids = tokenizer(sotu_texts(limit=1)[0], add_special_tokens=False)["input_ids"]
    assert len(ids) >= 128
    tokens = torch.tensor(ids[:128]).view(2, 64)
    return SimpleNamespace(model=model, arch=architecture_from_hf_config(model.config),
                           tokens=tokens, logits=_hf_logits(model, tokens))


def test_smollm2_architecture_is_the_preset(smollm2):
    assert smollm2.model.config.model_type == "llama"
    assert smollm2.arch == PRESETS["smollm2-135m"]


def test_smollm2_megatron_logits_match_hf(smollm2):
    model = _megatron_model(smollm2.arch,
                            hf_to_megatron_state_dict(smollm2.model.state_dict(), smollm2.arch))
    _assert_logits_match(_megatron_logits(model, smollm2.tokens), smollm2.logits, "smollm2")


def test_smollm2_round_trip_and_save_pretrained(smollm2, tmp_path):
    hf_state = smollm2.model.state_dict()
    back = megatron_to_hf_state_dict(hf_to_megatron_state_dict(hf_state, smollm2.arch),
                                     smollm2.arch)
    _assert_same_tensors(back, hf_state)

    config = hf_config_from_architecture(smollm2.arch)
    with torch.device("meta"):  # no random init of 135M weights that are replaced anyway
        exported = AutoModelForCausalLM.from_config(config)
    exported.load_state_dict(back, strict=True, assign=True)
    exported.tie_weights()
    exported.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert architecture_from_hf_config(reloaded.config) == smollm2.arch
    _assert_logits_match(_hf_logits(reloaded, smollm2.tokens), smollm2.logits,
                         "smollm2 save_pretrained reload")


# --------------------------------------------------------------------------- tiny models

def test_tiny_llama_gqa_untied_hf_to_megatron_parity():
    hf_model = _tiny_hf(LlamaConfig(**TINY_LLAMA))
    arch = architecture_from_hf_config(hf_model.config)
    assert arch == PRESETS["tiny-llama"]  # GQA (2 groups of 2 heads), untied output layer
    hf_state = hf_model.state_dict()
    state = hf_to_megatron_state_dict(hf_state, arch)
    assert "output_layer.weight" in state
    tokens = _random_tokens(arch.vocab_size)
    _assert_logits_match(_megatron_logits(_megatron_model(arch, state), tokens),
                         _hf_logits(hf_model, tokens), "tiny llama")
    _assert_same_tensors(megatron_to_hf_state_dict(state, arch), hf_state)


def test_tiny_gpt2_hf_to_megatron_parity():
    hf_model = _tiny_hf(GPT2Config(**TINY_GPT2))
    arch = architecture_from_hf_config(hf_model.config)
    assert arch == PRESETS["tiny-gpt2"]
    hf_state = hf_model.state_dict()
    state = hf_to_megatron_state_dict(hf_state, arch)
    assert "output_layer.weight" not in state  # tied: Megatron reuses the embeddings
    tokens = _random_tokens(arch.vocab_size)
    _assert_logits_match(_megatron_logits(_megatron_model(arch, state), tokens),
                         _hf_logits(hf_model, tokens), "tiny gpt2")
    _assert_same_tensors(megatron_to_hf_state_dict(state, arch), hf_state)


def test_llama3_rope_scaling_hf_to_megatron_parity():
    """Llama-3.1's RoPE scaling (rope_type 'llama3') maps to Megatron-Core's rope_scaling:
    same logits both ways, and they differ from the unscaled model's (the scaling matters at
    this head size: some wavelengths exceed 8192 / 4)."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hf_model = _tiny_hf(LlamaConfig(**{**TINY_LLAMA, "rope_parameters": rope}))
    arch = architecture_from_hf_config(hf_model.config)
    assert arch.rope_scaling_factor == 8.0
    assert architecture_from_hf_config(hf_config_from_architecture(arch)) == arch
    state = hf_to_megatron_state_dict(hf_model.state_dict(), arch)
    tokens = _random_tokens(arch.vocab_size, seq=96)
    ours = _megatron_logits(_megatron_model(arch, state), tokens)
    _assert_logits_match(ours, _hf_logits(hf_model, tokens), "llama3 rope scaling")
    unscaled = _megatron_logits(_megatron_model(PRESETS["tiny-llama"], state), tokens)
    assert (unscaled - ours).abs().max() > 1e-3 * ours.abs().max()
    other = {**rope, "high_freq_factor": 2.0}
    with pytest.raises(ValueError, match="llama3 RoPE scaling"):
        architecture_from_hf_config(LlamaConfig(**{**TINY_LLAMA, "rope_parameters": other}))


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_megatron_to_hf_parity_and_exact_round_trip(preset):
    arch = PRESETS[preset]
    ours = _megatron_model(arch, seed=3)
    _jitter(ours, seed=4)
    state = _without_extra_state(ours.state_dict())
    hf_state = megatron_to_hf_state_dict(state, arch)
    _assert_same_tensors(hf_to_megatron_state_dict(hf_state, arch), state)

    hf_model = AutoModelForCausalLM.from_config(hf_config_from_architecture(arch)).eval()
    hf_model.load_state_dict(hf_state, strict=True)
    tokens = _random_tokens(arch.vocab_size, seed=5)
    _assert_logits_match(_hf_logits(hf_model, tokens), _megatron_logits(ours, tokens),
                         f"{preset} megatron -> hf")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_hf_config_round_trips_every_preset(preset):
    arch = PRESETS[preset]
    assert architecture_from_hf_config(hf_config_from_architecture(arch)) == arch


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def tiny_llama_state():
    return _tiny_hf(LlamaConfig(**TINY_LLAMA)).state_dict()


def test_wrong_shape_names_the_tensor(tiny_llama_state):
    state = dict(tiny_llama_state)
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has "
                                         r"shape \[48, 64\].*implies \[32, 64\]"):
        hf_to_megatron_state_dict(state, PRESETS["tiny-llama"])


def test_architecture_mismatch_is_a_shape_error(tiny_llama_state):
    mha = dataclasses.replace(PRESETS["tiny-llama"], num_query_groups=4)
    with pytest.raises(ValueError, match=r"k_proj\.weight' has shape \[32, 64\].*\[64, 64\]"):
        hf_to_megatron_state_dict(tiny_llama_state, mha)
    state = hf_to_megatron_state_dict(tiny_llama_state, PRESETS["tiny-llama"])
    with pytest.raises(ValueError, match=r"'decoder\.layers\.0\.self_attention\.linear_qkv"):
        megatron_to_hf_state_dict(state, mha)


def test_missing_and_unexpected_keys_are_listed(tiny_llama_state):
    state = dict(tiny_llama_state)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing keys \[model\.layers\.1\.mlp\.up_proj\.weight]"):
        hf_to_megatron_state_dict(state, PRESETS["tiny-llama"])
    deeper = dataclasses.replace(PRESETS["tiny-llama"], num_layers=3)
    with pytest.raises(ValueError, match=r"missing keys \[model\.layers\.2\..* and 4 more"):
        hf_to_megatron_state_dict(tiny_llama_state, deeper)
    mcore = hf_to_megatron_state_dict(tiny_llama_state, PRESETS["tiny-llama"])
    mcore["decoder.layers.5.mlp.linear_fc1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \[decoder\.layers\.5\.mlp"):
        megatron_to_hf_state_dict(mcore, PRESETS["tiny-llama"])


def test_tied_lm_head_must_equal_the_embeddings():
    state = dict(_tiny_hf(GPT2Config(**TINY_GPT2)).state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf_to_megatron_state_dict(state, PRESETS["tiny-gpt2"])


def test_unsupported_model_type():
    with pytest.raises(ValueError, match=r"model_type 'bert'.*'llama'.*'gpt2'"):
        architecture_from_hf_config(BertConfig())


@pytest.mark.parametrize("override, message", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
     "RoPE scaling 'linear'"),
])
def test_unrepresentable_llama_configs_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        architecture_from_hf_config(LlamaConfig(**{**TINY_LLAMA, **override}))


def test_gpt2_activations():
    assert architecture_from_hf_config(GPT2Config(**TINY_GPT2)) == PRESETS["tiny-gpt2"]
    exact = architecture_from_hf_config(GPT2Config(**{**TINY_GPT2, "activation_function": "gelu"}))
    assert exact == dataclasses.replace(PRESETS["tiny-gpt2"], activation="gelu")
    assert hf_config_from_architecture(exact).activation_function == "gelu"
    assert hf_config_from_architecture(PRESETS["gpt2"]).activation_function == "gelu_new"
    with pytest.raises(ValueError, match="activation_function='relu'"):
        architecture_from_hf_config(GPT2Config(**{**TINY_GPT2, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="grouped-query"):
        hf_config_from_architecture(dataclasses.replace(PRESETS["tiny-gpt2"],
                                                        num_query_groups=2))


# --------------------------------------------------------------------------- shipped data

def test_shipped_files_and_missing_paths(tmp_path):
    folder, name = find_smollm2_gguf()
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.isfile(os.path.join(folder, name))
    texts = sotu_texts(limit=3)
    assert len(texts) == 3 and all(len(t) > 1000 for t in texts)
    assert texts[0].startswith("Fellow-Citizens of the Senate and House")  # 1790, Washington
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_model(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_hf_model(str(tmp_path), "absent.gguf")
