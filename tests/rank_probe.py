"""Run by a real launcher under test (tests/test_deepspeed_launcher.py, tests/test_srun_mpi.py):
discover the launcher with `launch_env.prepare()`, start torch.distributed and Megatron's groups
on the CPU (gloo) with `initialize_parallel`, all-reduce the rank, and write what this rank saw
to PROBE_DIR/rank<RANK>.json. The arguments the launcher gave are recorded as `raw_argv`, those
left after `prepare()` (which drops an appended `--local_rank=N`) as `argv`. PROBE_MEGATRON=0
starts plain torch.distributed (gloo) instead of Megatron's groups, for launcher tests that only
need the rendezvous (it saves each rank the megatron.core import)."""

import json
import os
import sys


from megatron_dynamoe.runtime import launch_env


def main():
    info, argv = launch_env.prepare()
    import torch
    import torch.distributed as dist

    megatron = os.environ.get("PROBE_MEGATRON", "1") != "0"
    if megatron:
        from megatron_dynamoe.runtime.parallel import (
            ParallelLayout,
            destroy_parallel,
            initialize_parallel,
        )

        initialize_parallel(ParallelLayout(), device="cpu")
    else:
        dist.init_process_group("gloo")  # env:// from the exported torchrun contract
    total = torch.tensor([float(info.rank)])
    dist.all_reduce(total)
    record = dict(launcher=info.launcher, rank=info.rank, local_rank=info.local_rank,
                  world_size=info.world_size, local_world_size=info.local_world_size,
                  dist_rank=dist.get_rank(), dist_world_size=dist.get_world_size(),
                  rank_sum=total.item(), master=f"{info.master_addr}:{info.master_port}",
                  argv=argv, raw_argv=sys.argv[1:],
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    if megatron:
        destroy_parallel()
    else:
        dist.destroy_process_group()
    path = os.path.join(os.environ["PROBE_DIR"], f"rank{info.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
