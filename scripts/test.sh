#!/usr/bin/env bash
# Install with the test (and nsfw, postgres) extras, then run the test suite (CI runs exactly this through .ci/run).
# LF_SKIP_SLOW=1 skips tests marked slow; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,nsfw,postgres  # the optional nsfw and postgres extras too, so they are tested for real
exec .venv/bin/python -m pytest "$@"
