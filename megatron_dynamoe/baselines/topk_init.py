"""The top-k baseline's initial checkpoint: a DynaMoE checkpoint's weights with zero top-k
routers over its shells (same weights, so the comparison with DynaMoE starts equal), written
after its parity checks. The command is `python -m megatron_dynamoe.cli.topk init`."""

from __future__ import annotations

import os


def write_topk_init(load: str, output: str, overwrite: bool = False,
                    tolerance: float = 1e-4, device: str = "auto",
                    verify_checksums: bool = True) -> None:
    """Write the top-k initial checkpoint of DynaMoE checkpoint `load` to `output` after its
    parity checks (single process): k = S against theta = 1 at `tolerance`, and the untrained
    router at k < S against the static sub-network of as many shells (the tie-break picks
    the most important ones) at max(`tolerance`, 1e-3)."""
    import torch

    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.utils.outputs import check_output_path, tree_size
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.utils.parity import check_parity, megatron_logits
    from megatron_dynamoe.baselines.topk import (
        TOPK_FAMILY,
        build_topk_model,
        set_topk,
        topk_overrides,
        topk_state_from_dynamoe,
    )
    from megatron_dynamoe.checkpoint.loading import load_for_evaluation
    from megatron_dynamoe.dynamoe.control import set_sensitivity, set_static_level
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    check_output_path(output, overwrite, (load,), needed_bytes=tree_size(load))
    initialize_parallel(ParallelLayout(), device=device)
    source = load_for_evaluation(load, verify_checksums=verify_checksums)
    if source.family != "dynamoe":
        raise ToolError(f"{load} is a {source.family} checkpoint: the top-k baseline starts "
                        f"from a DynaMoE (MoEfied) checkpoint")
    arch, dyn = source.info.architecture, source.info.dynamoe
    model = build_topk_model(arch, transformer_config(arch, dynamoe=dyn,
                                                      perform_initialization=False,
                                                      **topk_overrides(dyn)), dyn)
    model.load_state_dict(topk_state_from_dynamoe(source.model.state_dict(), dyn))
    tokens = torch.randint(0, arch.vocab_size, (2, min(64, arch.max_position_embeddings)),
                           generator=torch.Generator().manual_seed(0))
    set_sensitivity(source.model, 1.0)
    set_topk(model, dyn.num_shells)
    check_parity(megatron_logits(source.model, tokens), megatron_logits(model, tokens),
                 tolerance, "top-k k = S vs DynaMoE theta = 1")
    # The tie-break offset moves the unit weights by ~1e-6 relative; a narrow sub-network
    # of a real model amplifies that through its layers, hence the looser check.
    level = max(1, dyn.num_levels - 1)
    set_static_level(source.model, level)
    set_topk(model, dyn.level_shells[level - 1])
    check_parity(megatron_logits(source.model, tokens), megatron_logits(model, tokens),
                 max(tolerance, 1e-3), f"untrained top-k k = {dyn.level_shells[level - 1]} "
                                       f"shells vs static level {level}")
    extra = dict(source=os.path.abspath(source.path), model_family=TOPK_FAMILY,
                 tool="megatron_dynamoe.cli.topk init")
    save_checkpoint(model, output, CheckpointInfo(arch, dyn, extra), overwrite)
