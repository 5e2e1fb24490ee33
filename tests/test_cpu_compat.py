"""The CPU compatibility layer: each accommodation, and Megatron's training machinery on it."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_dynamoe.runtime import cpu_compat
from tests.multiproc import run_processes

pytestmark = pytest.mark.usefixtures("single_rank")


def test_applied_on_cpu_with_documented_accommodations():
    assert not torch.cuda.is_available()
    assert cpu_compat.is_applied()
    assert cpu_compat.apply() is True  # idempotent
    for key in ("torch.cuda.current_device", "torch.cuda.synchronize", "tensor_parallel.random",
                "token_dispatcher.maybe_move_tensor_to_cpu",
                "megatron.core.pipeline_parallel.schedules.torch",
                "tensor_parallel.mappings.torch.distributed"):
        assert key in cpu_compat.ACCOMMODATIONS, key
    assert torch.cuda.current_device() == torch.device("cpu")


def test_cuda_literals_rewritten_only_inside_megatron_modules():
    from megatron.core.pipeline_parallel import schedules

    counter = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert counter.device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # classes pass through untouched
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # the rest of the process is unchanged


def test_cuda_type_strings_only_inside_the_checks():
    from megatron.core.optimizer import clip_grads, optimizer

    assert torch.ones(1).type() == "torch.FloatTensor"
    # the optimizer module sees the wrapped function too
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=total)
    coeff = 0.5 / (total + 1e-6)
    for p, g in zip(params, grads):
        assert torch.allclose(p.grad, g * coeff, rtol=1e-6)
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_rng_tracker_forks_cpu_generator_reproducibly():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("test-stream", 4321)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    with tracker.fork("test-stream"):
        first = torch.randn(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tracker.fork("test-stream"):
        second = torch.randn(4)  # the stream continues, not restarts
    expected = torch.Generator().manual_seed(4321)
    assert torch.equal(first, torch.randn(4, generator=expected))
    assert torch.equal(second, torch.randn(4, generator=expected))
    with pytest.raises(Exception, match="already exists"):
        tracker.add("other", 4321)
    # Leave the model-parallel streams as initialize_parallel made them.
    mrandom.model_parallel_cuda_manual_seed(1234)


def test_schedule_ddp_distributed_optimizer_step_matches_torch_adam():
    """One Megatron training step (schedule + DDP + DistributedOptimizer + clipping) on CPU
    equals the same step done by hand with torch.optim.Adam."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.builders import batch, build_dense

    model = build_dense(seed=21)
    reference = build_dense(seed=21)
    config = model.config
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True), module=model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.05,
                                 use_distributed_optimizer=True, bf16=False, fp16=False)
    optimizer = get_megatron_optimizer(opt_config, [ddp])

    micro = [batch(2, 16, seed=s) for s in range(2)]

    def forward_step(data_iterator, module):
        data = next(data_iterator)
        per_token = module(data["tokens"], data["position_ids"], data["attention_mask"],
                           labels=data["labels"])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return per_token, loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
        num_microbatches=2, seq_length=16, micro_batch_size=2, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    assert ok

    # By hand: mean of the micro-batch losses, global-norm clipping, torch Adam.
    ref_losses = []
    for data in micro:
        logits = reference(data["tokens"], data["position_ids"], data["attention_mask"])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data["labels"].reshape(-1))
        (loss / 2).backward()
        ref_losses.append(loss.detach())
    assert torch.allclose(torch.stack([l["lm loss"] for l in losses]), torch.stack(ref_losses),
                          rtol=1e-6)
    params = [p for p in reference.parameters()]
    ref_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    assert grad_norm == pytest.approx(ref_norm, rel=1e-5)
    assert ref_norm > 0.05  # clipping really happened
    torch.nn.utils.clip_grad_norm_(params, 0.05)
    for (name, p), q in zip(model.named_parameters(), params):
        # DDP's grad buffer, clipped in place by the optimizer.
        assert torch.allclose(p.main_grad, q.grad, rtol=1e-4, atol=1e-7 * 0.05), name
    adam = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    adam.step()
    for (name, p), q in zip(model.named_parameters(), params):
        # A first Adam step is ~lr * sign(g): grads equal to 1e-4 relative can still move
        # elements with |g| near eps by a few 1e-6, hence atol = 1e-3 x lr.
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-5), name


def _uneven_collectives(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    from megatron_dynamoe.runtime.parallel import (
        ParallelLayout,
        destroy_parallel,
        initialize_parallel,
    )

    initialize_parallel(ParallelLayout(tensor_model_parallel_size=2))
    group = parallel_state.get_tensor_model_parallel_group()
    sizes = [3, 5]
    x = torch.full((sizes[rank], 4), float(rank + 1), requires_grad=True)
    gathered = gather_from_sequence_parallel_region(x, group=group, output_split_sizes=sizes)
    expected = torch.cat([torch.full((3, 4), 1.0), torch.full((5, 4), 2.0)])
    assert torch.equal(gathered, expected)
    # Backward is an uneven reduce-scatter: each rank gets the sum of its rows' grads.
    weights = torch.arange(8.0).unsqueeze(1).expand(8, 4) * (rank + 1)
    (gathered * weights).sum().backward()
    rows = torch.arange(8.0).unsqueeze(1).expand(8, 4) * 3  # sum over ranks of (rank+1)
    own = rows[:3] if rank == 0 else rows[3:]
    assert torch.equal(x.grad, own)
    dist.barrier()
    destroy_parallel()


@pytest.mark.multiproc
def test_uneven_gather_and_reduce_scatter_over_gloo():
    run_processes(_uneven_collectives, 2)


def _reinitialise(rank, world_size):
    import os

    from megatron.core import parallel_state

    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    def threads():
        return len(os.listdir(f"/proc/{os.getpid()}/task"))

    layouts = [ParallelLayout(tensor_model_parallel_size=2), ParallelLayout(),
               ParallelLayout(expert_model_parallel_size=2)] * 2
    counts = []
    for layout in layouts:
        initialize_parallel(layout)
        counts.append(threads())
        # The new groups work: a sum over this layout's tensor-parallel group.
        x = torch.tensor([float(rank + 1)])
        dist.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())
        assert x.item() == (3.0 if layout.tensor_model_parallel_size == 2 else rank + 1.0)
    # The same layout again holds the same threads: the previous groups were destroyed, not
    # only forgotten (each gloo group keeps two threads until it is destroyed).
    assert counts[3:] == counts[:3], counts


@pytest.mark.multiproc
def test_reinitialising_the_layout_releases_the_previous_groups():
    run_processes(_reinitialise, 2)


def test_cuda_literal_proxy_follows_a_replaced_torch_function(monkeypatch):
    # A tool that replaces a torch function for a while (a profiler, a test's monkeypatch)
    # must not leave Megatron's modules calling the replacement after it is undone.
    from megatron_dynamoe.runtime.cpu_compat import _CpuTorchProxy

    proxy = _CpuTorchProxy()
    original = torch.zeros
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "zeros", counting)
        assert proxy.zeros(2, device="cuda").device.type == "cpu" and len(calls) == 1
    assert proxy.zeros(3, device="cuda").shape == (3,) and len(calls) == 1
