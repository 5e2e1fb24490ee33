"""DynaMoE -> dense: the full model, or the static nested sub-network at one level.

Pure state-dict functions at EP=1 / TP=1 (ShellExperts' local expert s is logical shell s
there). The shells of a level are a prefix of the importance-ranked neurons, so the
sub-network at level e is an ordinary dense FFN of width F x level_fraction[e]: its fc1 is
the shells' gate rows then their up rows, its fc2 their columns. Level K gives the dense
model with its neurons in importance order (the same function as the original).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional

import torch

from megatron_dynamoe.models.architectures import ModelArchitecture
from megatron_dynamoe.dynamoe.config import DynaMoEConfig

_SHELL_KEY = re.compile(
    r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_ROUTER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.router\.(weight|bias)$")


def exported_architecture(arch: ModelArchitecture, dynamoe: DynaMoEConfig,
                          level: Optional[int] = None) -> ModelArchitecture:
    """Architecture of the dense export at `level` (None or K: unchanged width)."""
    level = _check_level(dynamoe, level)
    if level == dynamoe.num_levels:
        return arch
    if dynamoe.moefied_layers is not None and len(dynamoe.moefied_layers) != arch.num_layers:
        raise ValueError(
            f"a level-{level} export cuts every FFN to {dynamoe.level_fractions[level - 1]:g} "
            f"of its width, but only layers {list(dynamoe.moefied_layers)} are DynaMoE layers: "
            f"a dense model needs one FFN width; export the full level instead")
    width = arch.ffn_hidden_size * dynamoe.level_shells[level - 1] // dynamoe.num_shells
    return dataclasses.replace(arch, ffn_hidden_size=width)


def _check_level(dynamoe: DynaMoEConfig, level: Optional[int]) -> int:
    if level is None:
        return dynamoe.num_levels
    if not 1 <= level <= dynamoe.num_levels:
        raise ValueError(f"--level {level} outside 1..{dynamoe.num_levels} (the checkpoint's "
                         f"levels are {list(dynamoe.level_fractions)} of the FFN)")
    return level


def dense_state_dict(dynamoe_state: Dict[str, torch.Tensor], dynamoe: DynaMoEConfig,
                     gated: bool, level: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """DynaMoE GPTModel state dict (EP=1, TP=1) -> dense GPTModel state dict at `level`.

    Args:
        dynamoe_state: `state_dict()` of the DynaMoE model.
        gated: SwiGLU FFN (shell fc1 = [gate rows; up rows]).
        level: 1..K, or None for the full level K.
    Returns:
        State dict of the dense model of `exported_architecture(...)`; routers are dropped.
    """
    level = _check_level(dynamoe, level)
    keep = dynamoe.level_shells[level - 1]
    out: Dict[str, torch.Tensor] = {}
    shells: Dict[int, Dict[int, Dict[str, torch.Tensor]]] = {}
    for key, value in dynamoe_state.items():
        if key.endswith("._extra_state") or _ROUTER_KEY.match(key):
            continue
        match = _SHELL_KEY.match(key)
        if match:
            layer, shell, name = int(match.group(1)), int(match.group(2)), match.group(3)
            shells.setdefault(layer, {}).setdefault(shell, {})[name] = value
        else:
            out[key] = value
    for layer, by_shell in sorted(shells.items()):
        if sorted(by_shell) != list(range(dynamoe.num_shells)):
            raise ValueError(f"layer {layer}: expected shells 0..{dynamoe.num_shells - 1}, found "
                             f"{sorted(by_shell)} (was the model built at EP=1?)")
        fc1 = [by_shell[s]["linear_fc1"] for s in range(keep)]
        fc2 = [by_shell[s]["linear_fc2"] for s in range(keep)]
        if gated:
            gates = [w.chunk(2, dim=0)[0] for w in fc1]
            ups = [w.chunk(2, dim=0)[1] for w in fc1]
            fc1_dense = torch.cat(gates + ups, dim=0)
        else:
            fc1_dense = torch.cat(fc1, dim=0)
        prefix = f"decoder.layers.{layer}.mlp."
        out[prefix + "linear_fc1.weight"] = fc1_dense.clone()
        out[prefix + "linear_fc2.weight"] = torch.cat(fc2, dim=1).clone()
    return out
