"""2 processes over gloo (TP=2 with sequence parallelism; EP=2 with the alltoall and the
allgather dispatcher) give the outputs and gradients of the 1-process model.

The reference run (1 process) writes its weights with dist_checkpointing; each layout loads
them through its own sharded_state_dict (Megatron's real resharding, which also checks that
shells are keyed by logical index under the balanced EP placement). Gradients are compared
in the global layout: each run copies its reduced gradients into the parameters and saves
them with dist_checkpointing, and the test compares the two checkpoints tensor by tensor.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.multiproc import run_processes

pytestmark = pytest.mark.multiproc

STEPS = 2          # step 0 computes labels (labelled forward), step 1 is routed
LOCAL_BATCH = 2
SEQ = 16


def _layout_run(rank, world_size, case, workdir):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_dynamoe.dynamoe.config import DynaMoEConfig
    from megatron_dynamoe.dynamoe.control import set_sensitivity, set_training_step
    from megatron_dynamoe.runtime.parallel import (
        ParallelLayout,
        destroy_parallel,
        initialize_parallel,
    )
    from tests.builders import batch, build_dense, build_dynamoe, moefied_state

    layout = ParallelLayout(tensor_model_parallel_size=case["tp"],
                            expert_model_parallel_size=case["ep"])
    initialize_parallel(layout)
    # Residual-relative soft labels over a range that spreads the tiny model's tokens.
    dyn = DynaMoEConfig(num_shells=4, label_fraction=0.5, label_tolerance=0.01,
                        label_tolerance_max=0.08)
    model = build_dynamoe(dyn, layout, sequence_parallel=case["tp"] > 1,
                          dispatcher=case["dispatcher"])
    weights = os.path.join(workdir, "weights")
    if case["name"] == "reference":
        model.load_state_dict(moefied_state(build_dense(seed=11), dyn, router_seed=5))
        os.makedirs(weights)
        dist_checkpointing.save(model.sharded_state_dict(), weights)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), weights))
    set_sensitivity(model, 0.5)
    model.train()

    # Two shards of data per step, split over the data-parallel ranks (the reference, and
    # TP=2 with DP=1, see both).
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    shards = range(dp_rank, 2, dp_size)
    outputs = []
    for step in range(STEPS):
        set_training_step(model, step)
        parts = [batch(LOCAL_BATCH, SEQ, seed=100 * step + shard) for shard in shards]
        data = {k: torch.cat([p[k] for p in parts]) if k != "attention_mask" else parts[0][k]
                for k in parts[0]}
        logits = model(data["tokens"], data["position_ids"], data["attention_mask"])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data["labels"].reshape(-1))
        loss.backward()
        outputs.append(logits.detach())

    # Reduce gradients as Megatron's DDP + finalize_model_grads would, then average over DP.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for param in model.parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        if getattr(param, "sequence_parallel", False) and case["tp"] > 1:
            dist.all_reduce(grad, group=tp_group)
        if getattr(param, "allreduce", True):
            dist.all_reduce(grad, group=parallel_state.get_data_parallel_group())
        else:
            dist.all_reduce(grad, group=parallel_state.get_expert_data_parallel_group())
        param.data.copy_(grad / dp_size)
    grads_dir = os.path.join(workdir, case["name"])
    if rank == 0:
        os.makedirs(grads_dir)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), grads_dir)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(torch.stack(outputs), os.path.join(workdir, f"{case['name']}-logits-{dp_rank}.pt"))
    dist.barrier()
    destroy_parallel()


CASES = [
    dict(name="tp2", tp=2, ep=1, dispatcher="alltoall"),
    dict(name="ep2-alltoall", tp=1, ep=2, dispatcher="alltoall"),
    dict(name="ep2-allgather", tp=1, ep=2, dispatcher="allgather"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("parity"))
    run_processes(_layout_run, 1, dict(name="reference", tp=1, ep=1, dispatcher="alltoall"),
                  workdir)
    return workdir


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_two_process_layout_matches_single_process(reference, case, single_rank):
    from megatron.core import dist_checkpointing

    run_processes(_layout_run, 2, case, reference)
    ref_logits = torch.load(os.path.join(reference, "reference-logits-0.pt"))
    if case["ep"] > 1:   # two data-parallel ranks, one half of the batch each
        got = torch.cat([torch.load(os.path.join(reference, f"{case['name']}-logits-{r}.pt"))
                         for r in range(2)], dim=1)
    else:
        got = torch.load(os.path.join(reference, f"{case['name']}-logits-0.pt"))
    assert got.shape == ref_logits.shape
    assert (got - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()

    ref_grads = dist_checkpointing.load_plain_tensors(os.path.join(reference, "reference"))
    grads = dist_checkpointing.load_plain_tensors(os.path.join(reference, case["name"]))
    assert sorted(grads) == sorted(ref_grads)
    router_keys = [k for k in ref_grads if "router" in k]
    expert_keys = [k for k in ref_grads if "experts" in k]
    assert router_keys and expert_keys
    for key, ref in ref_grads.items():
        if not torch.is_tensor(ref):
            continue
        scale = ref.abs().max().clamp_min(1e-12)
        assert (grads[key] - ref).abs().max() <= 1e-5 * scale, key
    for key in router_keys + expert_keys:
        assert ref_grads[key].abs().sum() > 0, f"{key}: no gradient reached it"
