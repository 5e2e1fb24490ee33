"""Hugging Face safetensors <-> Megatron torch_dist, one layer in host memory at a time.

The whole-model conversions hold the Megatron model and the HF model: two copies of a 70B
model. Here no model is built, and the source dtype is kept (bf16 stays bf16):

- Megatron -> HF (`stream_megatron_to_hf`): each layer's stored chunks are read from their
  byte ranges of the .distcp files, as DCP's `.metadata` locates them (Megatron's loader
  insists on whole tensors), converted to the HF names and written as one safetensors shard;
- HF -> Megatron (`stream_hf_to_megatron`): torch.distributed.checkpoint's file writer asks
  for one chunk at a time, and each Megatron tensor of one layer is made from its safetensors
  tensors only then (`_LazyStack`; Megatron's own writer resolves every tensor first). The
  result is a plain Megatron-Core torch_dist folder: the same keys, one chunk per layer,
  the per-layer `_extra_state` objects, `metadata.json` and `common.pt`.

Every converted tensor is checked on the way: converting it back must give its source bit for
bit (`_Rule.to_mcore` and `_Rule.to_hf` are exact inverses).
"""

from __future__ import annotations

import functools
import io
import json
import math
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
    if layer is not None:
        size = size[1:]
    out = None
    covered = 0
    for chunk in meta.chunks:
        offsets, sizes = list(chunk.offsets), list(chunk.sizes)
        if layer is not None:
            if not offsets[0] <= layer < offsets[0] + sizes[0]:
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
    needed = math.prod(size)
    if covered != needed:
        raise ValueError(f"{key!r}: the stored chunks cover {covered} of {needed} values "
                         f"of {'layer ' + str(layer) if layer is not None else 'the tensor'}")
    return out


@functools.lru_cache(maxsize=4)
def _proxy_sharded_state_dict(arch: ModelArchitecture) -> dict:
    """The sharded state dict of a one-layer model of `arch`'s family with tiny sizes (built
    in milliseconds, once per architecture): Megatron-Core's keys and per-layer objects."""
    import dataclasses

    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model

    proxy = dataclasses.replace(arch, num_layers=1, hidden_size=4 * arch.num_attention_heads,
                                ffn_hidden_size=8, vocab_size=8, max_position_embeddings=8)
    model = build_gpt_model(proxy, transformer_config(proxy, perform_initialization=False))
    return model.sharded_state_dict()


def sharded_keys(arch: ModelArchitecture) -> Callable[[str], Tuple[str, Optional[int]]]:
    """name -> (sharded key, layer or None) for the local GPTModel parameter names of `arch`.
    Megatron-Core stores every transformer layer's tensor of one kind stacked along a leading
    layer axis, under a key of its own (the local spec renames the norms to the keys Transformer
    Engine's fused layers use, e.g. "decoder.layers.3.input_layernorm.weight" is layer 3 of
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight"). The map is read off a
    one-layer proxy model (`_proxy_sharded_state_dict`)."""
    keys = {name: sh.key for name, sh in _proxy_sharded_state_dict(arch).items()
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


# ------------------------------------------------------------------ Hugging Face -> Megatron

class _HFTensors:
    """Tensors of a Hugging Face safetensors folder read one at a time (each read opens its
    file anew, so that no memory map keeps the pages of tensors already written)."""

    def __init__(self, folder: str):
        index = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                files = json.load(f)["weight_map"]
        else:
            from safetensors import safe_open

            single = os.path.join(folder, "model.safetensors")
            if not os.path.isfile(single):
                raise FileNotFoundError(f"{folder} has neither {INDEX_FILE} nor "
                                        f"model.safetensors: streaming reads safetensors only")
            with safe_open(single, framework="pt") as f:
                files = {name: "model.safetensors" for name in f.keys()}
        self.folder, self.files = folder, files

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of `name`, read from its file's header only."""
        from safetensors import safe_open

        stored = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        with safe_open(os.path.join(self.folder, self.files[name]), framework="pt") as f:
            code = f.get_slice(name).get_dtype()
        if code not in stored:
            raise ValueError(f"{name} is stored as {code}: give fp32, bf16 or fp16 weights")
        return stored[code]

    def __call__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise ValueError(f"{self.folder} has no tensor {name!r}")
        with safe_open(os.path.join(self.folder, self.files[name]), framework="pt") as f:
            return f.get_tensor(name).clone()


class _LazyStack:
    """One Megatron checkpoint tensor written chunk by chunk: [layers, *shape] (one chunk per
    layer, as Megatron stores a layer-stacked tensor) or [*shape] (`layers` None), each chunk
    made by `make(layer)` only when the checkpoint writer asks for it. Implements the hooks
    torch.distributed.checkpoint's planner calls (`__create_write_items__`)."""

    def __init__(self, shape, dtype, layers: Optional[int], make):
        self.shape, self.dtype, self.layers, self.make = tuple(shape), dtype, layers, make

    def __create_write_items__(self, fqn: str, _obj):
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
        )
        from torch.distributed.checkpoint.planner import (
            TensorWriteData,
            WriteItem,
            WriteItemType,
        )

        zeros = [0] * len(self.shape)
        if self.layers is None:
            chunks = [(zeros, list(self.shape))]
            size = self.shape
        else:
            chunks = [([layer, *zeros], [1, *self.shape]) for layer in range(self.layers)]
            size = (self.layers, *self.shape)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)),
                          type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                         sizes=torch.Size(sizes)),
                              properties=TensorProperties(dtype=self.dtype),
                              size=torch.Size(size)))
                for offsets, sizes in chunks]

    def chunk(self, offset) -> torch.Tensor:
        if self.layers is None:
            return self.make(None)
        return self.make(int(offset[0])).unsqueeze(0)


