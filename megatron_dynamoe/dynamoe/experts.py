"""ShellExperts: Megatron's SequentialMLP whose experts are the shells of one FFN.

Computation is Megatron's own (one MLP per local shell, on the tokens dispatched to it).
The one difference is checkpoint identity: Megatron keys expert weights by their physical
expert index, which depends on the EP size and, here, on the shell placement. ShellExperts
keys them by *logical shell index* (importance order), so a checkpoint means the same thing
at any EP size or placement and reshards with dist_checkpointing like any other tensor.
"""

from __future__ import annotations

from typing import List, Optional

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.shells import shell_placement


class ShellExperts(SequentialMLP):
    """The local shells of one DynaMoE layer; `shell_ids[i]` is local expert i's shell."""

    def __init__(self, num_local_experts: int, config: TransformerConfig,
                 submodules: MLPSubmodules, pg_collection=None,
                 dynamoe_config: Optional[DynaMoEConfig] = None):
        if dynamoe_config is None:
            raise ValueError("ShellExperts needs a DynaMoEConfig (bound by the DynaMoE spec)")
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        placement = shell_placement(dynamoe_config.num_shells, self.ep_group.size(),
                                    dynamoe_config.shell_placement)
        first = self.ep_group.rank() * num_local_experts
        self.shell_ids: List[int] = placement[first:first + num_local_experts]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Expert tensors keyed by logical shell index (see module docstring)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        num_shells = self.ep_group.size() * self.num_local_experts
        singleton_local_shards = (metadata or {}).get("singleton_local_shards", False)
        sharded = {}
        for local_idx, (expert, shell) in enumerate(zip(self.local_experts, self.shell_ids)):
            local_prefix = f"{prefix}local_experts.{local_idx}."
            if singleton_local_shards:
                sharded_prefix = f"{prefix}experts.{shell}."
                offsets = sharded_offsets
            else:
                sharded_prefix = f"{prefix}experts."
                offsets = (*sharded_offsets, (len(sharded_offsets), shell, num_shells))
            expert_sd = expert.sharded_state_dict(local_prefix, offsets, metadata)
            replace_prefix_for_sharding(expert_sd, local_prefix, sharded_prefix)
            for sh_ten in expert_sd.values():
                # Replicas of a shell live on the expert-data-parallel ranks.
                sh_ten.replica_id = (*sh_ten.replica_id[:2], self.dp_group.rank())
            sharded.update(expert_sd)
        return sharded
