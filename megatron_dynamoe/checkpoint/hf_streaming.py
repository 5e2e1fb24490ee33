"""Megatron torch_dist -> Hugging Face safetensors, one layer in host memory at a time.

The whole-model path (`hf.save_hf_pretrained`) holds the Megatron model and the HF model: two
copies of a 70B model. Here no model is built: each transformer layer's tensors are read from
the checkpoint on their own
(each stored chunk of that layer read from its byte range of the .distcp files, as DCP's
`.metadata` locates it; Megatron's loader insists on whole tensors), converted to
the HF names and written as one safetensors shard, then freed. Peak host memory is about one
layer plus a fixed overhead; the dtype of the checkpoint is kept (bf16 stays bf16).

Every converted tensor is checked on the way: converting it back must give the checkpoint's
tensor bit for bit (`_Rule.to_mcore(*to_hf(t)) == t`).
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_dynamoe.checkpoint.hf import (
    _HF_EMBEDDING,
    _rules,
    hf_config_from_architecture,
)
from megatron_dynamoe.models.architectures import ModelArchitecture

INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _groups(names: List[str]) -> List[List[str]]:
    """Local parameter names grouped by transformer layer (in order), then the rest
    (embeddings, final norm, output layer) as the last group."""
    layers: Dict[int, List[str]] = {}
    rest: List[str] = []
    for name in names:
        match = _LAYER.match(name)
        (layers.setdefault(int(match.group(1)), []) if match else rest).append(name)
    return [layers[i] for i in sorted(layers)] + ([rest] if rest else [])


def read_tensor_slice(directory: str, metadata, key: str,
                      layer: Optional[int]) -> torch.Tensor:
    """The tensor stored under `key` in the torch_dist checkpoint `directory` (its DCP
    `metadata`), assembled from its chunks; with `layer`, only that index of the leading
    (stacked layers) axis, reading only the chunks of that layer. Each chunk is read from its
    byte range and loaded with torch's weights_only unpickler. Raises ValueError when the
    chunks do not cover what was asked or a chunk spans several layers."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    from megatron_dynamoe.checkpoint.integrity import _decode_transforms

    meta = metadata.state_dict_metadata.get(key)
    if not isinstance(meta, TensorStorageMetadata):
        raise ValueError(f"{directory} has no tensor {key!r}")
    size = list(meta.size)
    lead = 0
    if layer is not None:
        size, lead = size[1:], layer
    out = None
    covered = 0
    for chunk in meta.chunks:
        offsets, sizes = list(chunk.offsets), list(chunk.sizes)
        if layer is not None:
            if not offsets[0] <= lead < offsets[0] + sizes[0]:
                continue
            if sizes[0] != 1:
                raise ValueError(f"{key!r}: a stored chunk spans layers {offsets[0]}.."
                                 f"{offsets[0] + sizes[0] - 1}; give the checkpoint as saved "
                                 f"by Megatron (one chunk per layer)")
            offsets, sizes = offsets[1:], sizes[1:]
        info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        with open(os.path.join(directory, info.relative_path), "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        raw = _decode_transforms(raw, tuple(getattr(info, "transform_descriptors", None)
                                            or ()), f"{key!r} in {directory}")
        part = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        del raw
        part = part.reshape(sizes)
        if sizes == size:
            out = part  # one chunk holds it all (TP = 1): no second buffer
        else:
            if out is None:
                out = torch.empty(size, dtype=meta.properties.dtype)
            out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] = part
        covered += part.numel()
    needed = 1
    for n in size:
        needed *= n
    if covered != needed:
        raise ValueError(f"{key!r}: the stored chunks cover {covered} of {needed} values "
                         f"of {'layer ' + str(layer) if layer is not None else 'the tensor'}")
    return out


def sharded_keys(arch: ModelArchitecture) -> Callable[[str], Tuple[str, Optional[int]]]:
    """name -> (sharded key, layer or None) for the local GPTModel parameter names of `arch`.
    Megatron-Core stores every transformer layer's tensor of one kind stacked along a leading
    layer axis, under a key of its own (the local spec renames the norms to the keys Transformer
    Engine's fused layers use, e.g. "decoder.layers.3.input_layernorm.weight" is layer 3 of
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight"). The map is read off a
    one-layer model of the same family with tiny sizes (built in milliseconds)."""
    import dataclasses

    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model

    proxy = dataclasses.replace(arch, num_layers=1, hidden_size=4 * arch.num_attention_heads,
                                ffn_hidden_size=8, vocab_size=8, max_position_embeddings=8)
    model = build_gpt_model(proxy, transformer_config(proxy, perform_initialization=False))
    keys = {name: sh.key for name, sh in model.sharded_state_dict().items()
            if not name.endswith("._extra_state")}

    def key_of(name: str) -> Tuple[str, Optional[int]]:
        match = _LAYER.match(name)
        if match is None:
            return keys[name], None
        return keys["decoder.layers.0." + name[match.end():]], int(match.group(1))

    return key_of


def stream_megatron_to_hf(directory: str, metadata, arch: ModelArchitecture, output: str,
                          on_shard: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write `output` (an existing empty folder) as a Hugging Face safetensors folder
    (config.json, one shard per layer group, model.safetensors.index.json) from the dense
    torch_dist checkpoint `directory` (its DCP `metadata`) of architecture `arch`. No model is
    built. Returns the index's weight map. Raises ValueError naming a tensor that is missing
    or has another shape than `arch` implies, or one that does not convert back exactly (a
    conversion bug, never a property of the weights)."""
    from safetensors.torch import save_file

    rules = {rule.mcore: rule for rule in _rules(arch)}
    key_of = sharded_keys(arch)
    groups = _groups(sorted(rules))
    weight_map: Dict[str, str] = {}
    total, dtype = 0, None
    for index, names in enumerate(groups):
        shard: Dict[str, torch.Tensor] = {}
        for name in names:
            rule = rules[name]
            tensor = read_tensor_slice(directory, metadata, *key_of(name))
            if tuple(tensor.shape) != tuple(rule.mcore_shape):
                raise ValueError(f"{name} is {list(tensor.shape)} in {directory}, the "
                                 f"architecture implies {list(rule.mcore_shape)}")
            dtype = dtype or tensor.dtype
            parts = rule.to_hf(tensor)
            back = rule.to_mcore(*parts)
            if back.dtype != tensor.dtype or not torch.equal(back, tensor):
                raise ValueError(f"converting {name} to {', '.join(rule.hf)} does not "
                                 f"invert exactly: a conversion bug, please report it")
            for hf_name, part in zip(rule.hf, parts):
                # Views (split rows of a fused tensor) share storage, which safetensors
                # refuses; a whole tensor is written as it is.
                shard[hf_name] = (part.contiguous() if part._base is None
                                  else part.clone(memory_format=torch.contiguous_format))
            del tensor, parts, back
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(shard, os.path.join(output, file), metadata={"format": "pt"})
        for hf_name, part in shard.items():
            weight_map[hf_name] = file
            total += part.numel() * part.element_size()
        del shard
        if on_shard is not None:
            on_shard(index + 1, len(groups))
    if _HF_EMBEDDING[arch.family] not in weight_map:
        raise ValueError("the embeddings were not written")
    config = hf_config_from_architecture(arch)
    config.torch_dtype = str(dtype).replace("torch.", "")
    config.save_pretrained(output)
    with open(os.path.join(output, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map
