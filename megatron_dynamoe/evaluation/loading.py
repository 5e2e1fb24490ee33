"""Load a checkpoint for evaluation: dense, DynaMoE or top-k baseline, at TP = PP = EP = 1.

A path may be a model checkpoint (tools/convert_checkpoint.py, tools/moefy.py, this
package's top-k initialisation) or a training `--save` folder, whose latest complete
iteration is used. The model family comes from `dynamoe.json`: no DynaMoE config = dense,
`extra["model_family"]` or the trainer's `extra["model_provider"]` == "topk" = top-k
baseline, otherwise DynaMoE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatron_dynamoe.checkpoint.torch_dist import (
    CheckpointInfo,
    load_checkpoint,
    resolve_architecture,
)

FAMILY_KEYS = ("model_family", "model_provider")


@dataclass
class LoadedModel:
    """A model in eval mode with where it came from."""

    model: object
    info: CheckpointInfo
    family: str   # 'dense', 'dynamoe' or 'topk'
    path: str     # the checkpoint folder actually read


def resolve_checkpoint_folder(path: str) -> str:
    """`path` itself, or the latest complete iteration of a training `--save` folder."""
    from megatron_dynamoe.training.state import latest_checkpoint

    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest[1]
    return path


def model_family(info: Optional[CheckpointInfo]) -> str:
    """'dense', 'dynamoe' or 'topk' from a checkpoint's metadata."""
    if info is None or info.dynamoe is None:
        return "dense"
    for key in FAMILY_KEYS:
        if info.extra.get(key) == "topk":
            return "topk"
    return "dynamoe"


def load_for_evaluation(path: str, preset: Optional[str] = None,
                        verify_checksums: bool = True) -> LoadedModel:
    """Build the checkpoint's model at TP = PP = EP = 1 (parallel groups initialised), load
    it and put it in eval mode. Raises CheckpointError for a missing / corrupt checkpoint
    (`verify_checksums`: check its files against their checksums.json first)."""
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.baselines.topk import build_topk_model, topk_overrides
    from megatron_dynamoe.models.builder import build_gpt_model

    folder = resolve_checkpoint_folder(path)
    arch, info = resolve_architecture(folder, preset)
    if info is None:
        info = CheckpointInfo(arch, None, {})
    family = model_family(info)
    dyn = info.dynamoe
    # Built on the device policy's device without random-init work (the load replaces it).
    if family == "topk":
        model = build_topk_model(arch, transformer_config(arch, dynamoe=dyn,
                                                          perform_initialization=False,
                                                          **topk_overrides(dyn)), dyn)
    else:
        model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn,
                                                         perform_initialization=False), dyn)
    load_checkpoint(model, folder, origin=f"the {family} model of {folder}",
                    verify_checksums=verify_checksums)
    if family == "dynamoe":
        from megatron_dynamoe.evaluation.budget import apply_checkpoint_sensitivities

        apply_checkpoint_sensitivities(model, info)
    model.eval()
    return LoadedModel(model, info, family, folder)
