"""The baselines DynaMoE is measured against, and the variants an evaluation runs.

- dense: the dense model (its own checkpoint, or the DynaMoE model at level K, which equals
  it up to float summation order);
- static: every token at nested level e (Flextron-style: one width per budget, no per-token
  routing): `set_static_level` on the same DynaMoE weights;
- topk: Megatron-Core's own `TopKRouter` over the same shells (`TopKShellRouter`), in
  Megatron's plain `MoELayer` with the same `ShellExperts`, k of S shells per token.

Top-k weights. Megatron combines the chosen experts with their router probabilities; shells
are slices of one FFN, whose output is their plain sum. The router therefore uses Megatron's
pre-softmax scores scaled by S (`moe_router_pre_softmax=True`,
`moe_router_topk_scaling_factor=S`): a uniform router gives every chosen shell weight 1, so the
untrained router at k = S is exactly the dense FFN, and a trained router can still re-weight
shells and learn through its weights (post-softmax top-1 would get no gradient). The router
weight is [S, H] and starts at zero, like the MoEfied checkpoint's difficulty routers; ties
among equal scores are broken towards the more important shells by a fixed 1e-6 x rank
offset (torch.topk would otherwise pick the last ones), so the untrained top-k router is the
static sub-network of k shells. Fine-tuning draws k per forward uniformly from the levels'
shell counts, one fine-tune for every budget, the same deal as DynaMoE's sampled theta.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dynamoe.models.architectures import ModelArchitecture
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.layer import DynaMoELayer
from megatron_dynamoe.dynamoe.shells import shell_placement
from megatron_dynamoe.models.spec import decoder_block_spec
from megatron_dynamoe.models.builder import ModelProvider, build_gpt_model
from megatron_dynamoe.dynamoe.control import dynamoe_layers, set_sensitivity, set_static_level

TOPK_FAMILY = "topk"
TIE_BREAK = 1e-6


class TopKShellRouter(TopKRouter):
    """Megatron's TopKRouter over the S shells of a MoEfied FFN (see the module docstring).

    `topk` is set at run time (`set_topk`); in training forwards it is drawn uniformly from
    `train_topk` with a generator seeded by the layer number, so every rank and every resumed
    run draws the same sequence.
    """

    def __init__(self, config: TransformerConfig, pg_collection=None,
                 dynamoe_config: Optional[DynaMoEConfig] = None):
        if dynamoe_config is None:
            raise ValueError("TopKShellRouter needs the DynaMoEConfig of the shells")
        super().__init__(config=config, pg_collection=pg_collection)
        placement = shell_placement(dynamoe_config.num_shells, pg_collection.ep.size(),
                                    dynamoe_config.shell_placement)
        # Physical expert slot p holds logical shell placement[p]; rank 0 is the most
        # important shell and gets the largest offset.
        offset = -TIE_BREAK * torch.tensor(placement, dtype=torch.float32)
        self.register_buffer("tie_break", offset, persistent=False)
        self.train_topk = tuple(dynamoe_config.level_shells)
        self._generator: Optional[torch.Generator] = None

    def reset_parameters(self):
        """Zero weight: uniform scores, as the MoEfied checkpoint's routers."""
        with torch.no_grad():
            self.weight.zero_()
        setattr(self.weight, "sequence_parallel", self.config.sequence_parallel)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Megatron's gating plus the fixed tie-break offset."""
        return super().gating(input) + self.tie_break.to(torch.float32)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Megatron's top-k routing; a training forward first draws its k."""
        if self.training and torch.is_grad_enabled():
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(7919 * (self.layer_number or 0))
            pick = torch.randint(len(self.train_topk), (), generator=self._generator)
            self.topk = self.train_topk[int(pick)]
        return super().routing(logits, padding_mask=padding_mask)


def topk_overrides(dynamoe: DynaMoEConfig) -> Dict[str, object]:
    """TransformerConfig fields of the top-k baseline on top of the DynaMoE ones."""
    return dict(moe_router_pre_softmax=True, moe_router_score_function="softmax",
                moe_router_topk_scaling_factor=float(dynamoe.num_shells),
                moe_router_load_balancing_type="none")


def build_topk_model(arch: ModelArchitecture, config: TransformerConfig,
                     dynamoe: DynaMoEConfig, *, vp_stage: Optional[int] = None,
                     parallel_output: bool = True) -> GPTModel:
    """GPTModel whose MoEfied layers are Megatron `MoELayer`s with a `TopKShellRouter` over
    the DynaMoE shells (`ShellExperts`, same checkpoint keys apart from the router)."""
    spec = copy.deepcopy(decoder_block_spec(config, dynamoe, vp_stage=vp_stage))
    for layer_spec in spec.layer_specs:
        mlp = layer_spec.submodules.mlp
        if mlp.module is DynaMoELayer:
            mlp.module, mlp.params = MoELayer, {}
            mlp.submodules.router = functools.partial(TopKShellRouter, dynamoe_config=dynamoe)
    return build_gpt_model(arch, config, None, vp_stage=vp_stage,
                           parallel_output=parallel_output, block_spec=spec)


