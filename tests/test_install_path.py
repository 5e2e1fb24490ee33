"""The install paths, checked on the CPU: `make install` keeps an installed CUDA torch (and
says so) while a machine without torch still gets torch==2.13.0; `make install-gpu` /
docker/install_gpu.py install only `--no-deps` pins, never torch, TE, Apex or numpy, keep an
image's package when the declared requirements accept it and say what they replace; the
Dockerfile's invariants. What needs Docker, nvcr.io or a GPU (the build, the TE version of the
base image) is not checked here: docker/README.md says how sure the choices are."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(REPO, "docker", "Dockerfile")
TORCH_VERSION = "2.13.0"


def _load_install_gpu():
    spec = importlib.util.spec_from_file_location(
        "install_gpu", os.path.join(REPO, "docker", "install_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


g = _load_install_gpu()


def _make(*args, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("NVIDIA_PYTORCH_VERSION", "KEEP_TORCH", "INSTALL_TARGET",
                             "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-s", "--no-print-directory", f"PYTHON={sys.executable}",
                           *args], cwd=REPO, env=full_env | env, capture_output=True, text=True,
                          timeout=120)


def _fake_torch(root, version, cuda=None) -> str:
    """A folder that, first on PYTHONPATH, looks like an installed torch to importlib.metadata
    and to a reader of torch/version.py (nothing imports it)."""
    package = root / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (package / "version.py").write_text(
        f"__version__ = {version!r}\ncuda = {cuda!r}\nhip = None\n")
    info = root / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    return str(root)


def _policy(**env) -> subprocess.CompletedProcess:
    """`$(PYTHON) -c "$$INSTALL_PY" torch`: what install-full does about torch."""
    return _make("--eval", 'policy: ; @$(PYTHON) -c "$$INSTALL_PY" torch', "policy", **env)


# ---- make install: torch ----------------------------------------------------------------------
def test_a_cuda_torch_is_kept_and_the_check_accepts_it(tmp_path):
    site = _fake_torch(tmp_path, "2.11.0+cu130", cuda="13.0")
    keep = ("install: keeping the installed torch 2.11.0+cu130 (CUDA 13.0); "
            f"CPU machines use torch=={TORCH_VERSION}")
    result = _policy(PYTHONPATH=site)
    assert (result.returncode, result.stdout.strip(), result.stderr.strip()) == (0, "keep", keep)
    result = _policy(PYTHONPATH=site, KEEP_TORCH="0")  # forced: a CUDA 2.11 is replaced
    assert result.stdout.strip() == "install"
    # The up-to-date check: torch is accepted (whatever else this machine lacks).
    result = _make("check-install", PYTHONPATH=site)
    assert keep in result.stderr
    assert "needed for torch" not in result.stderr
    # The constraints file that holds torch for every later pip call of install-full.
    result = _make("--eval", 'pin: ; @$(PYTHON) -c "$$INSTALL_PY" pin', "pin", PYTHONPATH=site)
    assert result.stdout.strip() == "torch==2.11.0+cu130"


def test_the_cpu_machine_is_unchanged(tmp_path):
    # The CPU dev machine's torch 2.13.0+cpu: no message, nothing to install for torch.
    result = _policy(PYTHONPATH=_fake_torch(tmp_path / "cpu", f"{TORCH_VERSION}+cpu"))
    assert (result.returncode, result.stdout.strip(), result.stderr.strip()) == (0, "keep", "")
    # No torch at all (python -S: no site-packages): torch==2.13.0 is installed first.
    result = _make("--eval", 'policy: ; @$(PYTHON) -S -c "$$INSTALL_PY" torch', "policy")
    assert result.stdout.strip() == "install"
    result = _make("--eval", 'chk: ; @$(PYTHON) -S -c "$$INSTALL_PY" check requirements.txt',
                   "chk")
    assert result.returncode != 0 and "install: needed for torch," in result.stderr
    # Another CPU torch: kept by default (with the line), replaced with KEEP_TORCH=0.
    site = _fake_torch(tmp_path / "old", "2.12.0+cpu")
    result = _policy(PYTHONPATH=site)
    assert result.stdout.strip() == "keep"
    assert "keeping the installed torch 2.12.0+cpu (CPU build)" in result.stderr
    assert _policy(PYTHONPATH=site, KEEP_TORCH="0").stdout.strip() == "install"


def test_install_targets_and_their_pip_calls():
    """`make -n` (prints, runs nothing): install-full installs torch==2.13.0 only in the guarded
    step, every other pip call holds torch with the constraints file or uses --no-deps;
    install-gpu: --no-deps only, and no torch."""
    full = _make("-n", "install-full").stdout
    pip_lines = [line for line in full.splitlines() if "-m pip install" in line]
    torch_lines = [line for line in pip_lines if re.search(r"\btorch==", line)]
    assert len(torch_lines) == 2  # the echo and the install, inside `if [ "$action" = install ]`
    assert 'if [ "$action" = install ]' in full
    for line in pip_lines:
        if line not in torch_lines:
            assert "--no-deps" in line or "-c build/install/torch-constraint.txt" in line, line
    gpu = _make("-n", "install-gpu").stdout
    assert "docker/install_gpu.py install" in gpu and "docker/install_gpu.py verify" in gpu
    assert 'import megatron.core, megatron_dynamoe' in gpu
    for line in gpu.splitlines():
        if "pip install" in line:
            assert "--no-deps" in line and "torch" not in line, line
    assert "apt-get" not in gpu  # the image brings its own MPI
    # Inside an NGC container (NVIDIA_PYTORCH_VERSION set there) `make install` runs install-gpu.
    show = ("show: ; @echo $(INSTALL_TARGET)",)
    assert _make("--eval", *show, "show").stdout.strip() == "install-full"
    assert _make("--eval", *show, "show", NVIDIA_PYTORCH_VERSION="25.11").stdout.strip() == \
        "install-gpu"


# ---- docker/install_gpu.py ------------------------------------------------------------------
class FakeEnvironment(g.Environment):
    """An image: installed versions and each (name, version)'s declared requirements; `install`
    records the pip command and installs the named pins."""

    def __init__(self, installed, requires, dry_run=False):
        super().__init__(pip_flags=["--disable-pip-version-check"], dry_run=dry_run)
        self.versions = dict(installed)
        self.declared = requires
        self.commands = []

    def installed(self):
        return dict(self.versions)

    def requires(self, name):
        return self.declared.get((name, self.versions.get(name)), [])

    def install(self, specs):
        if self.dry_run:
            return super().install(specs)
        self.commands.append(self.pip_command(specs))
        for spec in specs:
            name, _, version = spec.partition("==")
            self.versions[name] = version


EXACT = {"megatron-core": "0.16.1", "transformers": "5.23.0"}
BASE = {"numpy": "2.4.6", "packaging": "26.2", "regex": "2026.5.9", "tqdm": "4.70.1",
        "pyarrow": "26.0.1"}
REQUIRES = {
    ("megatron-core", "0.16.1"): ["torch>=2.6.0", "numpy", "packaging>=24.2",
                                  'transformer-engine[pytorch]<2.12.0,>=2.9.0a0; extra == "dev"'],
    ("transformers", "5.23.0"): ["numpy>=1.17", "regex>=2025.10.22", "tqdm>=4.60",
                                 'tomli; python_version < "3"'],
    ("transformers", "4.40.0"): ["tokenizers<0.20,>=0.19"],  # the image's old one
}
# An NGC-like image: CUDA torch (a pre-release), numpy 1.x, older packaging and regex.
IMAGE = {"torch": "2.10.0a0+b4e4ee81d3.nv25.11", "numpy": "1.26.4", "packaging": "23.2",
         "regex": "2024.5.15", "tqdm": "4.67.1", "transformers": "4.40.0",
         "transformer-engine": "2.9.0+a1b2c3", "apex": "0.1"}


def test_resolve_keeps_what_fits_and_replaces_what_a_requirement_rejects():
    env, log = FakeEnvironment(IMAGE, REQUIRES), []
    assert g.resolve(EXACT, BASE, env, log=log.append) == []
    # Round 1: the exact pins (an old transformers is replaced) and the missing pyarrow, at
    # the version that works with numpy 1.x; round 2: what the new packages reject.
    assert [c[c.index("--no-deps") + 1:] for c in env.commands] == [
        ["megatron-core==0.16.1", "pyarrow==19.0.1", "transformers==5.23.0"],
        ["packaging==26.2", "regex==2026.5.9"]]
    for command in env.commands:
        assert command[:4] == [sys.executable, "-m", "pip", "install"]
        assert "--no-deps" in command
        assert not any(re.match(r"(torch|numpy|transformer-engine|apex)\b", a) for a in command)
    assert {n: env.versions[n] for n in ("torch", "numpy", "tqdm", "transformer-engine", "apex")} \
        == {n: IMAGE[n] for n in ("torch", "numpy", "tqdm", "transformer-engine", "apex")}
    assert ("replacing the image's packaging 23.2 with 26.2 "
            "(megatron-core 0.16.1 needs packaging>=24.2)") in log
    assert any(m.startswith("pyarrow 26.0.1 needs numpy>=2 at run time") for m in log)
    # Settled: a second run (and the check) has nothing to do.
    env.commands.clear()
    assert g.resolve(EXACT, BASE, env, log=log.append) == [] and env.commands == []
    # numpy 2 in the image: the pinned pyarrow.
    env = FakeEnvironment(IMAGE | {"numpy": "2.3.0"}, REQUIRES)
    assert g.resolve(EXACT, BASE, env, log=lambda _m: None) == []
    assert env.versions["pyarrow"] == "26.0.1" and env.versions["numpy"] == "2.3.0"


def test_resolve_refuses_instead_of_touching_torch_or_numpy():
    old_torch = FakeEnvironment(IMAGE | {"torch": "2.5.0a0+nv24.10"}, REQUIRES)
    (problem,) = g.resolve(EXACT, BASE, old_torch, log=lambda _m: None)
    assert "megatron-core 0.16.1 needs torch>=2.6.0; the image has torch 2.5.0a0+nv24.10, " \
           "which this install never replaces" in problem
    assert old_torch.versions["torch"] == "2.5.0a0+nv24.10"
    old_numpy = FakeEnvironment(IMAGE | {"numpy": "1.16.0"}, REQUIRES)
    (problem,) = g.resolve(EXACT, BASE, old_numpy, log=lambda _m: None)
    assert "needs numpy>=1.17; the image has numpy 1.16.0" in problem
    unknown = FakeEnvironment(IMAGE, REQUIRES | {("transformers", "5.23.0"): ["zzz-lib>=1"]})
    (problem,) = g.resolve(EXACT, BASE, unknown, log=lambda _m: None)
    assert problem == ("transformers 5.23.0 needs zzz-lib>=1, which is not in "
                       "requirements-gpu-base.txt")
    # The check mode: plans, installs nothing.
    dry = FakeEnvironment(IMAGE, REQUIRES, dry_run=True)
    assert g.resolve(EXACT, BASE, dry, log=lambda _m: None) == []
    assert dry.planned and not dry.commands and dry.versions == IMAGE


def test_transformer_engine_range_is_megatron_cores_declared_one():
    """verify: TE against the `dev` extra megatron-core declares (read from its metadata)."""
    for te, fits in (("2.9.0+a1b2c3", True), ("2.11.0", True), ("2.7.0+0d1e2f", False),
                     ("2.12.0", False), (None, True)):
        image = {k: v for k, v in IMAGE.items() if k != "transformer-engine"}
        if te:
            image["transformer-engine"] = te
        env = FakeEnvironment(image | {"megatron-core": "0.16.1"}, REQUIRES)
        problem = g.te_range_problem(env)
        assert (problem is None) == fits, (te, problem)
        if not fits:
            assert f"Transformer Engine {te} is outside megatron-core's declared range " \
                   "<2.12.0,>=2.9.0a0" in problem


def test_refusal_of_a_torch_that_is_not_a_cuda_build(tmp_path):
    assert g.refusal(("2.11.0+cu130", "13.0", None)) is None
    assert "no torch is installed" in g.refusal(None)
    assert "torch 2.13.0+cpu is a CPU build, not a CUDA build" in \
        g.refusal(("2.13.0+cpu", None, None))
    # The real script, with a CPU torch first on the path: one line, exit 1.
    cpu = _fake_torch(tmp_path / "cpu", f"{TORCH_VERSION}+cpu")
    for command in ("install", "check"):
        result = subprocess.run([sys.executable, "docker/install_gpu.py", command], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=cpu), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 1
        assert "not a CUDA build" in (result.stdout + result.stderr)
        assert len((result.stdout + result.stderr).strip().splitlines()) == 1
    # With a CUDA torch in front, the check runs against this machine's (complete) packages.
    site = _fake_torch(tmp_path / "cuda", "2.11.0+cu130", cuda="13.0")
    result = subprocess.run([sys.executable, "docker/install_gpu.py", "check"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=site), capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_gpu_pins_are_exact_and_agree_with_requirements_txt():
    exact, base = g.read_pins(g.EXACT), g.read_pins(g.BASE)
    assert exact["megatron-core"] == "0.16.1"
    assert not set(exact) & set(base)
    assert not [n for n in exact if g.PROTECTED.match(n)]
    assert [n for n in base if g.PROTECTED.match(n)] == ["numpy"]
    assert "torch" not in exact and "torch" not in base
    cpu = {}
    with open(os.path.join(REPO, "requirements.txt")) as f:
        for line in f:
            spec = line.split("#")[0].split(";")[0].strip()
            if "==" in spec:
                name, _, version = spec.partition("==")
                cpu[g.canonical(name)] = version.strip()
    for name, version in (exact | base).items():
        if name in cpu:
            assert version == cpu[name], f"{name}: GPU pin {version}, requirements.txt {cpu[name]}"
    # Everything requirements.txt pins is on the GPU path, except the two launchers' packages.
    assert set(cpu) - set(exact) - set(base) <= {"deepspeed", "mpi4py"}


# ---- docker/Dockerfile --------------------------------------------------------------------------
def _instructions(path):
    """[(KEYWORD, text)] of a Dockerfile: continuation lines joined, comments dropped."""
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_invariants():
    steps = _instructions(DOCKERFILE)
    keywords = [k for k, _ in steps]
    # The base image is a build ARG with a default, declared before the one FROM that uses it.
    assert keywords.count("FROM") == 1
    first_from = keywords.index("FROM")
    base = [rest for k, rest in steps[:first_from] if k == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert len(base) == 1
    assert re.fullmatch(r"BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base[0])
    assert steps[first_from][1] in ("${BASE_IMAGE}", "$BASE_IMAGE")
    runs = [rest for k, rest in steps if k == "RUN"]
    # Every pip install keeps its hands off dependencies; nothing installs torch.
    for run in runs:
        for command in re.split(r"&&|\|\||;|\|", run):
            if re.search(r"\bpip3?\s+install\b|-m\s+pip\s+install\b", command):
                assert "--no-deps" in command or re.search(r"(\s-c\s|--constraint)", command), \
                    command
                assert not re.search(r"\btorch\b", command), command
            assert not re.search(r"\b(conda|mamba|uv\s+pip)\s+install\b", command), command
    # What it runs is `make install-gpu`, with torch.__version__ recorded before and compared
    # after.
    install = [i for i, run in enumerate(runs) if re.search(r"\bmake\s+install-gpu\b", run)]
    assert len(install) == 1
    before = [i for i, run in enumerate(runs) if "torch.__version__" in run and i < install[0]]
    after = [i for i, run in enumerate(runs) if "torch.__version__" in run and i > install[0]]
    assert before and after
    assert "exit 1" in runs[after[0]] and "!=" in runs[after[0]]
    # The TE check is on in the image build.
    assert "TE_CHECK=${TE_CHECK}" in runs[install[0]]
    assert ("ARG", "TE_CHECK=error") in steps


@pytest.mark.parametrize("name", ["requirements-gpu.txt", "requirements-gpu-base.txt"])
def test_gpu_requirement_files_are_exact_pins(name):
    with open(os.path.join(REPO, "docker", name)) as f:
        specs = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    assert specs
    for spec in specs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.+!-]*", spec), spec
