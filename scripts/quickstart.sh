#!/usr/bin/env bash
# Install, then run the quickstart end to end: demo corpus -> latent shards -> 3-stage DiT -> MLflow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/latentforge run configs/quickstart.yaml "$@"
