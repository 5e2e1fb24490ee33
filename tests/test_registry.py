"""One model-family registry: what a checkpoint's metadata says -> the family and its provider,
for the trainer, the evaluation and the tools alike."""

from __future__ import annotations

import pytest

from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.models.architectures import get_architecture
from megatron_dynamoe.models.registry import FAMILIES, family_of, provider_for, with_family

ARCH = get_architecture("tiny-llama")
DYN = DynaMoEConfig()


def _adaptive_info():
    from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider

    return AdaptiveMoEProvider(ARCH, AdaptiveGatingConfig(num_experts=4)).checkpoint_info({})


@pytest.mark.parametrize("info,family", [
    (None, "dense"),
    (CheckpointInfo(ARCH, None, {}), "dense"),
    (CheckpointInfo(ARCH, DYN, {}), "dynamoe"),
    (CheckpointInfo(ARCH, DYN, {"model_family": "topk"}), "topk"),
    (CheckpointInfo(ARCH, DYN, {"model_provider": "topk"}), "topk"),      # trainer, before
    (CheckpointInfo(ARCH, None, {"model_provider": "dynamoe"}), "dense"),  # dense, trained
    (CheckpointInfo(ARCH, None, {"model_family": "dynamoe"}), "dense"),    # what it holds wins
])
def test_family_of_checkpoint_metadata(info, family):
    assert family_of(info) == family


def test_adaptive_checkpoints_are_their_own_family():
    info = _adaptive_info()
    assert family_of(info) == "adaptive"
    assert family_of(with_family(info, "dense")) == "adaptive"


def test_each_family_gets_its_provider_which_names_the_family_back():
    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider
    from megatron_dynamoe.baselines.topk import TopKProvider
    from megatron_dynamoe.models.builder import ModelProvider

    infos = {"dense": CheckpointInfo(ARCH, None, {}), "dynamoe": CheckpointInfo(ARCH, DYN, {}),
             "topk": with_family(CheckpointInfo(ARCH, DYN, {}), "topk"),
             "adaptive": _adaptive_info()}
    assert sorted(infos) == sorted(FAMILIES)
    kinds = {"dense": ModelProvider, "dynamoe": ModelProvider, "topk": TopKProvider,
             "adaptive": AdaptiveMoEProvider}
    for family, info in infos.items():
        provider = provider_for(info)
        assert type(provider) is kinds[family], family
        assert provider.family == family
        assert family_of(with_family(info, provider.family)) == family
    with pytest.raises(ValueError, match="unknown model family 'mamba'"):
        provider_for(infos["dense"], "mamba")


def test_the_trainer_entry_point_asks_the_registry():
    from megatron_dynamoe.baselines.topk import TopKProvider
    from megatron_dynamoe.training.run import model_provider

    assert isinstance(model_provider(with_family(CheckpointInfo(ARCH, DYN, {}), "topk")),
                      TopKProvider)
