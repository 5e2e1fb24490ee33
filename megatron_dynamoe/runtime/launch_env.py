"""One rank/world contract whatever started the processes: torchrun, the DeepSpeed launcher,
SLURM `srun`, `mpirun` / `mpiexec` (Open MPI, MPICH / Intel MPI Hydra, Cray PALS), or nothing
(one process).

`discover(env)` reads a launcher's environment and returns a `LaunchEnv`; `export_to_environ`
writes it back as the torchrun contract (RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE /
MASTER_ADDR / MASTER_PORT) that `parallel.initialize_parallel` and torch.distributed read, so
the rest of the code never needs to know which launcher ran it. Every function but the MPI
address exchange is a pure function of the mapping it is given, so each launcher is unit
tested from a fake environment. Precedence (the innermost launcher wins, because launchers
nest: torchrun inside srun, mpirun inside an sbatch script):

1. torchrun (`TORCHELASTIC_RUN_ID`): it has already computed global ranks;
2. the DeepSpeed launcher (`RANK` + `WORLD_SIZE` + its `CROSS_RANK` / `LOCAL_SIZE`);
3. any other launcher that set `RANK` + `WORLD_SIZE` (a test harness, a hand-written script);
4. Open MPI's `mpirun` (`OMPI_COMM_WORLD_*`, which only mpirun / orted / prterun write, never
   srun): inside an allocation mpirun starts its daemons with srun, so its ranks also carry
   the daemon step's `SLURM_STEP_ID` and a `SLURM_PROCID` that numbers the daemon, not the rank;
5. SLURM `srun` (`SLURM_PROCID` inside a job step, i.e. with `SLURM_STEP_ID` / `SLURM_STEPID`:
   the batch script also carries `SLURM_PROCID=0` and `SLURM_NTASKS`, but no step), also when
   srun's PMI plugin exported `PMI_RANK` / `PMI_SIZE` (`--mpi=pmi2`, `--mpi=cray_shasta`) or
   `PMIX_*` (`--mpi=pmix`): srun wins when `PMI_RANK == SLURM_PROCID` and `PMI_SIZE` is the
   step's task count (`pmi_set_by_srun`). The local rank is `SLURM_LOCALID`;
6. other PMI launchers (`PMI_RANK` / `PMI_SIZE`): MPICH / Intel MPI's Hydra `mpiexec`, Cray
   PALS `mpiexec`. Inside an allocation Hydra runs one proxy per node as the tasks of an srun
   step, so `SLURM_PROCID` / `SLURM_STEP_NUM_TASKS` count proxies and disagree with
   `PMI_RANK` / `PMI_SIZE` (with one rank per node they agree, and so do both answers). Local
   rank from `MPI_LOCALRANKID` (Hydra) or `PMI_LOCAL_RANK` (Cray PALS). Under MPI (4 and 6)
   mpi4py broadcasts rank 0's address and a free port unless `MASTER_ADDR` / `MASTER_PORT`
   were passed (`mpirun -x`);
7. otherwise a single process.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Callable, List, Mapping, MutableMapping, Optional, Sequence, Tuple

DEFAULT_MASTER_PORT = 29500
# SLURM-derived ports stay below Linux's default ephemeral range (32768-60999), where a
# client socket of another process could already hold the port.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 22000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LaunchError(ValueError):
    """An inconsistent or incomplete launcher environment (reported as one `error:` line)."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job. `local_world_size` is None when the launcher does
    not say how many ranks share this node."""

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: Optional[int]
    master_addr: str
    master_port: int

    def __post_init__(self):
        if self.world_size < 1:
            raise LaunchError(f"{self.launcher}: world size {self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"{self.launcher}: rank {self.rank} is outside "
                              f"0..{self.world_size - 1} (world size {self.world_size}): the "
                              f"launcher's variables disagree")
        if self.local_rank < 0 or (self.local_world_size is not None
                                   and not self.local_rank < self.local_world_size
                                   <= self.world_size):
            raise LaunchError(f"{self.launcher}: local rank {self.local_rank} / local world size "
                              f"{self.local_world_size} do not fit world size {self.world_size}")
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"{self.launcher}: MASTER_PORT {self.master_port} is not a TCP port")
        if not self.master_addr:
            raise LaunchError(f"{self.launcher}: empty MASTER_ADDR: export the first node's "
                              f"address as MASTER_ADDR")

    def describe(self) -> str:
        """One log line: launcher, world, rendezvous point."""
        local = "?" if self.local_world_size is None else self.local_world_size
        return (f"launcher: {self.launcher}, world size {self.world_size} ({local} per node), "
                f"rendezvous {self.master_addr}:{self.master_port}")


# ---------------------------------------------------------------------------------------------
# SLURM syntax
# ---------------------------------------------------------------------------------------------
def _split_top_level(spec: str) -> List[str]:
    """Split on commas outside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"host list {spec!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"host list {spec!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"host list {spec!r}: '[' without ']'")
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, spec: str) -> List[str]:
    """'001-003,7' -> ['001', '002', '003', '7'] (zero padding kept, as SLURM does)."""
    out = []
    for item in body.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"host list {spec!r}: bad range {item!r} (expected N or N-M)")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchError(f"host list {spec!r}: range {item!r} runs backwards")
        width = len(lo)
        out.extend(f"{n:0{width}d}" for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(spec: str) -> List[str]:
    """SLURM's compressed host list, expanded in order: 'gpu[001-002,007],login1' ->
    ['gpu001', 'gpu002', 'gpu007', 'login1']; several bracket groups in one name
    ('r[1-2]n[1-2]') give their product, the last group varying fastest."""
    hosts: List[str] = []
    for part in _split_top_level(spec):
        pieces = re.split(r"(\[[^\]]*\])", part)
        names = [""]
        for piece in pieces:
            if piece.startswith("["):
                options = _expand_range(piece[1:-1], spec)
                names = [n + o for n in names for o in options]
            else:
                names = [n + piece for n in names]
        hosts.extend(names)
    if not hosts:
        raise LaunchError(f"host list {spec!r} names no host")
    return hosts


def parse_tasks_per_node(spec: str) -> List[int]:
    """SLURM_TASKS_PER_NODE syntax: '8(x2),4' -> [8, 8, 4]."""
    counts: List[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise LaunchError(f"tasks per node {spec!r}: bad item {item!r} (expected N or N(xK))")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def slurm_master_port(job_id: int, step_id: int = 0) -> int:
    """Deterministic rendezvous port of a job step: every task computes the same one without
    talking, two steps of a job and jobs sharing a node get different ones (job ids 2,200
    apart collide only if they share the first node; export MASTER_PORT to override)."""
    return SLURM_PORT_BASE + (job_id % (SLURM_PORT_SPAN // 10)) * 10 + step_id % 10


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------
def _int(env: Mapping[str, str], name: str, launcher: str, fix: str) -> int:
    value = env.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        problem = "is not set" if value is None else f"is {value!r}, not an integer"
        raise LaunchError(f"{launcher}: {name} {problem}: {fix}")
    return int(value)


def _opt_int(env: Mapping[str, str], name: str, launcher: str) -> Optional[int]:
    return _int(env, name, launcher, "fix the launcher environment") if name in env else None


def _torch_contract(env: Mapping[str, str], launcher: str, local_world_var: str) -> LaunchEnv:
    fix = "the launcher sets RANK and WORLD_SIZE together; export both or neither"
    return LaunchEnv(
        launcher=launcher,
        rank=_int(env, "RANK", launcher, fix),
        local_rank=_opt_int(env, "LOCAL_RANK", launcher) or 0,
        world_size=_int(env, "WORLD_SIZE", launcher, fix),
        local_world_size=_opt_int(env, local_world_var, launcher),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_opt_int(env, "MASTER_PORT", launcher) or DEFAULT_MASTER_PORT)


def _slurm(env: Mapping[str, str]) -> LaunchEnv:
    fix = "launch one task per GPU with srun (sbatch --ntasks-per-node=GPUS)"
    world = _int(env, _slurm_world_var(env), "slurm", fix)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") \
        or env.get("SLURM_NODELIST")
    if not env.get("MASTER_ADDR") and not nodelist:
        raise LaunchError("slurm: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set: "
                          "export MASTER_ADDR (the first node's address)")
    local_world = None
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = parse_tasks_per_node(per_node)
        node = _opt_int(env, "SLURM_NODEID", "slurm") or 0
        if node >= len(counts):
            raise LaunchError(f"slurm: SLURM_NODEID {node} but tasks per node {per_node!r} "
                              f"lists {len(counts)} nodes")
        local_world = counts[node]
    step = _opt_int(env, "SLURM_STEP_ID", "slurm")
    step = _opt_int(env, "SLURM_STEPID", "slurm") if step is None else step
    port = _opt_int(env, "MASTER_PORT", "slurm")
    if port is None:
        port = slurm_master_port(_opt_int(env, "SLURM_JOB_ID", "slurm") or 0, step or 0)
    return LaunchEnv(
        launcher="slurm", rank=_int(env, "SLURM_PROCID", "slurm", fix),
        local_rank=_int(env, "SLURM_LOCALID", "slurm", fix), world_size=world,
        local_world_size=local_world,
        master_addr=env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0], master_port=port)


# (rank, size, local rank, local size) variables of each MPI family; a local variable is a
# tuple of alternatives, the first one set wins.
MPI_VARIABLES = {
    "Open MPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
                 ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    # Hydra (MPICH, Intel MPI) writes MPI_LOCALRANKID; Cray PALS writes PMI_LOCAL_RANK.
    "PMI": ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
            ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")),
}


def _same_int(a: Optional[str], b: Optional[str]) -> bool:
    """Two variables hold the same integer (both set and numeric)."""
    a, b = (a or "").strip(), (b or "").strip()
    return a.isdigit() and b.isdigit() and int(a) == int(b)


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """A task of an srun job step (the batch shell has SLURM_PROCID but no step id)."""
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def _slurm_world_var(env: Mapping[str, str]) -> str:
    return "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"


def pmi_set_by_srun(env: Mapping[str, str]) -> bool:
    """True when `PMI_RANK` / `PMI_SIZE` are srun's own (its mpi/pmi2 or mpi/cray_shasta plugin
    numbers the step's tasks: `PMI_RANK == SLURM_PROCID`, `PMI_SIZE ==` the step's task
    count), or absent; False when another launcher's ranks run inside an srun step (Hydra's
    proxies are the step's tasks, one per node, and their children are the ranks)."""
    if "PMI_RANK" not in env and "PMI_SIZE" not in env:
        return True
    return (_in_slurm_step(env) and _same_int(env.get("PMI_RANK"), env.get("SLURM_PROCID"))
            and _same_int(env.get("PMI_SIZE"), env.get(_slurm_world_var(env))))


def mpi4py_broadcast(value):
    """Rank 0's `value` on every rank, through mpi4py (imported only here: MPI_Init happens
    only for jobs that mpirun started)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(f"mpirun: mpi4py is not importable ({e}): run `make install`, or pass "
                          f"the rendezvous with `mpirun -x MASTER_ADDR=HOST -x MASTER_PORT=PORT`"
                          ) from None
    return MPI.COMM_WORLD.bcast(value, root=0)


def _free_port() -> int:
    """A TCP port free right now on this host (the store binds it moments later)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi(env: Mapping[str, str], family: str, broadcast: Callable) -> LaunchEnv:
    rank_var, size_var, local_vars, local_size_vars = MPI_VARIABLES[family]
    fix = "launch with mpirun -np N"
    rank, world = _int(env, rank_var, "mpirun", fix), _int(env, size_var, "mpirun", fix)
    local_var = next((v for v in local_vars if v in env), local_vars[0])
    local_world = next((_opt_int(env, v, "mpirun") for v in local_size_vars if v in env), None)
    addr, port = env.get("MASTER_ADDR"), _opt_int(env, "MASTER_PORT", "mpirun")
    if not (addr and port):
        # Rank 0 chooses; everyone learns its choice. One host: loopback (always routable).
        mine = None
        if rank == 0:
            mine = (addr or ("127.0.0.1" if local_world == world else socket.gethostname()),
                    port or _free_port())
        addr, port = broadcast(mine)
    return LaunchEnv(launcher="mpirun", rank=rank,
                     local_rank=_opt_int(env, local_var, "mpirun") or 0, world_size=world,
                     local_world_size=local_world, master_addr=addr, master_port=int(port))


def discover(env: Optional[Mapping[str, str]] = None,
             mpi_broadcast: Callable = mpi4py_broadcast) -> LaunchEnv:
    """The LaunchEnv of this process from `env` (default os.environ); see the module docstring
    for the precedence. `mpi_broadcast(value) -> rank 0's value` is called only under MPI
    without MASTER_ADDR / MASTER_PORT."""
    env = os.environ if env is None else env
    has_contract = "RANK" in env or "WORLD_SIZE" in env
    if "TORCHELASTIC_RUN_ID" in env:
        return _torch_contract(env, "torchrun", "LOCAL_WORLD_SIZE")
    if has_contract and ("CROSS_RANK" in env or "LOCAL_SIZE" in env):
        return _torch_contract(env, "deepspeed", "LOCAL_SIZE")
    if has_contract:
        return _torch_contract(env, "env", "LOCAL_WORLD_SIZE")
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _mpi(env, "Open MPI", mpi_broadcast)
    if _in_slurm_step(env) and pmi_set_by_srun(env):
        return _slurm(env)
    if "PMI_SIZE" in env or "PMI_RANK" in env:
        return _mpi(env, "PMI", mpi_broadcast)
    return LaunchEnv(launcher="single", rank=0, local_rank=0, world_size=1, local_world_size=1,
                     master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                     master_port=_opt_int(env, "MASTER_PORT", "single") or DEFAULT_MASTER_PORT)


def export_to_environ(info: LaunchEnv,
                      environ: Optional[MutableMapping[str, str]] = None) -> dict:
    """Write `info` as the torchrun contract into `environ` (default os.environ) and return
    what was written. Sets OMP_NUM_THREADS=1 when several ranks share the node and it is unset
    (each rank would otherwise start one thread per core and they would oversubscribe the
    cores; torchrun does the same) and then applies it to an already-imported torch."""
    environ = os.environ if environ is None else environ
    values = dict(RANK=info.rank, LOCAL_RANK=info.local_rank, WORLD_SIZE=info.world_size,
                  MASTER_ADDR=info.master_addr, MASTER_PORT=info.master_port)
    if info.local_world_size is not None:
        values["LOCAL_WORLD_SIZE"] = info.local_world_size
    shared_node = (info.local_world_size or 1) > 1 or (
        info.local_world_size is None and info.world_size > 1 and info.master_addr in LOOPBACK)
    if shared_node and "OMP_NUM_THREADS" not in environ:
        values["OMP_NUM_THREADS"] = 1
        if environ is os.environ and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)  # the OpenMP pool may already exist
    written = {k: str(v) for k, v in values.items()}
    environ.update(written)
    return written


def strip_local_rank_argument(argv: Sequence[str], info: LaunchEnv) -> List[str]:
    """Drop the `--local_rank=N` / `--local-rank N` the DeepSpeed launcher (and the legacy
    torch.distributed.launch) append to the script's arguments; refuse one that contradicts
    the environment."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                if i + 1 >= len(argv):
                    raise LaunchError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            if not value.isdigit() or int(value) != info.local_rank:
                raise LaunchError(f"{name} {value} contradicts the environment's local rank "
                                  f"{info.local_rank}")
        else:
            out.append(arg)
        i += 1
    return out


def prepare(argv: Optional[Sequence[str]] = None) -> Tuple[LaunchEnv, List[str]]:
    """Entry-point helper: discover, export, and clean argv (default sys.argv[1:])."""
    info = discover()
    export_to_environ(info)
    return info, strip_local_rank_argument(sys.argv[1:] if argv is None else argv, info)
