"""DynaMoE GPTModel on a CUDA device against the CPU fp32 reference (run where a GPU is).

CI has no GPU, so this is a check to run by hand on a GPU machine, not a unit test. On one
process it builds the 2-layer tiny LLaMA, MoEfies it with seeded routers, and compares:

- fp32 on the GPU vs fp32 on the CPU, routed (theta = 0.6) and labelled training forward:
  logits, loss, every gradient, and each layer's levels and tokens per expert (identical);
- bf16 weights on the GPU (routers stay fp32) vs fp32 on the GPU: under 5 % of the tokens'
  levels moved (a bf16 input may carry a token across a threshold), and with every token at
  static level 2 a logit error within twice what bf16 does to the dense model;
- theta = 1 in bf16 on the GPU equals the dense bf16 model on the GPU;
- the router fit (dynamoe/router_fit.py) on the GPU vs the CPU: same fitted cross-entropy.

    python bench/check_gpu.py    # one JSON line; exit 1 when a check fails (the CPU reference
                                 # runs in a subprocess that sees no GPU)
    python bench/check_gpu.py --reference ref.pt   # only that CPU half, any machine, seconds
                                                   # (a test runs it)

Without a CUDA device it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

from megatron_dynamoe.runtime.upstream_warnings import filter_upstream_warnings

# Megatron-Core's 'TE / Apex not installed' import warnings would bury the one line this
# prints without a GPU.
filter_upstream_warnings()

from megatron_dynamoe.models.architectures import get_architecture, transformer_config
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.moefy import moefy_state_dict
from megatron_dynamoe.dynamoe.router_fit import fit_routers
from megatron_dynamoe.models.builder import build_gpt_model, causal_attention_mask
from megatron_dynamoe.dynamoe.control import (
    dynamoe_layers,
    set_sensitivity,
    set_static_level,
    set_training_step,
)
from megatron_dynamoe.runtime.device import misplaced_tensors
from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

ARCH = get_architecture("tiny-llama")
DYN = DynaMoEConfig(num_shells=8, label_tolerance=0.01, label_tolerance_max=0.08)


def _batch(device, seed=0, batch_size=4, seq_len=64):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARCH.vocab_size, (batch_size, seq_len), generator=gen)
    labels = torch.randint(0, ARCH.vocab_size, (batch_size, seq_len), generator=gen)
    positions = torch.arange(seq_len).expand(batch_size, seq_len)
    return {k: v.to(device) for k, v in dict(
        tokens=tokens, labels=labels, position_ids=positions,
        attention_mask=causal_attention_mask(seq_len)).items()}


def _states():
    torch.manual_seed(11)
    # Megatron's CPU initialisation in both processes, so the GPU run and the CPU reference
    # start from the same random weights (the model is then placed on the policy's device).
    dense = build_gpt_model(ARCH, transformer_config(ARCH, use_cpu_initialization=True))
    state = moefy_state_dict(dense.state_dict(), DYN, gated=ARCH.gated)
    gen = torch.Generator().manual_seed(5)
    for key in list(state):
        if key.endswith("router.weight"):
            state[key] = 0.3 * torch.randn(state[key].shape, generator=gen)
    return dense.state_dict(), state


def _model(state, device, dtype, dynamoe=True):
    # Built by the device policy (GPU initialisation, then everything Megatron or we leave
    # on the host placed on the GPU); the check fails if anything stayed behind.
    config = transformer_config(ARCH, dynamoe=DYN if dynamoe else None, params_dtype=dtype)
    model = build_gpt_model(ARCH, config, DYN if dynamoe else None)
    model.load_state_dict(state, strict=False)
    left = misplaced_tensors(model, device)
    if left:
        raise AssertionError(f"not on {device}: {left[:5]}")
    return model


def _run(model, data, theta, labelled):
    """Logits, loss, grads and per-layer routing of one forward(+backward)."""
    model.zero_grad(set_to_none=True)
    set_sensitivity(model, theta)
    model.train(labelled)
    set_training_step(model, 0)
    logits = model(data["tokens"], data["position_ids"], data["attention_mask"])
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                           data["labels"].reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
             if p.grad is not None}
    routing = [(l.last_stats["level_counts"].cpu(), l.last_stats["tokens_per_expert"].cpu())
               for l in dynamoe_layers(model)]
    return logits.detach().float().cpu(), float(loss.detach()), grads, routing


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _reference(path: str) -> None:
    """CPU fp32 results, in a process that sees no GPU (so Megatron runs its CPU path)."""
    initialize_parallel(ParallelLayout(), device="cpu")
    _, state = _states()
    data = _batch("cpu")
    runs = {labelled: _run(_model(state, "cpu", torch.float32), data, 0.6, labelled)
            for labelled in (False, True)}
    fits = fit_routers(_model(state, "cpu", torch.float32),
                       [_batch("cpu", seed=s) for s in (1, 2)], steps=200)
    torch.save(dict(runs=runs, fit_losses=[f.loss for f in fits]), path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", metavar="PATH",
                        help="only compute the CPU fp32 reference (routed and labelled runs, "
                             "router fit) and save it to PATH; needs no GPU (the check runs "
                             "this in a subprocess that sees none)")
    args = parser.parse_args(argv)
    if args.reference:
        _reference(args.reference)
        return 0
    if not torch.cuda.is_available():
        print("check_gpu: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "reference.pt")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--reference", path],
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), check=True)
        reference = torch.load(path, weights_only=False)
    initialize_parallel(ParallelLayout(), device="cuda")
    dense_state, state = _states()
    gpu_data = _batch("cuda")
    results, failures = {"device": torch.cuda.get_device_name()}, []

    def check(name, ok, value):
        results[name] = value
        if not ok:
            failures.append(name)

    dense_fp32 = _run(_model(dense_state, "cuda", torch.float32, dynamoe=False), gpu_data, 1.0,
                      False)
    dense_bf16 = _run(_model(dense_state, "cuda", torch.bfloat16, dynamoe=False), gpu_data,
                      1.0, False)
    dense_bf16_error = _rel(dense_bf16[0], dense_fp32[0])
    results["dense_bf16_vs_fp32_logits_rel"] = dense_bf16_error
    for labelled in (False, True):
        tag = "labelled" if labelled else "routed"
        ref = reference["runs"][labelled]
        gpu = _run(_model(state, "cuda", torch.float32), gpu_data, 0.6, labelled)
        check(f"fp32_{tag}_logits_rel", _rel(gpu[0], ref[0]) < 1e-4, _rel(gpu[0], ref[0]))
        check(f"fp32_{tag}_loss_rel", abs(gpu[1] - ref[1]) / ref[1] < 1e-5,
              abs(gpu[1] - ref[1]) / ref[1])
        worst = max(_rel(gpu[2][n], ref[2][n]) for n in ref[2] if ref[2][n].abs().max() > 0)
        check(f"fp32_{tag}_grads_rel", worst < 1e-3 and set(gpu[2]) == set(ref[2]), worst)
        same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(gpu[3], ref[3]))
        check(f"fp32_{tag}_routing_identical", same, same)

        bf16 = _run(_model(state, "cuda", torch.bfloat16), gpu_data, 0.6, labelled)
        # Not a check: a token that bf16 carries to another level changes its logits by the
        # width of a level, and the max-norm error is that token's.
        results[f"bf16_{tag}_logits_rel_max_over_tokens"] = _rel(bf16[0], gpu[0])
        moved = sum(float((a[0] - b[0]).abs().sum()) / 2 for a, b in zip(bf16[3], ref[3]))
        total = sum(float(b[0].sum()) for b in ref[3])
        check(f"bf16_{tag}_levels_moved_fraction", moved / total < 0.05, moved / total)

    # The shells' arithmetic in bf16, with no token changing level: static level 2.
    static = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(state, "cuda", dtype)
        set_static_level(model, 2)
        static[dtype] = _run(model, gpu_data, 0.6, False)[0]
    error = _rel(static[torch.bfloat16], static[torch.float32])
    check("bf16_static_level2_logits_rel", error <= 2 * dense_bf16_error, error)

    dense = _run(_model(dense_state, "cuda", torch.bfloat16, dynamoe=False), gpu_data, 1.0,
                 True)
    full = _run(_model(state, "cuda", torch.bfloat16), gpu_data, 1.0, True)
    check("bf16_theta1_vs_dense_logits_rel", _rel(full[0], dense[0]) < 1e-2,
          _rel(full[0], dense[0]))

    fits = fit_routers(_model(state, "cuda", torch.float32),
                       [_batch("cuda", seed=s) for s in (1, 2)], steps=200)
    gap = max(abs(a.loss - b) for a, b in zip(fits, reference["fit_losses"]))
    check("router_fit_loss_cpu_vs_gpu", gap < 1e-3, gap)

    results["failures"] = failures
    print(json.dumps(results))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
