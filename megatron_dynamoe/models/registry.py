"""The model families and how to build each: one registry that the trainer, the evaluation and
the tools ask, instead of each deciding from a checkpoint's metadata on its own.

A checkpoint's `model.json` names its family in `extra["model_family"]` (written by every
save). What it holds decides where it can: an `extra["adaptive"]` gating config is the
adaptive-gating MoE, no DynaMoE config a dense model; the name tells the top-k baseline
(`model_family`, or the trainer's former `model_provider`, == "topk") from DynaMoE.

Providers are named by import path and imported on first use, so this module (in the models
layer) depends on no family's package: `baselines` and `adaptive` build on `models`.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional

FAMILY_KEY = "model_family"
# The trainer's key before the registry; still read.
_LEGACY_KEYS = (FAMILY_KEY, "model_provider")

# family: "module:factory", the factory called with the CheckpointInfo.
_PROVIDERS: Dict[str, str] = {
    "dense": "megatron_dynamoe.models.registry:_dynamoe_or_dense_provider",
    "dynamoe": "megatron_dynamoe.models.registry:_dynamoe_or_dense_provider",
    "topk": "megatron_dynamoe.baselines.topk:TopKProvider.from_checkpoint_info",
    "adaptive": "megatron_dynamoe.adaptive.provider:AdaptiveMoEProvider.from_checkpoint_info",
}
FAMILIES = tuple(_PROVIDERS)


def family_of(info) -> str:
    """'dense', 'dynamoe', 'topk' or 'adaptive': the family of the model a CheckpointInfo
    (or None: a plain Megatron-Core checkpoint, dense) describes. What the checkpoint holds
    decides (a gating config: adaptive; no DynaMoE config: dense); the recorded name only
    tells the top-k baseline from DynaMoE, which share their weights' layout."""
    if info is None:
        return "dense"
    extra = info.extra or {}
    if "adaptive" in extra:
        return "adaptive"
    if info.dynamoe is None:
        return "dense"
    if any(extra.get(key) == "topk" for key in _LEGACY_KEYS):
        return "topk"
    return "dynamoe"


def provider_for(info, family: Optional[str] = None):
    """The ModelProvider that builds the model `info` describes (at any layout), for its
    family (`family_of`) or the one given. Raises ValueError for an unknown family."""
    family = family or family_of(info)
    if family not in _PROVIDERS:
        raise ValueError(f"unknown model family {family!r}: one of {', '.join(FAMILIES)}")
    module, _, attribute = _PROVIDERS[family].partition(":")
    factory = importlib.import_module(module)
    for name in attribute.split("."):
        factory = getattr(factory, name)
    return factory(info)


def with_family(info, family: str):
    """A copy of CheckpointInfo `info` whose metadata names `family` (what every save
    records)."""
    import dataclasses

    return dataclasses.replace(info, extra={**(info.extra or {}), FAMILY_KEY: family})


def _dynamoe_or_dense_provider(info):
    from megatron_dynamoe.models.builder import ModelProvider

    return ModelProvider(info.architecture, info.dynamoe)
