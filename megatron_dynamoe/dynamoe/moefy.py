"""MoEfication of a dense GPTModel: calibration importance and the dense -> DynaMoE weights.

- `calibrate_importance` runs a dense model on calibration tokens and ranks each FFN's
  neurons by E|act_n| x ||fc2[:, n]|| (at any TP / PP layout: batches go through Megatron's
  forward-only schedule, each pipeline stage ranks its own layers, each tensor-parallel rank
  its own neuron slice, and the slices are all-gathered in neuron order).
- `moefy_state_items` maps a dense model's state dict to the state dict items of the DynaMoE
  model built from the same architecture at the same TP / PP layout and EP = 1 (one layer at
  a time; `load_moefied` copies them in, `moefy_state_dict` collects them): each MoEfied
  layer's FFN is gathered over TP (one layer at a time), permuted by importance, cut into
  shells and each shell split over the expert-TP ranks the way Megatron splits it; routers
  are zero-initialised; every other tensor is copied unchanged. At TP = PP = 1 no
  collective runs.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.runtime.forward_only import pipeline_forward
from megatron_dynamoe.dynamoe.shells import (
    activation_importance,
    importance_order,
    order_scores,
    output_error_order,
    permute_ffn,
    split_into_shells,
    weight_importance,
)

_MLP_KEY = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.(linear_fc1|linear_fc2)\.weight$")


def _local_layers(model) -> Dict[int, torch.nn.Module]:
    """Global 0-based layer index -> TransformerLayer, for this pipeline stage."""
    layers = model.decoder.layers
    return {layer.layer_number - 1: layer for layer in layers}


# --dynamoe-importance methods that calibrate on text -> calibrate_importance's statistic.
ACTIVATION_STATISTICS = {"activation": "mean-abs", "activation-rms": "rms",
                         "output-error": "second-moment"}


@torch.no_grad()
def calibrate_importance(model, batches: Iterable[dict], gated: bool,
                         activation: Callable[[torch.Tensor], torch.Tensor],
                         statistic: str = "mean-abs") -> Dict[int, torch.Tensor]:
    """Activation importance of every FFN neuron of a dense GPTModel on calibration data.

    Args:
        model: dense GPTModel (this rank's pipeline stage; any TP size).
        batches: dicts with `tokens` [b, s], `position_ids` [b, s], `attention_mask`.
        gated: SwiGLU-style FFN; activation: the FFN activation (config.activation_func).
        statistic: 'mean-abs' (E|act|) or 'rms' (sqrt E[act^2]) of each neuron's activation,
            or 'second-moment' (E[act act^T], [F, F] per layer, ranked by
            `output_error_order`; TP=1 only, since the pairs span every TP rank's neurons).
    Returns:
        {global layer index: [F] float64 importance} for the layers on this stage.
    """
    if statistic not in ACTIVATION_STATISTICS.values():
        raise ValueError(f"statistic {statistic!r}: choose one of "
                         f"{sorted(ACTIVATION_STATISTICS.values())}")
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    if statistic == "second-moment" and tp_size > 1:
        raise ValueError("output-error importance needs every neuron's activations on one "
                         "rank: MoEfy at --tensor-model-parallel-size 1 (PP may split layers)")
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
            if statistic == "second-moment":
                # One batch's [F, F] sum in fp32 (a few thousand tokens), batches in fp64.
                act32 = act.float()
                moment = (act32.t() @ act32).double()
            else:
                moment = (act.abs() if statistic == "mean-abs" else act.square()).sum(dim=0)
            sums[index] = sums.get(index, 0) + moment
            counts[index] = counts.get(index, 0) + act.shape[0]
        return hook

    for index, layer in layers.items():
        hooks.append(layer.mlp.linear_fc1.register_forward_hook(make_hook(index)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            pipeline_forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if layers and not counts:
        raise ValueError("calibration produced no tokens: give at least one batch")

    importance = {}
    for index, layer in layers.items():
        mean = sums[index] / counts[index]
        fc2 = layer.mlp.linear_fc2.weight.detach()
        if statistic == "second-moment":
            importance[index] = order_scores(output_error_order(mean, fc2))
            continue
        scale = mean if statistic == "mean-abs" else mean.sqrt()
        local = activation_importance(scale, fc2)
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


def _tensor_parallel(group) -> Tuple[int, int]:
    """(size, rank) of `group`, (1, 0) without one."""
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def gather_tensor_parallel_ffn(fc1: torch.Tensor, fc2: torch.Tensor, gated: bool, group
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One layer's full FFN from its tensor-parallel slices.

    Args:
        fc1: this rank's [F / TP (x 2 gated), H] slice (ColumnParallelLinear; a gated FFN holds
            [gate_r; up_r], Megatron's SwiGLU split); fc2: [H, F / TP] (RowParallelLinear).
        group: the tensor-parallel group (None or size 1: returned as they are).
    Returns:
        (fc1 [F (x 2), H] = [gate; up] for gated, fc2 [H, F]), neurons in global order.
    """
    size, _ = _tensor_parallel(group)
    if size == 1:
        return fc1, fc2
    parts1 = [torch.empty_like(fc1) for _ in range(size)]
    parts2 = [torch.empty_like(fc2) for _ in range(size)]
    dist.all_gather(parts1, fc1.contiguous(), group=group)
    dist.all_gather(parts2, fc2.contiguous(), group=group)
    if gated:
        halves = [p.chunk(2, dim=0) for p in parts1]
        full1 = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    else:
        full1 = torch.cat(parts1)
    return full1, torch.cat(parts2, dim=1)


def tensor_parallel_slice(fc1: torch.Tensor, fc2: torch.Tensor, gated: bool, rank: int,
                          size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s slice of a full FFN (or shell) among `size` tensor-parallel ranks: the
    inverse of `gather_tensor_parallel_ffn` (fc1 [F (x 2), H] -> [F / size (x 2), H], fc2
    [H, F] -> [H, F / size]; contiguous copies, so the full tensors can be freed)."""
    if size == 1:
        return fc1, fc2
    neurons = fc2.shape[1]
    if neurons % size:
        raise ValueError(f"{neurons} FFN neurons do not split over {size} tensor-parallel "
                         f"ranks")
    width = neurons // size
    cols = slice(rank * width, (rank + 1) * width)
    if gated:
        gate, up = fc1.chunk(2, dim=0)
        local1 = torch.cat([gate[cols], up[cols]])
    else:
        local1 = fc1[cols].clone()
    return local1, fc2[:, cols].contiguous()


def moefy_state_items(dense_state: Dict[str, torch.Tensor], dynamoe: DynaMoEConfig,
                      gated: bool, importance: Optional[Dict[int, torch.Tensor]] = None, *,
                      layer_offset: int = 0, tp_group=None, expert_tp_group=None
                      ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Dense GPTModel state dict -> (key, tensor) items of the DynaMoE GPTModel's state dict
    (same TP / PP layout, EP=1), one MoEfied layer at a time, so that a caller copying them
    into a model holds one layer's shells at most (a 70B model's FFNs are 2/3 of it).

    Args:
        dense_state: `model.state_dict()` of this rank's dense model (its pipeline stage,
            its tensor-parallel slices).
        dynamoe: the DynaMoE config (which layers, how many shells, levels).
        gated: SwiGLU FFN (fc1 = [gate; up]).
        importance: {global layer index: [F]} from `calibrate_importance`; layers without an
            entry use the data-free weight-norm ranking.
        layer_offset: global index of this stage's first layer (state dict keys count from
            0 on every stage).
        tp_group / expert_tp_group: the tensor-parallel group the dense FFN is split over and
            the expert-TP group the shells are split over (None at TP = 1).
    Yields:
        Tensors outside MoEfied FFNs (the dense ones, shared storage), then each MoEfied
        layer's shells and its zero-initialised router.
    """
    rest, ffn = split_ffn_weights(dense_state, lambda i: dynamoe.is_moefied(i + layer_offset))
    yield from rest.items()
    expert_size, expert_rank = _tensor_parallel(expert_tp_group)
    for local_index, (fc1, fc2) in ffn.items():
        index = local_index + layer_offset
        fc1, fc2 = gather_tensor_parallel_ffn(fc1, fc2, gated, tp_group)
        scores = (importance[index] if importance is not None and index in importance
                  else weight_importance(fc1, fc2, gated))
        order = importance_order(scores)
        fc1_p, fc2_p, _ = permute_ffn(fc1, fc2, order, gated)
        prefix = f"decoder.layers.{local_index}.mlp."
        for shell, (fc1_s, fc2_s) in enumerate(split_into_shells(fc1_p, fc2_p,
                                                                 dynamoe.num_shells, gated)):
            fc1_s, fc2_s = tensor_parallel_slice(fc1_s, fc2_s, gated, expert_rank, expert_size)
            yield f"{prefix}experts.local_experts.{shell}.linear_fc1.weight", fc1_s
            yield f"{prefix}experts.local_experts.{shell}.linear_fc2.weight", fc2_s
        hidden = fc1.shape[1]
        yield f"{prefix}router.weight", torch.zeros(dynamoe.num_levels, hidden,
                                                    dtype=torch.float32, device=fc1.device)
        yield f"{prefix}router.bias", torch.zeros(dynamoe.num_levels, dtype=torch.float32,
                                                  device=fc1.device)


def moefy_state_dict(dense_state: Dict[str, torch.Tensor], dynamoe: DynaMoEConfig,
                     gated: bool, importance: Optional[Dict[int, torch.Tensor]] = None,
                     **layout) -> Dict[str, torch.Tensor]:
    """`moefy_state_items` as one state dict (every layer's shells at once: small models,
    tests); `layout`: its layer_offset / tp_group / expert_tp_group."""
    return dict(moefy_state_items(dense_state, dynamoe, gated, importance, **layout))


@torch.no_grad()
def load_moefied(model, items: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Copy `moefy_state_items` into the DynaMoE `model`'s parameters and buffers as they
    come (each layer's shells are freed before the next layer's are made); raises ValueError
    naming keys the model lacks or that were never given."""
    target = {k: v for k, v in model.state_dict(keep_vars=True).items()
              if not k.endswith("._extra_state")}
    seen = set()
    for key, value in items:
        if key not in target:
            raise ValueError(f"MoEfy made {key!r}, which the DynaMoE model does not have")
        if tuple(target[key].shape) != tuple(value.shape):
            raise ValueError(f"{key}: MoEfy made {list(value.shape)}, the DynaMoE model "
                             f"holds {list(target[key].shape)}")
        target[key].data.copy_(value)
        seen.add(key)
    missing = sorted(target.keys() - seen)
    if missing:
        raise ValueError(f"MoEfy left {len(missing)} tensors of the DynaMoE model unset, "
                         f"e.g. {missing[:3]}")


def check_moefied_layers(dynamoe: DynaMoEConfig, num_layers: int) -> None:
    """ValueError when --dynamoe-layers names a layer the model does not have."""
    missing = [i for i in (dynamoe.moefied_layers or []) if not 0 <= i < num_layers]
    if missing:
        raise ValueError(f"--dynamoe-layers {missing} have no dense FFN weights in the "
                         f"checkpoint (layer count mismatch?)")
