"""Check a training layout before launching it: divisibility, per-GPU memory, communication.

    python tools/plan_layout.py --model llama2-70b --nodes 8 --gpus-per-node 8 \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 \\
        --virtual-pipeline-model-parallel-size 5 --expert-model-parallel-size 8 \\
        --expert-tensor-parallel-size 1 --dynamoe-num-shells 8 --sequence-parallel \\
        --micro-batch-size 1 --global-batch-size 256 --seq-length 4096 \\
        --recompute-granularity selective --bf16 --gpu h100

Prints the resolved layout, the most loaded GPU's memory (weights, gradients, optimizer state,
activations) and each kind of communication per step. Exit 0: the layout fits. Exit 2 with one
`error:` line: it breaks a divisibility rule, or it does not fit the GPU memory; a nearby layout
that fits is then printed as ready-to-paste environment variables (for slurm/*.sh) and
launch/train.py flags. `--json` prints the same as one JSON object on stdout. The memory and
communication model is documented in megatron_dynamoe/planning/planner.py.

`--job convert` / `--job evaluate` estimate a conversion job instead (streaming conversion's
host memory, distributed MoEfy's and evaluation's GPU memory, and the time of each step at
the layout's TP x PP; model and assumptions in megatron_dynamoe/planning/conversion.py), as
slurm/convert_70b.sh and slurm/evaluate_70b.sh print them before they start; exit 2 when a
GPU step does not fit the GPU:

    python tools/plan_layout.py --job convert --model llama2-70b --gpu h100 \
        --tensor-model-parallel-size 8 --bf16 --host-memory-gib 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List

from megatron_dynamoe.cli.common import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    ArgumentParser,
    add_dynamoe_config_arguments,
    dynamoe_config_from_args,
    run_tool,
)
from megatron_dynamoe.utils.errors import ToolError
from megatron_dynamoe.planning.planner import (
    FRAGMENTATION,
    GIB,
    RESERVED_GIB,
    PlanRequest,
    plan,
    stage_memory,
)
from megatron_dynamoe.runtime.gpus import GPUS
from megatron_dynamoe.planning.search import env_assignments, suggest, train_flags
from megatron_dynamoe.runtime.parallel import ParallelLayout


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="architecture preset (e.g. llama2-70b)")
    p.add_argument("--dense", action="store_true", help="plan the dense model (no shells)")
    add_dynamoe_config_arguments(p, names=("num_shells", "level_fractions"))
    g = p.add_argument_group("cluster")
    g.add_argument("--num-gpus", type=COUNT, help="total GPUs (or --nodes x --gpus-per-node)")
    g.add_argument("--nodes", type=COUNT)
    g.add_argument("--gpus-per-node", type=COUNT)
    g.add_argument("--gpu", choices=sorted(GPUS),
                   help="the GPU, for its memory (and the layout ranking's speeds): "
                        + ", ".join(f"{k} {v.memory_gib:g} GiB" for k, v in
                                    sorted(GPUS.items())))
    g.add_argument("--gpu-memory-gib", type=POSITIVE, default=None,
                   help="memory of one GPU (default: --gpu's, else 80); on CPU: host memory "
                        "per rank")
    g.add_argument("--reserved-gib", type=NON_NEGATIVE, default=RESERVED_GIB,
                   help=f"per-rank memory outside the model's tensors (default {RESERVED_GIB:g}: "
                        f"CUDA context, NCCL buffers, workspaces; ~1 on CPU for the Python "
                        f"process)")
    g = p.add_argument_group("layout")
    g.add_argument("--tensor-model-parallel-size", type=COUNT, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=COUNT, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=COUNT, default=None)
    g.add_argument("--expert-model-parallel-size", type=COUNT, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=COUNT, default=None,
                   help="default: the TP size (Megatron's default)")
    g.add_argument("--context-parallel-size", type=COUNT, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction,
                   default=True, help="shard optimizer state over data parallel (default: on, "
                                      "as launch/train.py)")
    g.add_argument("--recompute-granularity", choices=("selective", "full"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    g.add_argument("--recompute-num-layers", type=COUNT, default=1)
    g.add_argument("--attention-backend", choices=("sdpa", "local"), default="sdpa",
                   help="as launch/train.py: sdpa (default; like Transformer Engine's, keeps "
                        "no s x s tensors) or local (Megatron's DotProductAttention)")
    g.add_argument("--distill", action="store_true",
                   help="count the distillation teacher (--dynamoe-distill-teacher): its "
                        "weights and, on the last stage, the step's logits")
    g = p.add_argument_group("batch and precision")
    g.add_argument("--micro-batch-size", type=COUNT, default=1)
    g.add_argument("--global-batch-size", type=COUNT, default=8)
    g.add_argument("--seq-length", type=COUNT, default=256)
    g.add_argument("--bf16", action="store_true", help="bf16 weights/activations with fp32 "
                                                       "main params (default: fp32, as on CPU)")
    g = p.add_argument_group("expert layout for time (DynaMoE)")
    g.add_argument("--level-profile", default=None,
                   help="share of tokens at each level, comma-separated (e.g. the level "
                        "counts tools/evaluate.py reports at your theta); default uniform")
    g.add_argument("--rank-expert-layouts", action="store_true",
                   help="list every expert grid (ETP x EP) for this attention layout, "
                        "fastest estimated FFN time first")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    j = p.add_argument_group("conversion and evaluation jobs (--job convert|evaluate)")
    j.add_argument("--job", choices=("train", "convert", "evaluate"), default="train",
                   help="train (default): check a training layout; convert / evaluate: "
                        "estimate that job's memory and time at the layout's TP x PP")
    j.add_argument("--host-memory-gib", type=POSITIVE, default=None,
                   help="host memory of the node (convert: decides whether the whole-model "
                        "logit check fits)")
    j.add_argument("--disk-gbps", type=POSITIVE, default=1.0,
                   help="checkpoint file system's sustained GB/s (default 1)")
    j.add_argument("--calibration-tokens", type=COUNT, default=64 * 512)
    j.add_argument("--eval-tokens", type=COUNT, default=10 ** 6,
                   help="tokens per evaluated row (evaluate; default 1M)")
    j.add_argument("--router-fit-memory-gib", type=POSITIVE, default=4.0)
    return p


def request_from_args(args) -> PlanRequest:
    """The PlanRequest the flags describe: the cluster, a `ParallelLayout` (a layout it refuses,
    such as VPP without PP > 1, is a ToolError `layout refused: ...`), CP, batch, precision."""
    from megatron_dynamoe.models.architectures import get_architecture

    if args.num_gpus is None:
        if not (args.nodes and args.gpus_per_node):
            raise ToolError("give --num-gpus N, or --nodes N and --gpus-per-node G")
        args.num_gpus = args.nodes * args.gpus_per_node
    elif args.nodes and args.gpus_per_node and args.nodes * args.gpus_per_node != args.num_gpus:
        raise ToolError(f"--num-gpus {args.num_gpus} != --nodes {args.nodes} x --gpus-per-node "
                        f"{args.gpus_per_node}")
    try:
        # Not cli.common.layout_from_args: the planner also takes VPP and expert TP.
        layout = ParallelLayout(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    except ValueError as e:
        raise ToolError(f"layout refused: {e}") from None
    dyn = None
    if not args.dense:
        dyn = dynamoe_config_from_args(args)
    return PlanRequest(
        model=args.model, arch=get_architecture(args.model), dynamoe=dyn,
        num_gpus=args.num_gpus, gpus_per_node=args.gpus_per_node, layout=layout,
        cp=args.context_parallel_size,
        micro_batch=args.micro_batch_size, global_batch=args.global_batch_size,
        seq_length=args.seq_length, sequence_parallel=args.sequence_parallel,
        distributed_optimizer=args.use_distributed_optimizer,
        recompute=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, bf16=args.bf16,
        flash_attention=args.attention_backend == "sdpa", distill=args.distill,
        gpu_memory_gib=(args.gpu_memory_gib or (GPUS[args.gpu].memory_gib if args.gpu
                                                else 80.0)),
        reserved_gib=args.reserved_gib)


def size(nbytes: float) -> str:
    """Bytes in GiB, or MiB / KiB for small models."""
    for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20)):
        if nbytes >= scale:
            return f"{nbytes / scale:9.2f} {unit}"
    return f"{nbytes / 1024:9.2f} KiB"


def count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def layout_line(r: PlanRequest) -> str:
    vpp = f" VPP={r.vpp}" if r.vpp else ""
    # Derived sizes only where the layout divides (a refused layout may not).
    dp = f"DP={r.dp}, expert DP={r.edp}" if r.dp and r.edp else "DP=?"
    micro = (f"{r.num_microbatches} micro-batches" if r.dp and r.edp and r.micro_batch
             and r.global_batch % (r.micro_batch * r.dp) == 0 else "micro-batches")
    return (f"TP={r.tp} PP={r.pp}{vpp} EP={r.ep} ETP={r.expert_tp} CP={r.cp} -> {dp}; "
            f"{micro} of {r.micro_batch} x "
            f"{r.seq_length} tokens per step; SP={'on' if r.sp else 'off'}, distributed "
            f"optimizer={'on' if r.distributed_optimizer else 'off'}, recompute="
            f"{r.recompute or 'none'}, {'bf16' if r.bf16 else 'fp32'}")


def alternatives(p) -> dict:
    """The most loaded stage's optimizer state with the distributed optimizer toggled, and its
    activations under each recomputation setting (what the other choices would cost)."""
    r, stage = p.request, p.worst.stage
    other = dataclasses.replace(r, distributed_optimizer=not r.distributed_optimizer)
    return {"optimizer": stage_memory(other, stage).optimizer,
            "activations": {rec or "none": stage_memory(dataclasses.replace(
                r, recompute=rec), stage).activations for rec in (None, "selective", "full")}}


def expert_layout_lines(p, profile, gpu: str, every: bool) -> List[str]:
    """The FFN critical path of the plan's expert grid, and the fastest grid that fits when
    another one is faster (all of them with `every`)."""
    from megatron_dynamoe.planning.critical_path import (
        layout_time,
        mean_ffn_fraction,
        rank_expert_layouts,
        rank_loads,
    )

    r = p.request
    mine = layout_time(r, profile, gpu)
    loads = ", ".join(f"{x:.3f}" for x in rank_loads(r.dynamoe, profile, r.ep))
    lines = [f"FFN critical path (level profile {', '.join(f'{x:.3g}' for x in profile)}: "
             f"mean FFN {mean_ffn_fraction(r.dynamoe, profile):.3f}): ETP={r.expert_tp} "
             f"EP={r.ep} ranks at {loads} x dense -> {mine.critical_path:.3f}; est. FFN "
             f"{mine.ffn_seconds:.2f} s + all-to-all {mine.all_to_all_seconds:.2f} s per step "
             f"({gpu})"]
    ranked = rank_expert_layouts(r, profile, gpu)
    best = next((t for t, q in ranked if q.fits), None)
    if best is not None and best.seconds < mine.seconds - 1e-9:
        lines.append(f"faster expert grid that fits: ETP={best.etp} EP={best.ep} (critical "
                     f"path {best.critical_path:.3f}, est. {best.seconds:.2f} s vs "
                     f"{mine.seconds:.2f} s): EP={best.ep} ETP={best.etp}")
    if every:
        lines.append("expert grids (fastest first): ETP EP critical-path est-s fits GiB")
        lines += [f"  {t.etp:3d} {t.ep:2d} {t.critical_path:13.3f} {t.seconds:6.2f} "
                  f"{'yes' if q.fits else 'no':>4} {q.required_gib:6.1f}" for t, q in ranked]
    return lines


def report(p) -> str:
    r, w = p.request, p.worst
    kind = f"DynaMoE, {r.dynamoe.num_shells} shells" if r.dynamoe else "dense"
    nodes = f" ({r.num_gpus // r.gpus_per_node} node(s) x {r.gpus_per_node})" \
        if r.gpus_per_node else ""
    lines = [f"model:   {r.model} ({kind}, {count(r.arch.num_parameters())} dense "
             f"parameters) on {r.num_gpus} GPUs{nodes}", f"layout:  {layout_line(r)}"]
    if p.problems:
        return "\n".join(lines + [f"invalid: {x}" for x in p.problems])
    lines.append(f"memory per GPU, pipeline stage {w.stage} (the most loaded), "
                 f"{count(w.params)} parameters:")
    alt = alternatives(p)
    dist = "without" if r.distributed_optimizer else "with"
    notes = {"optimizer": f"Adam state; {size(alt['optimizer']).strip()} {dist} the distributed "
                          f"optimizer",
             "activations": f"{p.in_flight} model chunk(s) in flight; recompute " + ", ".join(
                 f"{k}: {size(v).strip()}" for k, v in alt["activations"].items()),
             "weights": "bf16" if r.bf16 else "fp32", "grads": "fp32 main gradients",
             "teacher": "frozen dense teacher" + (" + the step's logits"
                                                  if w.stage == r.pp - 1 else "")}
    for name in ("weights", "grads", "optimizer", "activations", "teacher")[:5 if r.distill
                                                                            else 4]:
        lines.append(f"  {name:<12} {size(getattr(w, name))}   ({notes[name]})")
    lines.append(f"  {'total':<12} {size(w.total)}; with {FRAGMENTATION:.0%} "
                 f"fragmentation + {r.reserved_gib:g} GiB reserved: {p.required_gib:.2f} GiB of "
                 f"{r.gpu_memory_gib:g} GiB")
    lines.append("communication per step, sent by one GPU:")
    for name, value in p.communication.items():
        if value:
            lines.append(f"  {name:<28} {size(value)}")
    return "\n".join(lines)


def as_json(p, fallback, profile=None, gpu: str = "h100") -> dict:
    def plan_dict(q):
        out = dict(layout=dict(tp=q.request.tp, pp=q.request.pp, vpp=q.request.vpp,
                               ep=q.request.ep, etp=q.request.expert_tp, cp=q.request.cp,
                               dp=q.request.dp, expert_dp=q.request.edp,
                               micro_batch=q.request.micro_batch,
                               num_microbatches=None if q.problems
                               else q.request.num_microbatches,
                               recompute=q.request.recompute,
                               distributed_optimizer=q.request.distributed_optimizer),
                   problems=q.problems, fits=q.fits)
        if not q.problems:
            out.update(stages=[dataclasses.asdict(s) | {"total": s.total} for s in q.stages],
                       worst_stage=q.worst.stage, required_gib=q.required_gib,
                       alternatives=alternatives(q),
                       communication_bytes=q.communication, env=env_assignments(q.request),
                       flags=train_flags(q.request))
        return out

    result = plan_dict(p) | {"model": p.request.model, "num_gpus": p.request.num_gpus,
                             "gpu_memory_gib": p.request.gpu_memory_gib}
    result["suggestion"] = plan_dict(fallback) if fallback else None
    if profile is not None and not p.problems:
        from megatron_dynamoe.planning.critical_path import rank_expert_layouts

        result["level_profile"] = list(profile)
        result["expert_layouts"] = [dict(dataclasses.asdict(t), seconds=t.seconds,
                                         fits=q.fits, required_gib=q.required_gib)
                                    for t, q in rank_expert_layouts(p.request, profile, gpu)]
    return result


def _profile(args, request):
    from megatron_dynamoe.planning.critical_path import check_profile, uniform_profile

    if request.dynamoe is None:
        if args.level_profile or args.rank_expert_layouts:
            raise ToolError("--level-profile / --rank-expert-layouts need a DynaMoE model: "
                            "drop --dense")
        return None
    if args.level_profile is None:
        return uniform_profile(request.dynamoe)
    try:
        return check_profile(request.dynamoe, [float(x) for x in args.level_profile.split(",")])
    except ValueError as e:
        raise ToolError(f"--level-profile: {e}") from None


def job_report(args) -> int:
    """--job convert|evaluate: print the estimate (planning/conversion.py); ToolError when a
    GPU step needs more than the GPU has."""
    from megatron_dynamoe.models.architectures import get_architecture
    from megatron_dynamoe.planning.conversion import JobAssumptions, estimate

    gpu_name = args.gpu or "h100"
    gpu = GPUS[gpu_name]
    memory = args.gpu_memory_gib or gpu.memory_gib
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    arch = get_architecture(args.model)
    try:
        dyn = dynamoe_config_from_args(args)
    except ValueError as e:
        raise ToolError(str(e)) from None
    assume = JobAssumptions(disk_bytes_per_s=args.disk_gbps * 1e9,
                            calibration_tokens=args.calibration_tokens,
                            router_fit_bytes=args.router_fit_memory_gib * GIB)
    e = estimate(arch, dyn, gpu, tp, pp, bf16=args.bf16, assume=assume)
    dtype = "bf16" if args.bf16 else "fp32"

    def gib(nbytes: float) -> str:
        return f"{nbytes / GIB:.1f} GiB"

    lines = [f"{args.model}: {arch.num_parameters() / 1e9:.1f}B parameters, "
             f"{gib(e.source_bytes)} in bf16; models in {dtype} at TP={tp} PP={pp} on "
             f"{tp * pp} x {gpu_name} ({memory:g} GiB)"]
    gpu_bytes = e.moefy_gpu_bytes
    if args.job == "convert":
        check = ("" if args.host_memory_gib is None else
                 " (fits this node)" if e.logit_check_host_bytes <= 0.9 * args.host_memory_gib
                 * GIB else f" (more than 90 % of this node's {args.host_memory_gib:g} GiB: "
                            f"skip it with --no-logit-parity)")
        lines += [
            f"step 1, streaming hf-to-megatron (one CPU process): host memory "
            f"{gib(e.convert_host_bytes)}, {e.convert_seconds / 60:.0f} min at "
            f"{args.disk_gbps:g} GB/s; the final whole-model logit check needs "
            f"{gib(e.logit_check_host_bytes)} of host memory{check}",
            f"step 2, MoEfy on {tp * pp} GPUs: {gib(e.moefy_gpu_bytes)} per GPU, "
            f"{e.moefy_router_groups} router-fit group(s) per stage, about "
            f"{e.moefy_seconds / 60:.0f} min ({args.calibration_tokens} calibration tokens)"]
    else:
        gpu_bytes = e.evaluate_gpu_bytes
        lines.append(
            f"evaluation on {tp * pp} GPUs: {gib(e.evaluate_gpu_bytes)} per GPU (the "
            f"checkpoint and one baseline loaded at once), about "
            f"{e.evaluate_seconds_per_million_tokens * args.eval_tokens / 1e6 / 60:.1f} min "
            f"per row of {args.eval_tokens} tokens")
    lines.append(f"assumed: {args.disk_gbps:g} GB/s checkpoint I/O, "
                 f"{assume.efficiency:.0%} of {gpu_name} peak {dtype} FLOP/s per GPU, one batch "
                 f"through the pipeline at a time")
    print("\n".join(lines))
    if gpu_bytes > memory * GIB:
        hint = ("" if args.bf16 else "use --bf16 (MoEfy --bf16), or ") + \
            f"raise PP (a {tp} x {2 * pp} layout halves each GPU's share)"
        raise ToolError(f"the {args.job} job needs {gib(gpu_bytes)} per GPU but a {gpu_name} "
                        f"has {memory:g} GiB: {hint}")
    print(f"verdict: fits ({gib(gpu_bytes)} <= {memory:g} GiB per GPU)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.job != "train":
        return job_report(args)
    request = request_from_args(args)
    profile = _profile(args, request)
    gpu = args.gpu or "h100"
    p = plan(request)
    fallback = None
    if p.problems:
        reason = p.problems[0] + (f" (and {len(p.problems) - 1} more problem(s), see above)"
                                  if len(p.problems) > 1 else "")
    elif not p.fits:
        fallback = suggest(request)
        reason = (f"{request.model} needs {p.required_gib:.1f} GiB per GPU at "
                  f"{layout_line(request).split(';')[0]} but a GPU has "
                  f"{request.gpu_memory_gib:g} GiB")
    extra = (expert_layout_lines(p, profile, gpu, args.rank_expert_layouts)
             if profile is not None and not p.problems else [])
    if p.fits:
        print(json.dumps(as_json(p, None, profile, gpu), indent=1) if args.json else
              "\n".join([report(p), *extra]) + f"\nverdict: fits ({p.required_gib:.1f} GiB <= "
                                                f"{request.gpu_memory_gib:g} GiB per GPU)")
        return 0
    if args.json:
        print(json.dumps(as_json(p, fallback, profile, gpu), indent=1))
    else:
        print("\n".join([report(p), *extra]) + "\nverdict: REFUSED")
        if fallback:
            print(f"a layout that fits ({fallback.required_gib:.1f} GiB per GPU):\n"
                  f"  {layout_line(fallback.request)}\n"
                  f"  env:   {env_assignments(fallback.request)}\n"
                  f"  flags: {' '.join(train_flags(fallback.request))}")
    if fallback:
        reason += (f"; a layout that fits ({fallback.required_gib:.1f} GiB): "
                   f"{env_assignments(fallback.request)}")
    elif not p.problems:
        reason += "; no nearby layout fits: use more GPUs or a shorter sequence"
    raise ToolError(f"layout refused: {reason}")


def entry() -> None:
    """The console command (see setup.py) and `python tools/plan_layout.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