class TopKProvider(ModelProvider):
    """ModelProvider of the top-k baseline: trains through the same trainer as DynaMoE."""

    name = TOPK_FAMILY

    def __init__(self, architecture: ModelArchitecture, dynamoe: DynaMoEConfig):
        if dynamoe is None:
            raise ValueError("the top-k baseline routes over DynaMoE shells: give the "
                             "DynaMoEConfig of the MoEfied checkpoint")
        super().__init__(architecture, dynamoe)

    @property
    def family(self) -> str:
        return TOPK_FAMILY

    @classmethod
    def from_checkpoint_info(cls, info) -> "TopKProvider":
        """The provider of a top-k checkpoint (its architecture and shells)."""
        return cls(info.architecture, info.dynamoe)

    def transformer_config(self, layout, **kwargs) -> TransformerConfig:
        """The DynaMoE config with the top-k router fields (`topk_overrides`)."""
        return super().transformer_config(layout, **{**topk_overrides(self.dynamoe), **kwargs})

    def build(self, config: TransformerConfig, *, vp_stage: Optional[int] = None) -> GPTModel:
        """This stage's top-k GPTModel."""
        return build_topk_model(self.architecture, config, self.dynamoe, vp_stage=vp_stage)

    def scalars(self, model) -> Dict[str, float]:
        """TensorBoard: the FFN fraction of the last forward (k / S, the drawn k)."""
        routers = [r for chunk in model for r in topk_routers(chunk)] \
            if isinstance(model, (list, tuple, torch.nn.ModuleList)) else topk_routers(model)
        if not routers:
            return {}
        return {"topk/ffn-compute-fraction":
                sum(r.topk / r.num_experts for r in routers) / len(routers)}


def topk_routers(model) -> list:
    """Every TopKShellRouter of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, TopKShellRouter)]


def set_topk(model, k: int) -> None:
    """Route every token to k shells in every top-k layer (evaluation)."""
    routers = topk_routers(model)
    if not routers:
        raise ValueError("the model has no top-k router")
    for router in routers:
        if not 1 <= k <= router.num_experts:
            raise ValueError(f"k = {k} outside 1..{router.num_experts}")
        router.topk = k


def topk_state_from_dynamoe(state: Dict[str, torch.Tensor], dynamoe: DynaMoEConfig
                            ) -> Dict[str, torch.Tensor]:
    """A top-k model's state dict from a DynaMoE one: identical weights, routers replaced by a
    zero [S, H] top-k router (the difficulty router's bias has no counterpart)."""
    out = {}
    for key, value in state.items():
        if key.endswith("mlp.router.bias"):
            continue
        if key.endswith("mlp.router.weight"):
            value = torch.zeros(dynamoe.num_shells, value.shape[-1], dtype=torch.float32)
        out[key] = value
    return out


@dataclass(frozen=True)
class Variant:
    """One row of an evaluation: a model family at one setting."""

    family: str                     # 'dense', 'dynamoe', 'static' or 'topk'
    theta: Optional[float] = None   # dynamoe: global sensitivity
    level: Optional[int] = None     # static: nested level
    k: Optional[int] = None         # topk: shells per token
    budget: Optional[float] = None  # dynamoe: the --ffn-budget that chose theta
    layer_thetas: Optional[Tuple[float, ...]] = None  # dynamoe: per-layer budget solution

    @classmethod
    def for_budget(cls, target: float, solution, per_layer: bool) -> "Variant":
        """The DynaMoE variant of an FFN-budget `solution` (`evaluation.budget.solve_budget`
        for `target`): its global theta, and its per-layer thetas when solved per layer."""
        return cls("dynamoe", theta=solution.theta, budget=target,
                   layer_thetas=tuple(solution.sensitivities) if per_layer else None)

    @property
    def setting(self) -> str:
        """Human-readable setting, e.g. 'theta=0.50', 'level 2/4', 'k=2'."""
        if self.family == "dynamoe":
            text = "per-layer thetas" if self.layer_thetas else f"theta={self.theta:.3f}"
            return text + (f" (budget {self.budget:.2f})" if self.budget is not None else "")
        if self.family == "static":
            return f"level {self.level}"
        if self.family == "topk":
            return f"k={self.k}"
        return "-"


def apply_variant(model, variant: Variant) -> None:
    """Put a DynaMoE model (dynamoe / static / dense variants) or a top-k model at the
    variant's setting. Dense on a DynaMoE model = level K."""
    if variant.family == "topk":
        set_topk(model, variant.k)
        return
    if not dynamoe_layers(model):
        if variant.family != "dense":
            raise ValueError(f"a {variant.family} variant needs a DynaMoE model")
        return
    if variant.family == "static":
        set_static_level(model, variant.level)
    elif variant.family == "dynamoe":
        from megatron_dynamoe.dynamoe.control import set_layer_sensitivities

        set_static_level(model, None)
        if variant.layer_thetas:
            set_layer_sensitivities(model, variant.layer_thetas)
        else:
            set_sensitivity(model, variant.theta)
    else:
        set_static_level(model, None)
        set_sensitivity(model, 1.0)
