"""Audio resampling in `datasets.audio`: the anti-aliased polyphase filter against linear interpolation (what
`media._resample` did before session 17), both measured in this run.

    .venv/bin/python bench/resample.py [--clips 64] [--seconds 4] [--rounds 5]

For each (source -> target) rate pair the curation meets (the demo corpus's 16 kHz, 44.1 / 48 kHz music and 22.05
kHz speech, down to the 8 kHz quickstart bucket or the 16 kHz of Silero VAD and Whisper; 32 -> 44.1 kHz up),
resamples `--clips` noise clips both ways, alternating, `--rounds` times, and prints the median process CPU ms per
clip of each and their ratio.
Then what each leaves of a tone above the target's Nyquist (which belongs to no band the target can hold): RMS of
the output over the tone's RMS, in dB. A resampler that does not filter folds it back into the band as another
tone (aliasing); the training latents are encoded from these samples.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from latentforge.datasets.audio import _resample

PAIRS = [(16000, 8000), (44100, 8000), (44100, 16000), (48000, 16000), (22050, 16000), (32000, 44100)]


def linear(signal: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """The baseline: the code before (np.interp at the target's sample times, no filter)."""
    count = int(round(len(signal) * target_rate / source_rate))
    positions = np.arange(count) * (source_rate / target_rate)
    return np.interp(positions, np.arange(len(signal)), signal).astype(np.float32)


def cpu_ms_per_clip(fn, clips: list[np.ndarray], source: int, target: int) -> float:
    start = time.process_time()
    for clip in clips:
        fn(clip, source, target)
    return (time.process_time() - start) * 1e3 / len(clips)


def alias_db(fn, source: int, target: int) -> float:
    """A tone at 0.875 x the source's Nyquist, above the target's: what is left of it, in dB of its own RMS."""
    hz = 0.875 * source / 2 if target < source else None
    if hz is None or hz <= target / 2:
        return float("nan")
    tone = (0.5 * np.sin(2 * np.pi * hz * np.arange(source) / source)).astype(np.float32)
    out = fn(tone, source, target)[200:-200]  # away from the edges
    return float(20 * np.log10(max(np.sqrt(np.mean(out.astype(np.float64) ** 2)), 1e-12) / (0.5 / np.sqrt(2))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for source, target in PAIRS:
        clips = [(rng.standard_normal(int(source * args.seconds)) * 0.1).astype(np.float32) for _ in range(args.clips)]
        base, new = [], []
        for r in range(args.rounds):  # alternating which goes first
            order = [(linear, base), (_resample, new)] if r % 2 == 0 else [(_resample, new), (linear, base)]
            for fn, out in order:
                out.append(cpu_ms_per_clip(fn, clips, source, target))
        row = {"pair": f"{source} -> {target}", "linear_ms": round(statistics.median(base), 2),
               "polyphase_ms": round(statistics.median(new), 2),
               "cost_ratio": round(statistics.median(new) / statistics.median(base), 2),
               "alias_linear_db": round(alias_db(linear, source, target), 1),
               "alias_polyphase_db": round(alias_db(_resample, source, target), 1)}
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
