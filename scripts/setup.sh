#!/usr/bin/env bash
# Creates .venv and installs latentforge with everything it needs. torch goes in first, pinned, so that
# resolving the other dependencies never pulls a multi-GB CUDA build onto a CPU-only machine.
# GPU users: install your CUDA build of torch into .venv first (or set LF_TORCH_SPEC="torch==X.Y.Z").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LF_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (CPU build where one is offered)" >&2
  # numpy with it: torch does not require it, and imported without it torch warns that NumPy is missing.
  "${PIP[@]}" install "$TORCH_SPEC" "numpy>=1.26" 2>&1 \
    | grep -v "is ignored" >&2 || true
  .venv/bin/python -c "import torch" || { echo "setup: torch failed to install" >&2; exit 1; }
fi
echo "setup: installing latentforge${EXTRAS:+[$EXTRAS]} and its dependencies" >&2
"${PIP[@]}" install -e ".${EXTRAS:+[$EXTRAS]}" 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -c "import latentforge, ray, mlflow, webdataset, decord" \
  || { echo "setup: installation incomplete" >&2; exit 1; }
