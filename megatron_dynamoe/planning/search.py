"""Search the layouts near a refused one for one that fits, and render a layout as the
SLURM scripts' environment variables or as launch/train.py flags.

The neighbourhood is every combination of TP (within a node), PP (dividing the layers), VPP,
EP (dividing the shells), expert TP (1 or TP), micro batch (the requested one or smaller),
recomputation, with the distributed optimizer on (launch/train.py always uses it), at the
same GPU count, global batch and sequence length. Among the layouts that fit, the one that
changes the fewest knobs wins, then the one with the least pipeline bubble + recomputation
overhead, then the least memory.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import List, Optional

from megatron_dynamoe.planning.planner import Plan, PlanRequest, divisibility_problems, plan
from megatron_dynamoe.runtime.parallel import ParallelLayout

KNOBS = ("tp", "pp", "vpp", "ep", "etp", "micro_batch", "recompute", "distributed_optimizer")


def suggest(r: PlanRequest, max_tp: int = 8) -> Optional[Plan]:
    """A nearby layout that fits: fewest changed knobs, then least bubble + recomputation,
    then least memory. None when nothing in the neighbourhood fits."""
    a = r.arch
    tps = [t for t in (1, 2, 4, 8, 16) if t <= (r.gpus_per_node or max_tp)]
    pps = [p for p in range(1, min(a.num_layers, 32) + 1) if a.num_layers % p == 0]
    shells = r.dynamoe.num_shells if r.dynamoe else 1
    eps = [e for e in range(1, shells + 1) if shells % e == 0]
    mbs = sorted({r.micro_batch} | {m for m in (1, 2, 4) if m < r.micro_batch})
    best = None
    for tp, pp, ep, mb, rec in itertools.product(tps, pps, eps, mbs,
                                                 (None, "selective", "full")):
        vpps = [None] + [v for v in (2, 3, 4, 5, 8, 10) if pp > 1 and (a.num_layers // pp) % v == 0]
        for vpp, etp in itertools.product(vpps, sorted({1, tp})):
            layout = ParallelLayout(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp,
                                    virtual_pipeline_model_parallel_size=vpp,
                                    expert_model_parallel_size=ep,
                                    expert_tensor_parallel_size=etp)
            c = dataclasses.replace(r, layout=layout, micro_batch=mb, recompute=rec,
                                    recompute_method="uniform", recompute_num_layers=1,
                                    distributed_optimizer=True,
                                    sequence_parallel=r.sequence_parallel or tp > 1)
            if divisibility_problems(c):
                continue
            changed = sum(getattr(c, k) != getattr(r, k) for k in KNOBS if k != "etp") \
                + (c.expert_tp != r.expert_tp)
            p = plan(c)
            if p.fits:
                key = (changed, round(p.overhead, 4), p.required_gib)
                if best is None or key < best[0]:
                    best = (key, p)
    return best[1] if best else None


def env_assignments(r: PlanRequest) -> str:
    """The layout as the SLURM scripts' environment variables."""
    rec, lay = r.recompute or "none", r.layout
    parts = [f"TP={lay.tensor_model_parallel_size}", f"PP={lay.pipeline_model_parallel_size}",
             f"VPP={lay.virtual_pipeline_model_parallel_size or ''}",
             f"EP={lay.expert_model_parallel_size}", f"ETP={r.expert_tp}",
             f"MICRO_BATCH={r.micro_batch}", f"RECOMPUTE={rec}"]
    if r.recompute == "full":
        parts += [f"RECOMPUTE_METHOD={r.recompute_method}",
                  f"RECOMPUTE_NUM_LAYERS={r.recompute_num_layers}"]
    return " ".join(parts)


def train_flags(r: PlanRequest) -> List[str]:
    """The layout as launch/train.py flags."""
    lay = r.layout
    flags = ["--tensor-model-parallel-size", str(lay.tensor_model_parallel_size),
             "--pipeline-model-parallel-size", str(lay.pipeline_model_parallel_size),
             "--expert-model-parallel-size", str(lay.expert_model_parallel_size),
             "--micro-batch-size", str(r.micro_batch)]
    if r.expert_tp != lay.tensor_model_parallel_size:
        flags += ["--expert-tensor-parallel-size", str(r.expert_tp)]
    if lay.virtual_pipeline_model_parallel_size:
        flags += ["--virtual-pipeline-model-parallel-size",
                  str(lay.virtual_pipeline_model_parallel_size)]
    if r.sp:
        flags.append("--sequence-parallel")
    if r.recompute:
        flags += ["--recompute-granularity", r.recompute]
        if r.recompute == "full":
            flags += ["--recompute-method", r.recompute_method, "--recompute-num-layers",
                      str(r.recompute_num_layers)]
    return flags
