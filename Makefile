# The README's commands. Each target installs what it needs into .venv first (once): torch and the package
# in one pip call, without byte-compiling: pip compiles every installed file on one core (14,500 files, most
# never imported, such as transformers' hundreds of models), while Python writes the bytecode of what is
# imported at its first import. So the recipes run with PYTHONDONTWRITEBYTECODE unset (where it is set,
# nothing would ever be compiled to disk and every process would compile its imports again). Measured on
# 2 busy cores: byte-compiling the whole .venv 54 s of CPU; two processes importing what a command imports,
# compiling it as they go, 33 s (9 of which is the import itself).
# TORCH_SPEC pins the torch build: 2.13.0 installs in seconds on our CPU machines and CI;
# on a GPU machine `make demo TORCH_SPEC=torch` (or any CUDA build) keeps your GPU.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test completions clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile "$(TORCH_SPEC)" -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/cogtune demo --output-dir demo

# Two worker processes (pytest-xdist), one test file each at a time, the heaviest files first (tests/conftest.py;
# --no-loadscope-reorder keeps that order); tiny models, caches, the demo and the multi-process runs several
# files resume are built once per run and shared by the workers (tests/conftest.py); most multi-process runs
# fork their processes from one that imported the libraries (tests/distributed/forked.py). A test that runs
# 300 s fails (pyproject). Measured on an idle 2-core machine, fresh clone, empty HOME and compile cache,
# `CI=true bash .ci/run`, 1,283 tests: 322-365 s of pytest, 5 min 50 s to 6 min 37 s with the install (four
# runs, 628-715 s of CPU; the machine's speed varies by about a fifth: the code before, 50 s of CPU more, took
# 365-463 s, 6 min 38 s to 8 min 27 s) (earlier in this round: 466 to 506 s, 8 min 27 s to 9 min 15 s; before
# cogtune.startup, 600 s for 1,252 tests).
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
