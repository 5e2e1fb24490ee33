"""Functional parity of a streamed conversion, one decoder layer at a time.

The streaming converters check that every tensor converts back bit for bit, which proves the
mapping is invertible, not that it is right (a transposed or wrongly interleaved QKV inverts
exactly too). The whole-model logit check proves it, but needs both models in fp32 in host
memory (0.5 TB for a 70B model). `layer_by_layer_parity` checks the function with two
one-layer models instead: a Hugging Face model (transformers' own modelling code) and our
Megatron-Core GPTModel, both at the full hidden size in fp32, with the same random
small-vocabulary embedding and output layer; for every decoder layer i each gets layer i's
weights as stored in its own checkpoint (the HF folder's safetensors, the Megatron folder's
torch_dist chunks) and the stored final norm (and GPT-2's position embeddings), and their
logits on the same tokens must agree. Peak memory: two fp32 layers and one stored layer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Optional

import torch

from megatron_dynamoe.checkpoint.hf import _rules, hf_config_from_architecture
from megatron_dynamoe.models.architectures import ModelArchitecture

_LAYER = re.compile(r"^decoder\.layers\.0\.")
_PROXY_VOCAB = 64  # the one-layer models' vocabulary: random rows, not the model's


def _at_layer(name: str, layer: int) -> str:
    """A proxy (layer 0) tensor name of either format at `layer` (its first `.0.`)."""
    return name.replace(".0.", f".{layer}.", 1)


def _set(module: torch.nn.Module, values: Dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    unknown = sorted(values.keys() - params.keys())
    unset = sorted(params.keys() - values.keys())
    if unknown or unset:
        raise ValueError(f"layer parity: parameters {unknown} unknown, {unset} not set")
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value.to(params[name].dtype))


@torch.no_grad()
def layer_by_layer_parity(hf_folder: str, megatron_dir: str, metadata, arch: ModelArchitecture,
                          tolerance: float, *, seq_length: int = 16, seed: int = 0,
                          on_layer: Optional[Callable[[int, int, float], None]] = None
                          ) -> float:
    """Max over decoder layers of the relative logit error (`utils.parity`) between the
    one-layer HF and Megatron models described in the module docstring.

    Args:
        hf_folder: Hugging Face safetensors folder; megatron_dir / metadata: the torch_dist
            folder and its DCP metadata; arch: the architecture both hold.
        tolerance: max |logit diff| / max |logit| allowed at any layer.
        on_layer: told (layer + 1, layers, error) after each layer.
    Raises:
        ParityError naming the first layer whose error exceeds `tolerance`.
    """
    from transformers import AutoModelForCausalLM

    from megatron_dynamoe.checkpoint.hf_streaming import (
        _HFTensors,
        read_tensor_slice,
        sharded_keys,
    )
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model
    from megatron_dynamoe.utils.parity import ParityError, megatron_logits, relative_logit_error

    proxy = dataclasses.replace(arch, num_layers=1, vocab_size=_PROXY_VOCAB)
    read_hf = _HFTensors(hf_folder)
    key_of = sharded_keys(arch)

    def read_megatron(name: str) -> torch.Tensor:
        return read_tensor_slice(megatron_dir, metadata, *key_of(name))

    mcore_model = build_gpt_model(proxy, transformer_config(proxy, perform_initialization=False))
    hf_model = AutoModelForCausalLM.from_config(hf_config_from_architecture(proxy),
                                                dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    hf_shared: Dict[str, torch.Tensor] = {}
    mcore_shared: Dict[str, torch.Tensor] = {}
    layer_rules = []
    for rule in _rules(proxy):
        if _LAYER.match(rule.mcore):
            layer_rules.append(rule)
        elif rule.mcore_shape[0] == _PROXY_VOCAB:
            # Embedding / output layer: the same random rows on both sides.
            parts = tuple(torch.randn(shape, generator=generator) * 0.02
                          for shape in rule.hf_shapes)
            hf_shared.update(zip(rule.hf, parts))
            mcore_shared[rule.mcore] = rule.to_mcore(*parts)
        else:
            # Final norm (GPT-2: position embeddings too): each side's stored tensor.
            hf_shared.update((name, read_hf(name)) for name in rule.hf)
            mcore_shared[rule.mcore] = read_megatron(rule.mcore)
    tokens = torch.randint(0, _PROXY_VOCAB, (2, seq_length), generator=generator)
    worst = 0.0
    for layer in range(arch.num_layers):
        hf_values, mcore_values = dict(hf_shared), dict(mcore_shared)
        for rule in layer_rules:
            hf_values.update((name, read_hf(_at_layer(name, layer))) for name in rule.hf)
            mcore_values[rule.mcore] = read_megatron(_at_layer(rule.mcore, layer))
        _set(hf_model, hf_values)
        _set(mcore_model, mcore_values)
        del hf_values, mcore_values
        reference = hf_model(tokens).logits
        error = relative_logit_error(reference, megatron_logits(mcore_model, tokens))
        if on_layer is not None:
            on_layer(layer + 1, arch.num_layers, error)
        if not error <= tolerance:
            raise ParityError(f"decoder layer {layer}: the Megatron checkpoint's layer computes "
                              f"another function than the Hugging Face one (relative logit "
                              f"error {error:.2e} > {tolerance:.0e})")
        worst = max(worst, error)
    return worst
