"""Rank discovery for every launcher, from the environments the launchers really set (SLURM
variables as slurmd 22.05 exports them to an srun task and to the batch shell; the DeepSpeed
launcher's as deepspeed/launcher/launch.py writes them), without launching anything."""

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
