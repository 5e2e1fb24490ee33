"""MoEfication of a dense GPTModel: calibration importance and the dense -> DynaMoE weights.

- `calibrate_importance` runs a dense model on calibration tokens and ranks each FFN's
  neurons by E|act_n| x ||fc2[:, n]|| (works at any TP size: each rank ranks its own neuron
  slice and the slices are all-gathered in neuron order).
- `moefy_state_dict` maps a dense model's full (TP=1, PP=1) state dict to the state dict of
  the DynaMoE model built from the same architecture at EP=1: each MoEfied layer's FFN is
  permuted by importance and cut into shells; routers are zero-initialised; every other
  tensor is copied unchanged.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.shells import (
    activation_importance,
    importance_order,
    permute_ffn,
    split_into_shells,
    weight_importance,
)

_MLP_KEY = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.(linear_fc1|linear_fc2)\.weight$")


def _local_layers(model) -> Dict[int, torch.nn.Module]:
    """Global 0-based layer index -> TransformerLayer, for this pipeline stage."""
    layers = model.decoder.layers
    return {layer.layer_number - 1: layer for layer in layers}


@torch.no_grad()
def calibrate_importance(model, batches: Iterable[dict], gated: bool,
                         activation: Callable[[torch.Tensor], torch.Tensor]
                         ) -> Dict[int, torch.Tensor]:
    """Activation importance of every FFN neuron of a dense GPTModel on calibration data.

    Args:
        model: dense GPTModel (this rank's stage; any TP size).
        batches: dicts with `tokens` [b, s], `position_ids` [b, s], `attention_mask`.
        gated: SwiGLU-style FFN; activation: the FFN activation (config.activation_func).
    Returns:
        {global layer index: [F] float64 importance} for the layers on this stage.
    """
    layers = _local_layers(model)
    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, int] = {}
    hooks = []

    def make_hook(index):
        def hook(module, inputs, output):
            pre = output[0] if isinstance(output, tuple) else output
            pre = pre.reshape(-1, pre.shape[-1]).double()
            if gated:
                gate, up = pre.chunk(2, dim=-1)
                act = activation(gate) * up
            else:
                act = activation(pre)
            sums[index] = sums.get(index, 0) + act.abs().sum(dim=0)
            counts[index] = counts.get(index, 0) + act.shape[0]
        return hook

    for index, layer in layers.items():
        hooks.append(layer.mlp.linear_fc1.register_forward_hook(make_hook(index)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not counts:
        raise ValueError("calibration produced no tokens: give at least one batch")

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    importance = {}
    for index, layer in layers.items():
        mean_abs = sums[index] / counts[index]
        fc2 = layer.mlp.linear_fc2.weight.detach()
        local = activation_importance(mean_abs, fc2)
        if tp_size > 1:
            # Rank r holds neurons [r F/TP, (r+1) F/TP): gathering in rank order gives [F].
            parts = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(parts, local.contiguous(), group=tp_group)
            local = torch.cat(parts)
        importance[index] = local
    return importance


def split_ffn_weights(dense_state: Dict[str, torch.Tensor], is_moe: Callable[[int], bool]
                      ) -> Tuple[Dict[str, torch.Tensor], Dict[int, Tuple[torch.Tensor,
                                                                        torch.Tensor]]]:
    """Separate the dense FFN weights of the layers `is_moe(i)` selects from the rest.

    Returns (rest, ffn): `rest` holds every other tensor of `dense_state` (shared storage,
    `_extra_state` dropped); `ffn[i]` is layer i's (fc1 [F or 2F, H], fc2 [H, F]), in layer
    order. Raises when a selected layer lacks one of the two.
    """
    rest: Dict[str, torch.Tensor] = {}
    found: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in dense_state.items():
        if key.endswith("._extra_state"):
            continue
        match = _MLP_KEY.match(key)
        if match and is_moe(int(match.group(1))):
            found.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            rest[key] = value
    ffn = {}
    for index, weights in sorted(found.items()):
        if set(weights) != {"linear_fc1", "linear_fc2"}:
            raise ValueError(f"layer {index}: dense FFN weights incomplete ({sorted(weights)})")
        ffn[index] = (weights["linear_fc1"], weights["linear_fc2"])
    return rest, ffn


def moefy_state_dict(dense_state: Dict[str, torch.Tensor], dynamoe: DynaMoEConfig,
                     gated: bool, importance: Optional[Dict[int, torch.Tensor]] = None
                     ) -> Dict[str, torch.Tensor]:
    """Dense GPTModel state dict (TP=1, PP=1) -> DynaMoE GPTModel state dict (EP=1, TP=1).

    Args:
        dense_state: `model.state_dict()` of the dense model.
        dynamoe: the DynaMoE config (which layers, how many shells, levels).
        gated: SwiGLU FFN (fc1 = [gate; up]).
        importance: {layer index: [F]} from `calibrate_importance`; layers without an entry
            use the data-free weight-norm ranking.
    Returns:
        A new state dict; tensors outside MoEfied FFNs are the dense ones (shared storage).
    """
    out, ffn = split_ffn_weights(dense_state, dynamoe.is_moefied)
    for index, (fc1, fc2) in ffn.items():
        scores = (importance[index] if importance is not None and index in importance
                  else weight_importance(fc1, fc2, gated))
        order = importance_order(scores)
        fc1_p, fc2_p, _ = permute_ffn(fc1, fc2, order, gated)
        prefix = f"decoder.layers.{index}.mlp."
        for shell, (fc1_s, fc2_s) in enumerate(split_into_shells(fc1_p, fc2_p,
                                                                 dynamoe.num_shells, gated)):
            out[f"{prefix}experts.local_experts.{shell}.linear_fc1.weight"] = fc1_s
            out[f"{prefix}experts.local_experts.{shell}.linear_fc2.weight"] = fc2_s
        hidden = fc1.shape[1]
        out[f"{prefix}router.weight"] = torch.zeros(dynamoe.num_levels, hidden,
                                                    dtype=torch.float32)
        out[f"{prefix}router.bias"] = torch.zeros(dynamoe.num_levels, dtype=torch.float32)
    missing = [i for i in (dynamoe.moefied_layers or []) if i not in ffn]
    if missing:
        raise ValueError(f"--dynamoe-layers {missing} have no dense FFN weights in the "
                         f"checkpoint (layer count mismatch?)")
    return out
