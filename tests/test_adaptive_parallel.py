"""The adaptive router at EP=2 over gloo (2 processes; alltoall and allgather dispatchers,
dropless and with a capacity factor) gives the outputs and gradients of the 1-process model.

Each process handles one data shard per step as one micro-batch; the 1-process reference runs
both shards as two micro-batches, with Megatron's side-loss scale 1 / micro-batches (what its
schedule sets), so the load-balancing loss over top-1 decisions and the capacity, both
computed per micro-batch, mean the same thing in both runs. Weights travel through
dist_checkpointing (Megatron's resharding of the experts); gradients are reduced as
Megatron's DDP reduces them and compared tensor by tensor in the global layout.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.multiproc import run_processes

pytestmark = pytest.mark.multiproc

SHARDS = 2
LOCAL_BATCH = 2
SEQ = 16
STEPS = 2


def _gating(case):
    from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig

    return AdaptiveGatingConfig(num_experts=4, threshold=0.3, aux_loss_coeff=0.1,
                                capacity_factor=case.get("capacity"))


def _worker(rank, world_size, ep, cases, workdir):
    from megatron_dynamoe.runtime.parallel import (
        ParallelLayout,
        destroy_parallel,
        initialize_parallel,
    )

    initialize_parallel(ParallelLayout(expert_model_parallel_size=ep))
    for case in cases:   # one process launch for every case (imports cost ~10 s)
        _run_case(rank, ep, case, workdir)
    destroy_parallel()


def _run_case(rank, ep, case, workdir):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider, adaptive_layers
    from megatron_dynamoe.runtime.parallel import ParallelLayout
    from tests.builders import ARCH, batch

    layout = ParallelLayout(expert_model_parallel_size=ep)
    provider = AdaptiveMoEProvider(ARCH, _gating(case))
    dispatcher = case["dispatcher"] if ep > 1 else "alltoall"
    config = provider.transformer_config(layout, moe_token_dispatcher_type=dispatcher)
    torch.manual_seed(5)
    model = provider.build(config, parallel_output=False)
    weights = os.path.join(workdir, f"weights-{case['name']}")
    if ep == 1:
        with torch.no_grad():   # confident enough routers that tokens use 1 or 2 experts
            for layer in adaptive_layers(model):
                layer.router.weight.mul_(15.0)
        os.makedirs(weights)
        dist_checkpointing.save(model.sharded_state_dict(), weights)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), weights))
    model.train()

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    shards = list(range(dp_rank, SHARDS, dp_size))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(shards)))
    outputs, shares, dropped = [], [], 0
    for step in range(STEPS):
        for shard in shards:
            data = batch(LOCAL_BATCH, SEQ, seed=100 * step + shard)
            logits = model(data["tokens"], data["position_ids"], data["attention_mask"])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   data["labels"].reshape(-1))
            (loss / len(shards)).backward()
            outputs.append(logits.detach())
            for layer in adaptive_layers(model):
                shares.append(float(layer.router.last_stats["two_expert_share"]))
                dropped += int(layer.router.last_stats["dropped_assignments"])
    MoEAuxLossAutoScaler.main_loss_backward_scale = None

    for param in model.parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        if getattr(param, "allreduce", True):
            dist.all_reduce(grad, group=parallel_state.get_data_parallel_group())
        else:
            dist.all_reduce(grad, group=parallel_state.get_expert_data_parallel_group())
        param.data.copy_(grad / dp_size)
    tag = f"{case['name']}-ep{ep}"
    grads = os.path.join(workdir, tag)
    if rank == 0:
        os.makedirs(grads)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), grads)
    torch.save((outputs, shares, dropped), os.path.join(workdir, f"{tag}-out-{dp_rank}.pt"))
    dist.barrier()


CASES = [
    dict(name="ep2-alltoall", ep=2, dispatcher="alltoall", capacity=None),
    dict(name="ep2-allgather-capacity", ep=2, dispatcher="allgather", capacity=0.75),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("adaptive-parity"))
    run_processes(_worker, 1, 1, CASES, workdir)
    run_processes(_worker, 2, 2, CASES, workdir)
    return workdir


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ep2_matches_ep1(runs, case, single_rank):
    from megatron.core import dist_checkpointing

    name = case["name"]
    ref_out, ref_shares, ref_dropped = torch.load(os.path.join(runs, f"{name}-ep1-out-0.pt"))
    per_rank = [torch.load(os.path.join(runs, f"{name}-ep2-out-{r}.pt")) for r in range(2)]
    # reference order: (step, shard); rank r holds shard r of every step
    got = [per_rank[shard][0][step] for step in range(STEPS) for shard in range(SHARDS)]
    for ref, out in zip(ref_out, got):
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert 0.1 < sum(ref_shares) / len(ref_shares) < 0.9      # 1- and 2-expert tokens
    assert per_rank[0][2] + per_rank[1][2] == ref_dropped
    assert (ref_dropped > 0) == (case["capacity"] is not None)

    ref_grads = dist_checkpointing.load_plain_tensors(os.path.join(runs, f"{name}-ep1"))
    grads = dist_checkpointing.load_plain_tensors(os.path.join(runs, f"{name}-ep2"))
    assert sorted(grads) == sorted(ref_grads)
    router_keys = [k for k in ref_grads if k.endswith("router.weight")]
    expert_keys = [k for k in ref_grads if "experts" in k]
    assert router_keys and expert_keys
    for key, ref in ref_grads.items():
        if torch.is_tensor(ref):
            scale = ref.abs().max().clamp_min(1e-12)
            assert (grads[key] - ref).abs().max() <= 1e-5 * scale, key
    for key in router_keys + expert_keys:
        assert ref_grads[key].abs().sum() > 0, f"{key}: no gradient reached it"
