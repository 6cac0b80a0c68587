#!/usr/bin/env bash
# One short run on a lent GPU machine: the CUDA tests (tests/gpu), then the MFU bench beside facebookresearch/DiT.
#
# The machine is bare (its own python3 with torch, no project install, no network), so what the tests need that
# it lacks travels as wheels in .whl/ (ignored by git; see tests/gpu/test_cuda.py's imports) and is installed
# into /tmp/site. Run from the repository root, with .whl and .ref carried (.ref/DiT/models.py: the reference):
#
#     bash scripts/device_check.sh            # on the device machine; logs land in $OUT
#     bash scripts/device_check.sh --compile both --case 256 --steps 10 --warmup 3   # other bench/mfu.py arguments
#
# Arguments go to bench/mfu.py (default: --compile off); LF_BENCH_TIMEOUT bounds it (seconds, default 300).
#
# Preparing .whl and .ref here (session 13, for the image's Python 3.12; 24 MB, under the 64 MiB a call carries;
# keep the machine's own huggingface_hub 1.x: 2.x needs httpx2, which it lacks):
#     echo /.whl/ >> .git/info/exclude; echo /.ref/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing_extensions==4.16.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 transformers==5.24.0 diffusers==0.42.1
#     mkdir -p .ref/DiT && curl -sL https://raw.githubusercontent.com/facebookresearch/DiT/main/models.py \
#       -o .ref/DiT/models.py
#
# Locally (no GPU: the tests skip) to check the script itself:
#     LF_DEVICE_CHECK_SKIP_INSTALL=1 OUT=$(mktemp -d) PATH=$PWD/.venv/bin:$PATH bash scripts/device_check.sh
#
# Exit status: the tests' (pytest's). A failing or timed-out bench is reported but does not fail the script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# 1. carried wheels (transformers 5.24 to match the project's venv; pydantic, diffusers, soundfile, ...)
if [[ "${LF_DEVICE_CHECK_SKIP_INSTALL:-0}" != 1 ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing .whl/*.whl failed (was .whl carried?)" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi -L 2>&1 || echo "device_check: nvidia-smi not found"
python3 - <<'EOF' 2>&1 | tee "$OUT/versions.log"
import sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "| transformers", transformers.__version__, transformers.__file__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF

# 2. the CUDA tests
python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs --durations=10 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "device_check: tests exit status $tests_rc"

# 3. the MFU bench beside the reference DiT (bounded; its failure is reported, not fatal)
if [[ -f .ref/DiT/models.py ]]; then
  bench_timeout=${LF_BENCH_TIMEOUT:-300}
  (($#)) || set -- --compile off
  timeout "$bench_timeout" python3 bench/mfu.py --reference .ref/DiT/models.py "$@" 2>&1 | tee "$OUT/mfu.log"
  bench_rc=${PIPESTATUS[0]}
  [[ $bench_rc == 124 ]] && echo "device_check: bench stopped after $bench_timeout s" | tee -a "$OUT/mfu.log"
else
  bench_rc=missing
  echo "device_check: .ref/DiT/models.py not found (carry .ref); bench skipped" | tee "$OUT/mfu.log"
fi
echo "device_check: tests exit status $tests_rc, bench exit status $bench_rc"
exit "$tests_rc"
