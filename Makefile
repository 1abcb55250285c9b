# The README's commands. Each target installs what it needs into .venv first (once): torch and the package
# in one pip call, without pip's byte-compiling, which runs on one core; compileall then byte-compiles the
# same files on every core (a file that does not compile under this Python, such as torch's Python 3.12
# test helpers, is skipped, as pip skips it). Measured on 2 cores: 40 s instead of 52-63 s.
# TORCH_SPEC pins the torch build: 2.13.0 installs in seconds on our CPU machines and CI;
# on a GPU machine `make demo TORCH_SPEC=torch` (or any CUDA build) keeps your GPU.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test completions clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile "$(TORCH_SPEC)" -e ".[test]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

demo: $(VENV)/.installed
	$(BIN)/cogtune demo --output-dir demo

# Two worker processes (pytest-xdist), one test file each at a time; tiny models, caches and the
# multi-process runs several files resume are built once per run and shared by the workers (tests/conftest.py).
# Measured on an idle 2-core machine, fresh clone, `CI=true bash .ci/run`, 1,270 tests: 442 to 481 s of pytest
# (8 min 15 s to 8 min 57 s with the install); with an empty torch.compile cache (TORCHINDUCTOR_CACHE_DIR) 473 s.
# Before cogtune.startup (a command's imports without the garbage collector): 600 s for 1,252 tests.
# `--dist worksteal` took longer (728 s when loadfile took 621 s).
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

completions: $(VENV)/.installed
	$(BIN)/cogtune completion bash > completions/cogtune.bash
	$(BIN)/cogtune completion zsh > completions/_cogtune
	$(BIN)/cogtune completion fish > completions/cogtune.fish

clean:
	rm -rf $(VENV) demo .pytest_cache
