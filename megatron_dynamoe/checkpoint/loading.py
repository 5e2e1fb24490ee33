"""Load a checkpoint for evaluation: dense, DynaMoE or top-k baseline, at any TP / PP layout.

A path may be a model checkpoint (tools/convert_checkpoint.py, tools/moefy.py, this
package's top-k initialisation) or a training `--save` folder, whose latest complete
iteration is used. `models.registry.family_of` names the family (dense, DynaMoE, top-k baseline, adaptive-gating
MoE) and its provider builds the model.
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



@dataclass
class LoadedModel:
    """A model in eval mode with where it came from."""

    model: object
    info: CheckpointInfo
    family: str   # models.registry.FAMILIES: 'dense', 'dynamoe', 'topk' or 'adaptive'
    path: str     # the checkpoint folder actually read


def resolve_checkpoint_folder(path: str) -> str:
    """`path` itself, or the latest complete iteration of a training `--save` folder."""
    from megatron_dynamoe.checkpoint.save_folder import latest_checkpoint

    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest[1]
    return path


def model_family(info: Optional[CheckpointInfo]) -> str:
    """The family of a checkpoint's model (`models.registry.family_of`)."""
    from megatron_dynamoe.models.registry import family_of

    return family_of(info)


def load_for_evaluation(path: str, preset: Optional[str] = None,
                        verify_checksums: bool = True,
                        architecture_flags: Optional[dict] = None,
                        layout=None, params_dtype=None) -> LoadedModel:
    """Build the checkpoint's model at `layout` (default TP = PP = EP = 1; the parallel
    groups must be initialised at it), load this rank's part and put it in eval mode
    (`preset` / `architecture_flags`: the architecture of a plain Megatron checkpoint,
    `resolve_architecture`; `params_dtype`: e.g. torch.bfloat16, default fp32). Raises
    CheckpointError for a missing / corrupt checkpoint
    (`verify_checksums`: check its files against their checksums.json first)."""
    from megatron_dynamoe.models.registry import family_of, provider_for
    from megatron_dynamoe.runtime.parallel import ParallelLayout

    folder = resolve_checkpoint_folder(path)
    arch, info = resolve_architecture(folder, preset, architecture_flags)
    if info is None:
        info = CheckpointInfo(arch, None, {})
    family = family_of(info)
    provider = provider_for(info, family)
    # Built on the device policy's device without random-init work (the load replaces it).
    dtype = {} if params_dtype is None else dict(params_dtype=params_dtype)
    model = provider.build(provider.transformer_config(layout or ParallelLayout(),
                                                       perform_initialization=False, **dtype))
    load_checkpoint(model, folder, origin=f"the {family} model of {folder}",
                    verify_checksums=verify_checksums)
    if family == "dynamoe":
        from megatron_dynamoe.dynamoe.control import apply_checkpoint_sensitivities

        apply_checkpoint_sensitivities(model, info)
    model.eval()
    return LoadedModel(model, info, family, folder)
