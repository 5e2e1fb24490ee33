"""`--attention-backend sdpa` (models.sdpa_attention.SDPAttention) against Megatron's
DotProductAttention: the module on its own (every mask Megatron's contract allows, GQA,
forward and gradients) and whole models at TP=1 and TP=2 (logits and every gradient), fp32."""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_processes

TOL = dict(rtol=1e-5, atol=1e-6)


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                  masked_softmax_fusion=False)
    fields.update(kw)
    return TransformerConfig(**fields)


def _pair(config, mask_type):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_dynamoe.models.sdpa_attention import SDPAttention

    kw = dict(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    return DotProductAttention(**kw), SDPAttention(**kw)


def _qkv(sq, sk, b=3, heads=4, groups=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, h, dim, generator=gen, requires_grad=True)
            for s, h in ((sq, heads), (sk, groups), (sk, groups))]


def _run(module, qkv, mask, out_grad):
    leaves = [t.detach().clone().requires_grad_() for t in qkv]
    out = module(*leaves, mask)
    out.backward(out_grad)
    return out.detach(), [t.grad for t in leaves]


def _causal(s):
    return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)


def _padding(b, s, seed=1):
    """Per-sample masks: causal, plus each sample's last few keys masked (but never a whole
    row, whose softmax would be 0 / 0 in both modules)."""
    gen = torch.Generator().manual_seed(seed)
    mask = _causal(s).repeat(b, 1, 1, 1)
    for i in range(b):
        keep = int(torch.randint(2, s, (1,), generator=gen))
        mask[i, :, :, keep:] = True
        mask[i, :, torch.arange(s), torch.arange(s)] = False  # every query sees itself
    return mask


MASKS = ["causal-by-type", "causal-mask", "per-sample-mask", "no-mask"]


@pytest.mark.parametrize("case", MASKS)
@pytest.mark.parametrize("groups", [2, 4], ids=["gqa", "mha"])
def test_module_equals_dot_product_attention(single_rank, case, groups):
    """Forward and the gradients of query, key and value, fp32, one rank."""
    from megatron.core.transformer.enums import AttnMaskType

    s, b = 12, 3
    mask_type = AttnMaskType.no_mask if case == "no-mask" else AttnMaskType.causal
    reference, sdpa = _pair(_config(num_query_groups=groups), mask_type)
    mask = {"causal-by-type": None, "causal-mask": _causal(s), "no-mask": None,
            "per-sample-mask": _padding(b, s)}[case]
    if case == "causal-by-type":
        # Megatron's module builds the causal mask itself only on CUDA; give it the mask.
        ref_mask = _causal(s)
    else:
        ref_mask = mask
    qkv = _qkv(s, s, b=b, groups=groups)
    grad = torch.randn(s, b, 64, generator=torch.Generator().manual_seed(7))
    want, want_grads = _run(reference, qkv, ref_mask, grad)
    got, got_grads = _run(sdpa, qkv, mask, grad)
    assert got.shape == want.shape == (s, b, 64)
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL)


def test_layer_scaling_and_explicit_scale_match(single_rank):
    """Query-key layer scaling (an fp16 range trick) and a given softmax scale."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dynamoe.models.sdpa_attention import SDPAttention

    config = _config(apply_query_key_layer_scaling=True, num_layers=4)
    kw = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal,
              attention_type="self", softmax_scale=0.3)
    qkv = _qkv(8, 8)
    grad = torch.randn(8, 3, 64)
    want, _ = _run(DotProductAttention(**kw), qkv, _causal(8), grad)
    got, _ = _run(SDPAttention(**kw), qkv, None, grad)
    torch.testing.assert_close(got, want, **TOL)


def test_unsupported_configurations_are_refused_in_one_line(single_rank):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dynamoe.models.sdpa_attention import SDPAttention

    config = _config(window_size=(4, 0))
    with pytest.raises(ValueError, match="sliding-window attention: pass --attention-backend "
                                         "local"):
        SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                     attention_type="self")
    module = SDPAttention(config=_config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
                          attention_type="self")
    q, k, v = _qkv(1, 8)
    with pytest.raises(ValueError, match="explicit attention_mask"):
        module(torch.randn(4, 3, 4, 16), k, v, None)
    assert module(q, k, v, None).shape == (1, 3, 64)  # one query (decoding): no mask needed


def _model_step(backend, layout, with_mask=True, seed=11):
    """Logits and parameter gradients of the tiny LLaMA (GQA: 4 heads, 2 groups) built with
    `backend`, on this rank's shards; the batch's causal mask, or none (`with_mask`)."""
    from megatron_dynamoe.runtime import transformer_impl
    from tests.builders import batch, build_dense

    transformer_impl.select_attention(backend)
    try:
        model = build_dense(seed=seed, layout=layout)
    finally:
        transformer_impl.select_attention(transformer_impl.DEFAULT_ATTENTION)
    assert type(model.decoder.layers[0].self_attention.core_attention).__name__ == {
        "sdpa": "SDPAttention", "local": "DotProductAttention"}[backend]
    data = batch(2, 16, seed=3)
    logits = model(data["tokens"], data["position_ids"],
                   data["attention_mask"] if with_mask else None)
    # A fixed random projection of this rank's (vocabulary-parallel at TP=2) logits: a loss
    # that needs no vocabulary-parallel cross-entropy and reaches every parameter.
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    (logits * weight).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _compare_backends(layout):
    """sdpa given the batch's causal mask, and causal by the layers' mask type (the training
    batches: no mask), against DotProductAttention given the mask."""
    want, want_grads = _model_step("local", layout)
    for with_mask in (True, False):
        got, got_grads = _model_step("sdpa", layout, with_mask)
        _assert_fp32_close(got, want, "logits")
        assert sorted(got_grads) == sorted(want_grads)
        for name in want_grads:
            _assert_fp32_close(got_grads[name], want_grads[name], name)


def _assert_fp32_close(got, want, name):
    """Equal up to fp32 rounding of sums that differ in order: 2e-6 of the tensor's largest
    magnitude (an embedding gradient sums every position's contribution)."""
    error = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= 2e-6 * scale + 1e-7, (name, error, scale)


def test_model_tp1_sdpa_equals_local(single_rank):
    from megatron_dynamoe.runtime.parallel import ParallelLayout

    _compare_backends(ParallelLayout())


def _tp2_worker(rank, world_size):
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    layout = ParallelLayout(tensor_model_parallel_size=2)
    initialize_parallel(layout)
    _compare_backends(layout)


@pytest.mark.multiproc
def test_model_tp2_sdpa_equals_local():
    """Two gloo ranks at TP=2 (one query group and two heads per rank): each rank's logits
    and gradient shards equal the local backend's."""
    run_processes(_tp2_worker, 2)


def test_backend_flags_reach_the_config():
    from megatron_dynamoe.training.config import parse_train_args

    assert parse_train_args(["--model", "tiny-llama"]).attention_backend == "sdpa"
    cfg = parse_train_args(["--model", "tiny-llama", "--attention-backend", "local"])
    assert cfg.attention_backend == "local"
    with pytest.raises(ValueError, match="--attention-backend 'flash': choose one of sdpa, "
                                         "local"):
        parse_train_args(["--model", "tiny-llama", "--attention-backend", "flash"])
