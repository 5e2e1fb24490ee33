"""Rank discovery for every launcher, from the environments the launchers really set (SLURM
variables as slurmd 22.05 exports them to an srun task and to the batch shell, with and without
its PMI plugins; Open MPI's as its mpirun sets them inside an allocation and inside an srun
step; the DeepSpeed launcher's as deepspeed/launcher/launch.py writes them), without launching
anything. tests/test_srun_mpi.py and tests/test_deepspeed_launcher.py run the real launchers."""

import sys

import pytest

from megatron_dynamoe.runtime import launch_env
from megatron_dynamoe.runtime.launch_env import (
    LaunchEnv,
    LaunchError,
    discover,
    expand_hostlist,
    export_to_environ,
    parse_tasks_per_node,
    slurm_master_port,
    strip_local_rank_argument,
)

# Task 1 of `srun` in job 4242, step 0, two nodes x 4 tasks, on the second node.
SRUN_TASK = {
    "SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
    "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}
# The batch shell of the same job: rank-like variables, but no step.
BATCH_SHELL = {k: v for k, v in SRUN_TASK.items() if "STEP" not in k} | {
    "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "none", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node-a", "MASTER_PORT": "29400",
            "GROUP_RANK": "1"}
DEEPSPEED = {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "16", "MASTER_ADDR": "10.0.0.1",
             "MASTER_PORT": "29500", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "8"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


# Recorded from slurm-wlm 22.05.8 (Debian 12) on 2026-11-30: `srun --mpi=pmi2 --ntasks=2 env` on
# the single-node test cluster of tests/test_slurm.py, task 1 (PATH, HOME, PWD, SHLVL and
# SLURM_CONF left out). SLURM's mpi/pmi2 plugin adds PMI_FD / PMI_JOBID / PMI_RANK / PMI_SIZE.
RECORDED_PMI2_TASK1 = {
    "PMI_FD": "13", "PMI_JOBID": "2.0", "PMI_RANK": "1", "PMI_SIZE": "2",
    "SLURMD_NODENAME": "localhost", "SLURM_CLUSTER_NAME": "local", "SLURM_CPUS_ON_NODE": "2",
    "SLURM_GTIDS": "0,1", "SLURM_JOBID": "2", "SLURM_JOB_CPUS_PER_NODE": "2",
    "SLURM_JOB_GID": "0", "SLURM_JOB_ID": "2", "SLURM_JOB_NAME": "bash",
    "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_PARTITION": "debug",
    "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
    "SLURM_LOCALID": "1", "SLURM_MPI_TYPE": "pmi2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost", "SLURM_NPROCS": "2", "SLURM_NTASKS": "2",
    "SLURM_PRIO_PROCESS": "0", "SLURM_PROCID": "1", "SLURM_SRUN_COMM_HOST": "127.0.0.1",
    "SLURM_SRUN_COMM_PORT": "44289", "SLURM_STEPID": "0", "SLURM_STEP_ID": "0",
    "SLURM_STEP_LAUNCHER_PORT": "44289", "SLURM_STEP_NODELIST": "localhost",
    "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
    "SLURM_SUBMIT_DIR": "/tmp/rec", "SLURM_SUBMIT_HOST": "vm", "SLURM_TASKS_PER_NODE": "2",
    "SLURM_TASK_PID": "8434", "SLURM_TOPOLOGY_ADDR": "localhost",
    "SLURM_TOPOLOGY_ADDR_PATTERN": "node", "SLURM_UMASK": "0022",
    "SLURM_WORKING_CLUSTER": "local:localhost:52791:9728:109", "SRUN_DEBUG": "3",
}
# The same task under `srun --mpi=none` (recorded likewise): the plugin's variables are the
# only difference (besides job ids and ports).
RECORDED_SLURM_TASK1 = {k: v for k, v in RECORDED_PMI2_TASK1.items()
                        if not k.startswith("PMI_") and k != "SLURM_MPI_TYPE"}
# What `srun --mpi=pmix` (mpi/pmix_v4, PMIx 4.2.2) and `srun --mpi=cray_shasta` added to task 1
# on the same cluster and day (22.05's cray_shasta sets PALS_* only; recent SLURM adds PMI_*).
RECORDED_PMIX_TASK1 = {
    "PMIX_BFROP_BUFFER_TYPE": "PMIX_BFROP_BUFFER_NON_DESC",
    "PMIX_DSTORE_21_BASE_PATH": "/tmp/dynamoe-slurm-1iojnwm8/spool/pmix.3.0//pmix_dstor_ds21_8466",
    "PMIX_DSTORE_ESH_BASE_PATH": "/tmp/dynamoe-slurm-1iojnwm8/spool/pmix.3.0//pmix_dstor_ds12_8466",
    "PMIX_GDS_MODULE": "ds21,ds12,hash", "PMIX_HOSTNAME": "vm", "PMIX_NAMESPACE": "slurm.pmix.3.0",
    "PMIX_RANK": "1", "PMIX_SECURITY_MODE": "native",
    "PMIX_SERVER_TMPDIR": "/tmp/dynamoe-slurm-1iojnwm8/spool/pmix.3.0/",
    "PMIX_SERVER_URI2": "pmix-server.8466;tcp4://127.0.0.1:54571",
    "PMIX_SERVER_URI21": "pmix-server.8466;tcp4://127.0.0.1:54571",
    "PMIX_SERVER_URI3": "pmix-server.8466;tcp4://127.0.0.1:54571",
    "PMIX_SERVER_URI4": "pmix-server.8466;tcp4://127.0.0.1:54571",
    "PMIX_SERVER_URI41": "pmix-server.8466;tcp4://127.0.0.1:54571", "PMIX_SYSTEM_TMPDIR": "/tmp",
    "PMIX_VERSION": "4.2.2rc2", "SLURM_MPI_TYPE": "pmix", "SLURM_PMIXP_ABORT_AGENT_PORT": "39561",
    "SLURM_PMIX_MAPPING_SERV": "(vector,(0,1,2))",
}
RECORDED_CRAY_SHASTA_TASK1 = {
    "PALS_APID": "4.0",
    "PALS_APINFO": "/tmp/dynamoe-slurm-1iojnwm8/spool/mpi_cray_shasta/4.0/apinfo",
    "PALS_NODEID": "0", "PALS_RANKID": "1",
    "PALS_SPOOL_DIR": "/tmp/dynamoe-slurm-1iojnwm8/spool/mpi_cray_shasta/4.0",
    "SLURM_MPI_TYPE": "cray_shasta",
}
# Recorded likewise: an `sbatch -n 2` script running `srun -n 1 mpirun --oversubscribe -np 2 env`
# (Open MPI 4.1.4, Debian): rank 1 inside the one-task step, which says SLURM_PROCID=0 of 1
# task (OMPI_MCA_*, OMPI_ARGV/COMMAND and the shell's own variables left out).
RECORDED_MPIRUN_IN_SRUN_RANK1 = {
    "HFI_NO_BACKTRACE": "1", "IPATH_NO_BACKTRACE": "1", "OMPI_APP_CTX_NUM_PROCS": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_COMM_WORLD_NODE_RANK": "1", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_FILE_LOCATION": "/tmp/ompi.vm.0/pid.8775/0/0", "OMPI_FIRST_RANKS": "0",
    "OMPI_NUM_APP_CTX": "1", "OMPI_UNIVERSE_SIZE": "1",
    "PMIX_BFROP_BUFFER_TYPE": "PMIX_BFROP_BUFFER_NON_DESC",
    "PMIX_DSTORE_21_BASE_PATH": "/tmp/ompi.vm.0/pid.8775/pmix_dstor_ds21_8775",
    "PMIX_DSTORE_ESH_BASE_PATH": "/tmp/ompi.vm.0/pid.8775/pmix_dstor_ds12_8775",
    "PMIX_GDS_MODULE": "ds21,ds12,hash", "PMIX_HOSTNAME": "vm", "PMIX_ID": "1320747009.1",
    "PMIX_NAMESPACE": "1320747009", "PMIX_RANK": "1", "PMIX_SECURITY_MODE": "native",
    "PMIX_SERVER_TMPDIR": "/tmp/ompi.vm.0/pid.8775",
    "PMIX_SERVER_URI2": "1320747008.0;tcp4://127.0.0.1:42341",
    "PMIX_SERVER_URI21": "1320747008.0;tcp4://127.0.0.1:42341",
    "PMIX_SERVER_URI3": "1320747008.0;tcp4://127.0.0.1:42341",
    "PMIX_SERVER_URI4": "1320747008.0;tcp4://127.0.0.1:42341",
    "PMIX_SERVER_URI41": "1320747008.0;tcp4://127.0.0.1:42341", "PMIX_SYSTEM_TMPDIR": "/tmp",
    "PMIX_VERSION": "4.2.2rc2", "SLURMD_NODENAME": "localhost", "SLURM_CLUSTER_NAME": "local",
    "SLURM_CPUS_ON_NODE": "2", "SLURM_DISTRIBUTION": "cyclic", "SLURM_GTIDS": "0",
    "SLURM_JOBID": "6", "SLURM_JOB_CPUS_PER_NODE": "2",
    "SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0": "2", "SLURM_JOB_GID": "0", "SLURM_JOB_ID": "6",
    "SLURM_JOB_NAME": "batch2.sh", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
    "SLURM_JOB_PARTITION": "debug", "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root",
    "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "SLURM_LOCALID": "0", "SLURM_NNODES": "1",
    "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_NODE_ALIASES": "(null)",
    "SLURM_NPROCS": "1", "SLURM_NTASKS": "1", "SLURM_PRIO_PROCESS": "0", "SLURM_PROCID": "0",
    "SLURM_SRUN_COMM_HOST": "127.0.0.1", "SLURM_SRUN_COMM_PORT": "43967", "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0", "SLURM_STEP_LAUNCHER_PORT": "43967", "SLURM_STEP_NODELIST": "localhost",
    "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1",
    "SLURM_SUBMIT_DIR": "/tmp/rec", "SLURM_SUBMIT_HOST": "vm", "SLURM_TASKS_PER_NODE": "1",
    "SLURM_TASK_PID": "8775", "SLURM_TOPOLOGY_ADDR": "localhost",
    "SLURM_TOPOLOGY_ADDR_PATTERN": "node", "SLURM_UMASK": "0022",
    "SLURM_WORKING_CLUSTER": "local:localhost:52791:9728:109", "SRUN_DEBUG": "3",
}


def two_node_task(procid: int, *, tasks_per_node: int = 2, job: int = 4243,
                  step: int = 0) -> dict:
    """RECORDED_SLURM_TASK1's variables for task `procid` of a step over two nodes, gpu007 and
    gpu008, with SLURM's default block distribution: what srun gives that task."""
    node, local = divmod(procid, tasks_per_node)
    world, hosts, name = 2 * tasks_per_node, "gpu[007-008]", f"gpu00{7 + node}"
    return RECORDED_SLURM_TASK1 | {
        "SLURMD_NODENAME": name, "SLURM_TOPOLOGY_ADDR": name, "SLURM_JOB_ID": str(job),
        "SLURM_JOBID": str(job), "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step),
        "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
        "SLURM_GTIDS": ",".join(str(node * tasks_per_node + i) for i in range(tasks_per_node)),
        "SLURM_NTASKS": str(world), "SLURM_NPROCS": str(world),
        "SLURM_STEP_NUM_TASKS": str(world), "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_NODELIST": hosts, "SLURM_NODELIST": hosts,
        "SLURM_STEP_NODELIST": hosts, "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x2)",
        "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x2)", "SLURM_JOB_CPUS_PER_NODE": "2(x2)"}


def with_pmi2(task: dict) -> dict:
    """+ what srun --mpi=pmi2 adds (as recorded above)."""
    return task | {"PMI_FD": "13", "PMI_JOBID": f"{task['SLURM_JOB_ID']}.{task['SLURM_STEP_ID']}",
                   "PMI_RANK": task["SLURM_PROCID"], "PMI_SIZE": task["SLURM_STEP_NUM_TASKS"],
                   "SLURM_MPI_TYPE": "pmi2"}


def with_pmix(task: dict) -> dict:
    """+ what srun --mpi=pmix adds (as recorded above)."""
    space = f"slurm.pmix.{task['SLURM_JOB_ID']}.{task['SLURM_STEP_ID']}"
    return task | RECORDED_PMIX_TASK1 | {
        "PMIX_NAMESPACE": space, "PMIX_RANK": task["SLURM_PROCID"],
        "PMIX_HOSTNAME": task["SLURMD_NODENAME"],
        "SLURM_PMIX_MAPPING_SERV": f"(vector,(0,{task['SLURM_STEP_NUM_NODES']},"
                                   f"{task['SLURM_STEP_TASKS_PER_NODE'].split('(')[0]}))"}


def with_cray_shasta(task: dict) -> dict:
    """+ what the mpi/cray_shasta plugin of recent SLURM releases adds, as documented by its
    source (src/plugins/mpi/cray_shasta/mpi_cray_shasta.c, mpi_p_slurmstepd_task and
    mpi_p_client_prelaunch; PMI_CONTROL_PORT with --resv-ports): Cray PMI's PMI_RANK /
    PMI_SIZE / PMI_LOCAL_RANK / PMI_LOCAL_SIZE / PMI_UNIVERSE_SIZE next to the PALS_* that
    22.05 already set (RECORDED_CRAY_SHASTA_TASK1)."""
    apid = f"{task['SLURM_JOB_ID']}.{task['SLURM_STEP_ID']}"
    spool = f"/var/spool/slurmd/mpi_cray_shasta/{apid}"
    local_size = task["SLURM_STEP_TASKS_PER_NODE"].split("(")[0]
    return task | {
        "PALS_APID": apid, "PALS_APINFO": f"{spool}/apinfo", "PALS_SPOOL_DIR": spool,
        "PALS_LOCAL_RANKID": task["SLURM_LOCALID"], "PALS_NODEID": task["SLURM_NODEID"],
        "PALS_RANKID": task["SLURM_PROCID"], "PMI_JOBID": task["SLURM_JOB_ID"],
        "PMI_LOCAL_RANK": task["SLURM_LOCALID"], "PMI_LOCAL_SIZE": local_size,
        "PMI_RANK": task["SLURM_PROCID"], "PMI_SIZE": task["SLURM_STEP_NUM_TASKS"],
        "PMI_UNIVERSE_SIZE": task["SLURM_STEP_NUM_TASKS"], "PMI_SHARED_SECRET": "9620386453",
        "PMI_CONTROL_PORT": "12040", "SLURM_STEP_RESV_PORTS": "12040-12041",
        "SLURM_MPI_TYPE": "cray_shasta"}


def no_broadcast(value):
    raise AssertionError("MPI broadcast must not be needed here")


def test_torchrun():
    info = discover(TORCHRUN, no_broadcast)
    assert info == LaunchEnv("torchrun", 3, 1, 4, 2, "node-a", 29400)


def test_deepspeed_launcher():
    info = discover(DEEPSPEED, no_broadcast)
    assert info == LaunchEnv("deepspeed", 6, 2, 16, 8, "10.0.0.1", 29500)


def test_srun_task():
    info = discover(SRUN_TASK, no_broadcast)
    assert (info.launcher, info.rank, info.local_rank, info.world_size) == ("slurm", 5, 1, 8)
    assert info.local_world_size == 4  # SLURM_STEP_TASKS_PER_NODE "4(x2)", node 1
    assert info.master_addr == "gpu007"  # first host of the step's node list
    assert info.master_port == slurm_master_port(4242, 0) == 10000 + (4242 % 2200) * 10 == 30420
    # Every task of the step computes the same rendezvous without talking.
    other = discover(SRUN_TASK | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                                  "SLURM_NODEID": "0"}, no_broadcast)
    assert (other.master_addr, other.master_port) == (info.master_addr, info.master_port)


def test_srun_respects_exported_rendezvous():
    info = discover(SRUN_TASK | {"MASTER_ADDR": "gpu007-ib", "MASTER_PORT": "6000"})
    assert (info.master_addr, info.master_port) == ("gpu007-ib", 6000)


def test_batch_shell_is_one_process():
    # Python run directly by the batch script (not under srun) must not wait for 7 peers.
    info = discover(BATCH_SHELL, no_broadcast)
    assert (info.launcher, info.rank, info.world_size) == ("single", 0, 1)


def test_nothing_is_one_process():
    assert discover({}, no_broadcast) == LaunchEnv("single", 0, 0, 1, 1, "127.0.0.1", 29500)


def test_inner_launcher_wins():
    # torchrun started by srun (one per node): torchrun's global ranks are the truth.
    assert discover(SRUN_TASK | TORCHRUN, no_broadcast).launcher == "torchrun"
    # mpirun inside an sbatch script: Open MPI's orted runs in an srun step of its own.
    assert discover(SRUN_TASK | OPEN_MPI | {"MASTER_ADDR": "h", "MASTER_PORT": "1"},
                    no_broadcast).launcher == "mpirun"


@pytest.mark.parametrize("env", [
    RECORDED_SLURM_TASK1, RECORDED_PMI2_TASK1, RECORDED_SLURM_TASK1 | RECORDED_PMIX_TASK1,
    RECORDED_SLURM_TASK1 | RECORDED_CRAY_SHASTA_TASK1,
], ids=["none", "pmi2", "pmix", "cray_shasta-22.05"])
def test_recorded_srun_task_is_slurm_rank_whatever_the_mpi_plugin(env):
    # Before srun won over PMI variables, --mpi=pmi2 read as MPICH: local rank 0 on every
    # rank (every rank of a node on GPU 0) and an mpi4py rendezvous.
    assert discover(env, no_broadcast) == LaunchEnv("slurm", 1, 1, 2, 2, "localhost",
                                                    slurm_master_port(2, 0))


@pytest.mark.parametrize("plugin", [with_pmi2, with_pmix, with_cray_shasta],
                         ids=["pmi2", "pmix", "cray_shasta"])
def test_srun_plugin_on_two_nodes_gives_slurm_ranks(plugin):
    # 2 nodes x 2 tasks: every task, e.g. task 3 = node 1 (gpu008), local rank 1.
    port = slurm_master_port(4243, 0)
    for procid in range(4):
        env = plugin(two_node_task(procid))
        assert discover(env, no_broadcast) == LaunchEnv(
            "slurm", procid, procid % 2, 4, 2, "gpu007", port), (plugin.__name__, procid)
    written = export_to_environ(discover(plugin(two_node_task(3)), no_broadcast), {})
    assert (written["RANK"], written["LOCAL_RANK"], written["WORLD_SIZE"]) == ("3", "1", "4")


def test_pmi_set_by_srun():
    assert launch_env.pmi_set_by_srun(with_pmi2(two_node_task(3)))
    assert launch_env.pmi_set_by_srun(two_node_task(3))  # no PMI variables at all
    assert not launch_env.pmi_set_by_srun(two_node_task(3) | {"PMI_RANK": "7", "PMI_SIZE": "8"})
    assert not launch_env.pmi_set_by_srun(two_node_task(3) | {"PMI_RANK": "3", "PMI_SIZE": "8"})
    assert not launch_env.pmi_set_by_srun(BATCH_SHELL | {"PMI_RANK": "0", "PMI_SIZE": "8"})
    assert not launch_env.pmi_set_by_srun(with_pmi2(two_node_task(3)) | {"PMI_RANK": "x"})


def hydra_rank(rank: int, *, ranks_per_node: int = 2) -> dict:
    """Rank `rank` of MPICH / Intel MPI `mpiexec` (Hydra, bootstrap slurm) inside a two-node
    allocation: Hydra starts one hydra_pmi_proxy per node with srun, so the step's tasks are
    the proxies (SLURM_PROCID = node, SLURM_LOCALID = 0, one task per node), and each proxy
    exports PMI_RANK / PMI_SIZE / PMI_FD (PMI-1) and MPI_LOCALRANKID / MPI_LOCALNRANKS to its
    ranks."""
    node, local = divmod(rank, ranks_per_node)
    return two_node_task(node, tasks_per_node=1, step=0) | {
        "PMI_RANK": str(rank), "PMI_SIZE": str(2 * ranks_per_node), "PMI_FD": "6",
        "MPI_LOCALRANKID": str(local), "MPI_LOCALNRANKS": str(ranks_per_node),
        "MASTER_ADDR": "gpu007", "MASTER_PORT": "29500"}


def test_hydra_inside_an_allocation_is_mpi():
    for rank in range(4):
        assert discover(hydra_rank(rank), no_broadcast) == LaunchEnv(
            "mpirun", rank, rank % 2, 4, 2, "gpu007", 29500), rank
    # One rank per node: PMI and the proxies' step agree, and so do both answers.
    for rank in range(2):
        info = discover(hydra_rank(rank, ranks_per_node=1), no_broadcast)
        assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == \
            (rank, 0, 2, 1)


def test_open_mpi_mpirun_inside_an_allocation_is_mpi():
    # Rank 3 of 4 on the second node: mpirun (on gpu007) started its orted on gpu008 with
    # `srun --ntasks-per-node=1 --nodes=1 --nodelist=gpu008 orted ...`, so the rank inherits
    # that one-task step (SLURM_PROCID=0); Open MPI 4 also exports PMIX_RANK.
    orted_step = two_node_task(0, tasks_per_node=1) | {
        "SLURMD_NODENAME": "gpu008", "SLURM_TOPOLOGY_ADDR": "gpu008", "SLURM_NODELIST": "gpu008",
        "SLURM_STEP_NODELIST": "gpu008", "SLURM_NNODES": "1", "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NTASKS": "1", "SLURM_NPROCS": "1", "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_TASKS_PER_NODE": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_GTIDS": "0"}
    env = orted_step | {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                        "OMPI_COMM_WORLD_NODE_RANK": "1", "PMIX_RANK": "3",
                        "PMIX_NAMESPACE": "1320747009"}
    info = discover(env, lambda mine: ("gpu007", 41000))
    assert info == LaunchEnv("mpirun", 3, 1, 4, 2, "gpu007", 41000)
    # Recorded: rank 1 of `srun -n 1 mpirun -np 2` (its step says PROCID 0 of 1 task).
    info = discover(RECORDED_MPIRUN_IN_SRUN_RANK1, lambda mine: ("127.0.0.1", 41000))
    assert (info.launcher, info.rank, info.local_rank, info.world_size) == ("mpirun", 1, 1, 2)


def test_cray_pals_mpiexec_local_rank():
    # HPE Cray PALS `mpiexec` (PBS, no SLURM), with the variables HPE's pals.h lists for
    # applications (PMI_RANK / PMI_SIZE / PMI_LOCAL_RANK / PMI_LOCAL_SIZE and PALS_*).
    env = {"PMI_RANK": "5", "PMI_SIZE": "8", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "4",
           "PMI_UNIVERSE_SIZE": "8", "PALS_RANKID": "5", "PALS_LOCAL_RANKID": "1",
           "PALS_NODEID": "1", "PALS_APID": "f1e2", "PALS_DEPTH": "8",
           "MASTER_ADDR": "x1000c0s0b0n0", "MASTER_PORT": "29500"}
    assert discover(env, no_broadcast) == LaunchEnv("mpirun", 5, 1, 8, 4, "x1000c0s0b0n0",
                                                    29500)


def test_open_mpi_rank0_chooses_rendezvous_and_broadcasts():
    sent = []

    def broadcast(value):
        sent.append(value)
        return value if value is not None else ("127.0.0.1", 31337)

    rank0 = discover(OPEN_MPI | {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
                     broadcast)
    addr, port = sent[0]
    assert addr == "127.0.0.1"  # every rank on this host: loopback
    assert 0 < port < 65536 and (rank0.master_addr, rank0.master_port) == (addr, port)
    assert (rank0.launcher, rank0.rank, rank0.world_size, rank0.local_world_size) == \
        ("mpirun", 0, 2, 2)
    rank1 = discover(OPEN_MPI, broadcast)
    assert sent[1] is None  # only rank 0's value is used
    assert (rank1.rank, rank1.local_rank, rank1.master_port) == (1, 1, 31337)


def test_open_mpi_multi_node_broadcasts_hostname(monkeypatch):
    monkeypatch.setattr(launch_env.socket, "gethostname", lambda: "cn017")
    env = OPEN_MPI | {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16",
                      "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert discover(env, lambda value: value).master_addr == "cn017"


def test_mpi_with_exported_rendezvous_needs_no_mpi4py():
    info = discover(OPEN_MPI | {"MASTER_ADDR": "head", "MASTER_PORT": "7000"}, no_broadcast)
    assert (info.rank, info.master_addr, info.master_port) == (1, "head", 7000)


def test_mpich_hydra():
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
           "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    assert discover(env, no_broadcast) == LaunchEnv("mpirun", 3, 1, 4, 2, "h0", 29500)


def test_missing_mpi4py_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    with pytest.raises(LaunchError, match=r"make install.*mpirun -x MASTER_ADDR"):
        discover(OPEN_MPI)


@pytest.mark.parametrize("env, message", [
    ({k: v for k, v in SRUN_TASK.items() if "NUM_TASKS" not in k and k != "SLURM_NTASKS"},
     r"SLURM_NTASKS is not set: launch one task per GPU with srun"),
    (SRUN_TASK | {"SLURM_PROCID": "8"}, r"rank 8 is outside 0\.\.7"),
    (SRUN_TASK | {"SLURM_LOCALID": "x"}, r"SLURM_LOCALID is 'x', not an integer"),
    (SRUN_TASK | {"SLURM_NODEID": "2"}, r"SLURM_NODEID 2 but tasks per node '4\(x2\)' lists 2"),
    ({"RANK": "0"}, r"WORLD_SIZE is not set: the launcher sets RANK and WORLD_SIZE together"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, r"rank 4 is outside 0\.\.3"),
    (TORCHRUN | {"LOCAL_RANK": "2"}, r"local rank 2 / local world size 2"),
    (TORCHRUN | {"MASTER_PORT": "70000"}, r"MASTER_PORT 70000 is not a TCP port"),
])
def test_inconsistent_environments_are_refused(env, message):
    with pytest.raises(LaunchError, match=message):
        discover(env, no_broadcast)


@pytest.mark.parametrize("spec, hosts", [
    ("gpu[001-004,007],login1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "login1"]),
    ("node7", ["node7"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x[09-11],y[3]", ["x09", "x10", "x11", "y3"]),
])
def test_hostlist_expansion(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec, message", [
    ("gpu[1-", "'\\[' without '\\]'"), ("gpu1]", "'\\]' without '\\['"),
    ("gpu[3-1]", "runs backwards"), ("gpu[a-b]", "bad range"), ("", "names no host"),
])
def test_bad_hostlists(spec, message):
    with pytest.raises(LaunchError, match=message):
        expand_hostlist(spec)


def test_tasks_per_node():
    assert parse_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert parse_tasks_per_node("2") == [2]
    with pytest.raises(LaunchError, match="bad item"):
        parse_tasks_per_node("8x2")


def test_slurm_ports_are_stable_distinct_and_below_ephemeral_range():
    ports = {slurm_master_port(j, s) for j in range(2200) for s in range(10)}
    assert len(ports) == 22000 and min(ports) == 10000 and max(ports) == 31999 < 32768
    assert slurm_master_port(4242, 1) != slurm_master_port(4242, 0)


def test_export_writes_torchrun_contract_and_threads():
    environ = {}
    written = export_to_environ(discover(SRUN_TASK, no_broadcast), environ)
    assert environ == written == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                                  "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu007",
                                  "MASTER_PORT": str(slurm_master_port(4242, 0)),
                                  "OMP_NUM_THREADS": "1"}
    # A user's thread count is kept; a lone process keeps all cores.
    environ = {"OMP_NUM_THREADS": "6"}
    export_to_environ(discover(SRUN_TASK, no_broadcast), environ)
    assert environ["OMP_NUM_THREADS"] == "6"
    environ = {}
    export_to_environ(discover({}, no_broadcast), environ)
    assert "OMP_NUM_THREADS" not in environ and environ["WORLD_SIZE"] == "1"


def test_launcher_appended_local_rank_is_dropped():
    info = discover(DEEPSPEED, no_broadcast)
    args = ["--model", "tiny-llama", "--local_rank=2", "--lr", "1e-4"]
    assert strip_local_rank_argument(args, info) == ["--model", "tiny-llama", "--lr", "1e-4"]
    assert strip_local_rank_argument(["--local-rank", "2", "--bf16"], info) == ["--bf16"]
    with pytest.raises(LaunchError, match="--local_rank 3 contradicts"):
        strip_local_rank_argument(["--local_rank=3"], info)
