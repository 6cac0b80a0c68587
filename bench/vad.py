"""Silero VAD in FilterAudioQuality: one clip at a time vs the stage's batched pass, both measured in this run.

    .venv/bin/python bench/vad.py [--clips 256] [--seconds 4] [--batch 16] [--rate 16000]

Builds `--clips` mono signals in memory (a third pulse trains through formant resonators, a third noise, a
third tones; the model's cost does not depend on what it hears), runs the packaged Silero ONNX model on one onnxruntime thread (as each curation worker
does) over every 32 ms window, first clip by clip (one session call per window per clip: the stage's code before
batching), then `--batch` clips per pass (`speech_ratios`, what the stage does now with its batch of 16). Prints
process CPU seconds and clips/s of each, the ratio, and checks that both give the same ratio for every clip.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def signals(count: int, seconds: float, rate: int) -> list[np.ndarray]:
    from scipy.signal import lfilter

    rng, n, out = np.random.default_rng(0), int(seconds * rate), []
    for i in range(count):
        if i % 3 == 0:  # pulse train at a drifting pitch through two formant resonators
            f0 = 110 + 40 * np.sin(np.arange(n) / rate * rng.uniform(1, 3))
            source = (np.diff(np.floor(np.cumsum(f0 / rate)), prepend=0) > 0).astype(np.float64)
            for formant in rng.uniform([500, 1200], [800, 2400]):
                r = np.exp(-np.pi * 100 / rate)
                source = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * formant / rate), r * r], source)
            signal = source * np.abs(np.sin(np.arange(n) / rate * np.pi * 3))  # syllable envelope
        elif i % 3 == 1:
            signal = rng.standard_normal(n) * 0.1
        else:
            signal = 0.5 * np.sin(2 * np.pi * rng.uniform(200, 2000) * np.arange(n) / rate)
        out.append((signal / max(np.abs(signal).max(), 1e-9) * 0.5).astype(np.float32))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rate", type=int, default=16000, choices=(8000, 16000))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from latentforge.pipelines.stages.filter_audio import load_silero_vad, speech_ratios

    session, clips = load_silero_vad(), signals(args.clips, args.seconds, args.rate)
    speech_ratios(session, clips[:2], args.rate)  # warm-up

    start = time.process_time()
    alone = [speech_ratios(session, [clip], args.rate)[0] for clip in clips]
    one_s = time.process_time() - start
    start = time.process_time()
    batched = [r for i in range(0, len(clips), args.batch)
               for r in speech_ratios(session, clips[i:i + args.batch], args.rate)]
    batch_s = time.process_time() - start
    assert batched == alone, "batched VAD changed a clip's speech ratio"
    print(json.dumps({
        "clips": args.clips, "seconds": args.seconds, "rate": args.rate, "batch": args.batch,
        "one_at_a_time_cpu_s": round(one_s, 2), "batched_cpu_s": round(batch_s, 2),
        "one_at_a_time_clips_per_s": round(args.clips / one_s, 1), "batched_clips_per_s": round(args.clips / batch_s, 1),
        "ratio_batched_over_one_at_a_time": round(one_s / batch_s, 2),
        "mean_speech_ratio_by_kind": [round(float(np.mean(alone[k::3])), 3) for k in range(3)],
    }))


if __name__ == "__main__":
    main()