def _file_writer(path: str):
    """torch's FileSystemWriter (one item resolved and written at a time), recording its path
    as a string as Megatron's writer does (the checkpoint's safe unpickler admits no
    pathlib objects)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def storage_meta(self):
            meta = super().storage_meta()
            if meta is not None:
                meta.checkpoint_id = str(meta.checkpoint_id)
            return meta

    return Writer(path, thread_count=1, single_file_per_rank=True)


def _lazy_planner():
    """torch's DefaultSavePlanner that makes a `_LazyStack` chunk when it is written."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class LazySavePlanner(DefaultSavePlanner):
        def lookup_object(self, index):
            obj = self.state_dict[index.fqn]
            if isinstance(obj, _LazyStack):
                return obj.chunk(index.offset)
            return super().lookup_object(index)

    return LazySavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def _proxy_objects(arch: ModelArchitecture) -> List[Tuple[str, object]]:
    """(key, data) of the per-layer objects (`_extra_state`) Megatron-Core saves for one
    transformer layer of `arch`'s family, read off the one-layer proxy model
    (`_proxy_sharded_state_dict`)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return [(sh.key, sh.data) for sh in _proxy_sharded_state_dict(arch).values()
            if isinstance(sh, ShardedObject)]


def stream_hf_to_megatron(hf_folder: str, arch: ModelArchitecture, output: str,
                          on_layer: Optional[Callable[[int, int], None]] = None
                          ) -> torch.dtype:
    """Write a Megatron torch_dist checkpoint of `arch` into `output` (an existing empty
    folder; model.json and checksums are the caller's) from the safetensors of the Hugging
    Face folder `hf_folder`, one tensor of one layer at a time: every Megatron tensor is made
    from its HF tensors only when torch.distributed.checkpoint's file writer (one item at a
    time) asks for it, then dropped. Each is checked to convert back to its HF tensors bit
    for bit. The source dtype is kept. Returns it. Raises ValueError naming a missing tensor
    or one of another shape than `arch` implies."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import save as dcp_save

    read = _HFTensors(hf_folder)
    rules = {rule.mcore: rule for rule in _rules(arch)}
    key_of = sharded_keys(arch)
    dtype = read.dtype(_HF_EMBEDDING[arch.family])
    done: Dict[int, int] = {}

    def make(rule):
        def build(_layer):
            parts = tuple(read(name) for name in rule.hf)
            for name, part, shape in zip(rule.hf, parts, rule.hf_shapes):
                if tuple(part.shape) != tuple(shape):
                    raise ValueError(f"{name} is {list(part.shape)} in {hf_folder}, the "
                                     f"architecture implies {list(shape)}")
            tensor = rule.to_mcore(*parts)
            back = rule.to_hf(tensor)
            if any(b.dtype != p.dtype or not torch.equal(b, p) for b, p in zip(back, parts)):
                raise ValueError(f"converting {', '.join(rule.hf)} to {rule.mcore} does not "
                                 f"invert exactly: a conversion bug, please report it")
            return tensor.contiguous()
        return build

    state: Dict[str, object] = {}
    stacks: Dict[str, Dict[int, object]] = {}
    shapes: Dict[str, tuple] = {}
    for name, rule in rules.items():
        key, layer = key_of(name)
        if layer is None:
            state[key] = _LazyStack(rule.mcore_shape, dtype, None, make(rule))
        else:
            stacks.setdefault(key, {})[layer] = make(rule)
            shapes[key] = rule.mcore_shape
    for key, builders in stacks.items():
        if sorted(builders) != list(range(arch.num_layers)):
            raise ValueError(f"{key}: layers {sorted(builders)} of {arch.num_layers}")

        def by_layer(layer, builders=builders):
            tensor = builders[layer](layer)
            done[layer] = done.get(layer, 0) + 1
            if on_layer is not None and done[layer] == len(stacks):
                on_layer(layer + 1, arch.num_layers)
            return tensor
        state[key] = _LazyStack(shapes[key], dtype, arch.num_layers, by_layer)
    for key, data in _proxy_objects(arch):
        for layer in range(arch.num_layers):
            # The planner torch.saves it into the byte item, as Megatron stores a
            # ShardedObject: the list of the objects under that key.
            state[f"{key}/shard_{layer}_{arch.num_layers}"] = [data]
    dcp_save(state, storage_writer=_file_writer(output), planner=_lazy_planner(),
             no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), output)
    torch.save({}, os.path.join(output, "common.pt"))
    return dtype
