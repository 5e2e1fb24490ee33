"""The architecture of a plain Megatron checkpoint, from Megatron's own argument names.

A checkpoint written by Megatron-LM carries its training arguments (an `argparse.Namespace`
under `args` in the torch_dist folder's `common.pt`); one written by plain Megatron-Core
carries none, and its user gives the shape with Megatron-LM's architecture flags (`--num-layers
--hidden-size ... --swiglu`). Both are a mapping of Megatron-LM argument names, turned here
into a `ModelArchitecture` (LLaMA-shaped: RMSNorm, SwiGLU, RoPE, no linear biases; or
GPT-2-shaped: LayerNorm, GELU, learned absolute positions, biases), with Megatron-LM's
defaults for what is left out.
"""

from __future__ import annotations

import argparse
import enum
import os
from typing import Any, List, Mapping, Optional

import torch

from megatron_dynamoe.models.architectures import ModelArchitecture

COMMON_STATE_FILE = "common.pt"
# The Megatron-LM argument names the architecture is read from (flag = --name-with-dashes).
ARCHITECTURE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "group_query_attention", "num_query_groups", "seq_length",
                     "max_position_embeddings", "normalization", "swiglu",
                     "position_embedding_type", "rotary_base",
                     "untie_embeddings_and_output_weights", "vocab_size", "padded_vocab_size",
                     "norm_epsilon", "add_bias_linear", "openai_gelu", "use_rope_scaling",
                     "rope_scaling_factor")
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads")


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's FFN width when --ffn-hidden-size is not given: 4 h, or for SwiGLU
    2/3 of that rounded down to a multiple of 64 (megatron/training/arguments.py)."""
    if swiglu:
        return int((4 * hidden_size * 2 / 3) / 64) * 64
    return 4 * hidden_size


def architecture_from_megatron_args(args: Mapping[str, Any], origin: str) -> ModelArchitecture:
    """ModelArchitecture from Megatron-LM argument names (`ARCHITECTURE_ARGS`; missing or None
    values take Megatron-LM's defaults). `origin` names where the values came from in errors.
    Raises ValueError naming the missing argument or the unsupported combination."""
    missing = [name for name in _REQUIRED if args.get(name) is None]
    vocab = args.get("padded_vocab_size") or args.get("vocab_size")
    if vocab is None:
        missing.append("vocab_size")
    max_positions = args.get("max_position_embeddings") or args.get("seq_length")
    if max_positions is None:
        missing.append("max_position_embeddings")
    if missing:
        flags = " ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(f"{origin} lacks {', '.join(missing)}: give {flags}")
    normalization = args.get("normalization") or "LayerNorm"
    swiglu = bool(args.get("swiglu"))
    positions = args.get("position_embedding_type") or "learned_absolute"
    bias = args.get("add_bias_linear")
    if (normalization, swiglu, positions) == ("RMSNorm", True, "rope"):
        family = "llama"
        if bias:
            raise ValueError(f"{origin}: a LLaMA-shaped model (RMSNorm, SwiGLU, RoPE) with "
                             f"linear biases is not supported: it needs --disable-bias-linear")
    elif (normalization, swiglu, positions) == ("LayerNorm", False, "learned_absolute"):
        family = "gpt2"
        if bias is False:
            raise ValueError(f"{origin}: a GPT-2-shaped model (LayerNorm, GELU, learned "
                             f"positions) without linear biases is not supported")
    else:
        raise ValueError(f"{origin}: normalization {normalization}, "
                         f"{'SwiGLU' if swiglu else 'GELU'}, position embeddings {positions} is "
                         f"neither LLaMA-shaped (--normalization RMSNorm --swiglu "
                         f"--position-embedding-type rope) nor GPT-2-shaped (LayerNorm, GELU, "
                         f"learned_absolute)")
    hidden = int(args["hidden_size"])
    ffn = args.get("ffn_hidden_size") or default_ffn_hidden_size(hidden, swiglu)
    groups = args.get("num_query_groups") if args.get("group_query_attention") else None
    extra = {}
    if args.get("use_rope_scaling"):
        extra["rope_scaling_factor"] = float(args.get("rope_scaling_factor") or 8.0)
    if family == "gpt2":
        extra["activation"] = "gelu_tanh" if args.get("openai_gelu") else "gelu"
    return ModelArchitecture(
        family=family, num_layers=int(args["num_layers"]), hidden_size=hidden,
        ffn_hidden_size=int(ffn), num_attention_heads=int(args["num_attention_heads"]),
        vocab_size=int(vocab), max_position_embeddings=int(max_positions),
        num_query_groups=int(groups) if groups else None,
        rotary_base=float(args.get("rotary_base") or 10000.0),
        norm_epsilon=float(args.get("norm_epsilon") or 1e-5),
        tie_embeddings=not args.get("untie_embeddings_and_output_weights"), **extra)


def unpickling_allowlist() -> List[type]:
    """What Megatron-LM's saved arguments hold beyond tensors and plain values: the
    Namespace and Megatron-Core's enums (e.g. AttnBackend). Constructing them runs no code."""
    classes: List[type] = [argparse.Namespace]
    try:
        from megatron.core import enums as core_enums
        from megatron.core.transformer import enums as transformer_enums
    except ImportError:
        return classes
    for module in (core_enums, transformer_enums):
        classes += [value for value in vars(module).values()
                    if isinstance(value, type) and issubclass(value, enum.Enum)
                    and value.__module__ == module.__name__]
    return classes


def read_saved_arguments(directory: str) -> Optional[dict]:
    """Megatron-LM's training arguments saved in `directory/common.pt` as a dict, or None
    when the folder has no common.pt or it holds no `args`. Read with torch's weights_only
    unpickler allowing only the Namespace and Megatron's enums: a common.pt that needs more
    raises ValueError naming the refused object and the flags to use instead."""
    path = os.path.join(directory, COMMON_STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with torch.serialization.safe_globals(unpickling_allowlist()):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal or corruption: one line
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} cannot be read safely ({reason}): give the architecture "
                         f"with --model PRESET or Megatron's flags (--num-layers ...)") from None
    saved = common.get("args") if isinstance(common, dict) else None
    if saved is None:
        return None
    return dict(vars(saved)) if isinstance(saved, argparse.Namespace) else dict(saved)
