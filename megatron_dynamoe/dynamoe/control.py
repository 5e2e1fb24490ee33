"""Run-time control of a built DynaMoE model: find its DynaMoE layers and set what they read
at each forward (the sensitivity theta, globally or per layer; a static nested level; the
training step and the label fraction that drive the label schedule). Every function takes a
model or a list of model chunks and touches only DynaMoE layers, so it is a no-op on a dense
model.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from megatron_dynamoe.dynamoe.config import check_sensitivity
from megatron_dynamoe.dynamoe.layer import DynaMoELayer
from megatron_dynamoe.runtime.forward_only import pipeline_group


def dynamoe_layers(model: torch.nn.Module) -> List[DynaMoELayer]:
    """Every DynaMoE layer in `model` (or a list of model chunks), in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, DynaMoELayer)]


def set_sensitivity(model, theta: float) -> None:
    """Set the sensitivity theta in [0, 1] of every DynaMoE layer (1 = dense compute)."""
    theta = check_sensitivity(theta)
    for layer in dynamoe_layers(model):
        layer.set_sensitivity(theta)


def set_static_level(model, level: Optional[int]) -> None:
    """Put every token of every DynaMoE layer at `level` (1..K): the static nested
    sub-network of that width. None returns to per-token routing at the sensitivity."""
    for layer in dynamoe_layers(model):
        layer.router.set_static_level(level)


def set_level_sorted_experts(model, enabled: bool) -> None:
    """Let routed forwards at EP = 1 run the shells on level-sorted tokens (True, the
    default) or send them through Megatron's token dispatcher (False: the reference path,
    benchmarks and parity tests). The numbers agree to round-off (summation order)."""
    for layer in dynamoe_layers(model):
        layer.level_sorted_experts = bool(enabled)


def set_training_step(model, step: int) -> None:
    """Tell every DynaMoE layer the training step (drives the label schedule)."""
    for layer in dynamoe_layers(model):
        layer.set_step(step)


def set_label_fraction(model, fraction: float) -> None:
    """Set the fraction of training steps on which every DynaMoE layer computes difficulty
    labels and its router loss (0.0: never, the router is not trained). Each layer gets its
    own copy of its DynaMoEConfig, so the config a checkpoint records keeps its value."""
    for layer in dynamoe_layers(model):
        layer.dynamoe_config = dataclasses.replace(layer.dynamoe_config,
                                                   label_fraction=float(fraction))


def set_layer_sensitivities(model, thetas: Sequence[float]) -> None:
    """Set one theta per DynaMoE layer of the whole model, in layer order; on a pipeline
    stage, its own layers take theirs (by global layer number)."""
    layers = dynamoe_layers(model)
    if not layers:
        if thetas and pipeline_group() is None:
            raise ValueError(f"{len(thetas)} sensitivities for 0 DynaMoE layers")
        return
    config = layers[0].dynamoe_config
    moefied = [i for i in range(layers[0].config.num_layers) if config.is_moefied(i)]
    if len(thetas) != len(moefied):
        raise ValueError(f"{len(thetas)} sensitivities for {len(moefied)} DynaMoE layers")
    position = {index: k for k, index in enumerate(moefied)}
    for layer in layers:
        layer.set_sensitivity(float(thetas[position[layer.layer_number - 1]]))


def apply_checkpoint_sensitivities(model, info) -> None:
    """Put a freshly built DynaMoE model at the sensitivity its checkpoint records: the
    per-layer thetas of a per-layer budget export (`extra.layer_sensitivities`), else the
    DynaMoEConfig's global `sensitivity` (the layers are built with it already)."""
    thetas = (info.extra or {}).get("layer_sensitivities")
    if thetas:
        set_layer_sensitivities(model, thetas)
