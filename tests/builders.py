"""Small real models shared by the tests (single- and multi-process)."""

from __future__ import annotations

import torch

from megatron_dynamoe.models.architectures import get_architecture, transformer_config
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.moefy import moefy_state_dict
from megatron_dynamoe.models.builder import build_gpt_model, causal_attention_mask
from megatron_dynamoe.runtime.parallel import ParallelLayout

ARCH = get_architecture("tiny-llama")


def build_dense(seed: int = 0, layout: ParallelLayout = ParallelLayout(), **kw):
    """Dense tiny LLaMA GPTModel with weights drawn from `seed` (CPU init: layout-free)."""
    torch.manual_seed(seed)
    return build_gpt_model(ARCH, transformer_config(ARCH, layout, **kw))


def build_dynamoe(dyn: DynaMoEConfig, layout: ParallelLayout = ParallelLayout(),
                  sequence_parallel: bool = False, dispatcher: str = "alltoall",
                  parallel_output: bool = False):
    """DynaMoE tiny LLaMA GPTModel at `layout` (weights to be loaded by the caller)."""
    config = transformer_config(ARCH, layout, dyn, sequence_parallel=sequence_parallel,
                                moe_token_dispatcher_type=dispatcher)
    return build_gpt_model(ARCH, config, dyn, parallel_output=parallel_output)


def moefied_state(dense, dyn: DynaMoEConfig, router_seed=None):
    """DynaMoE state dict from a dense TP=1 model; random routers when `router_seed` is set
    (so that tokens land on different levels)."""
    state = moefy_state_dict(dense.state_dict(), dyn, gated=ARCH.gated)
    if router_seed is not None:
        gen = torch.Generator().manual_seed(router_seed)
        for key in list(state):
            if key.endswith("router.weight"):
                state[key] = torch.randn(state[key].shape, generator=gen)
            elif key.endswith("router.bias"):
                state[key] = 0.1 * torch.randn(state[key].shape, generator=gen)
    return state


def tiny_smollm2_pair(dyn: DynaMoEConfig, seed: int = 11, router_seed: int = 4):
    """(dense model, DynaMoE state dict, router generator) of the tiny SmolLM2-vocabulary
    LLaMA the tool tests evaluate: the DynaMoE state MoEfied from the dense model with small
    random routers (0.1 x N(0, 1), so that tokens land on different levels at theta < 1); the
    generator continues after the routers, for callers that derive more weights."""
    arch = get_architecture("tiny-smollm2")
    torch.manual_seed(seed)
    dense = build_gpt_model(arch, transformer_config(arch))
    state = moefy_state_dict(dense.state_dict(), dyn, gated=True)
    gen = torch.Generator().manual_seed(router_seed)
    for key in state:
        if key.endswith("router.weight"):
            state[key] = 0.1 * torch.randn(state[key].shape, generator=gen)
    return dense, state, gen


def save_tiny_smollm2_pair(root, dyn: DynaMoEConfig):
    """`tiny_smollm2_pair` saved as checkpoints `root/dense` and `root/dynamoe` (model.json
    with the architecture and `dyn`); returns (the DynaMoE model, its state, the generator)."""
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint

    arch = get_architecture("tiny-smollm2")
    dense, state, gen = tiny_smollm2_pair(dyn)
    save_checkpoint(dense, str(root / "dense"), CheckpointInfo(arch, None, {}))
    model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn), dyn)
    model.load_state_dict(state)
    save_checkpoint(model, str(root / "dynamoe"), CheckpointInfo(arch, dyn, {}))
    return model, state, gen


def batch(batch_size: int = 2, seq_len: int = 16, seed: int = 0):
    """Random tokens / positions / causal mask / labels for the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARCH.vocab_size, (batch_size, seq_len), generator=gen)
    labels = torch.randint(0, ARCH.vocab_size, (batch_size, seq_len), generator=gen)
    positions = torch.arange(seq_len).expand(batch_size, seq_len)
    return dict(tokens=tokens, position_ids=positions,
                attention_mask=causal_attention_mask(seq_len), labels=labels)


def synthetic_source(seq_len: int = 32, rows: int = 64, vocab: int = ARCH.vocab_size, seed: int = 0):
    """A deterministic BatchSource (position -> micro-batch) over a fixed token table whose odd
    positions copy the even ones, so a small model can learn it (loss must fall)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (rows, seq_len + 1), generator=gen)
    table[:, 1::2] = table[:, 0::2][:, : table[:, 1::2].shape[1]]
    mask = causal_attention_mask(seq_len)

    def source(position: int, micro_batch_size: int):
        chunk = torch.stack([table[(position + i) % rows] for i in range(micro_batch_size)])
        return dict(tokens=chunk[:, :-1], labels=chunk[:, 1:],
                    loss_mask=torch.ones(micro_batch_size, seq_len),
                    position_ids=torch.arange(seq_len).expand(micro_batch_size, seq_len),
                    attention_mask=mask)

    return source
