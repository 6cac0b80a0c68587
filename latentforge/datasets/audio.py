"""Probe and decode audio files: libsndfile (soundfile) for WAV, FLAC, Ogg (Vorbis, Opus), MP3 and AIFF, PyAV
(FFmpeg) for AAC in MPEG-4 (.m4a) or ADTS (.aac), which libsndfile cannot read, and for video containers that
hold only sound (an .mp4 or .webm of a podcast or a soundtrack: `media.probe` calls them audio).

Both return the file's own float32 samples (frames, channels) at its own rate; `decode_audio` mixes them to mono
and resamples them through an anti-aliasing filter. Every failure is a `MediaError` with a reason code, as in
`media`, which calls `probe_audio` for files its extension check says are audio. `decode_video_audio` reads the
sound of a video (its first audio track over a clip's span), for the audio captioner.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from latentforge.datasets.media import VIDEO_EXTS, MediaError, ProbeResult, run_with_timeout, short_error

FFMPEG_EXTS = {".m4a", ".aac"} | VIDEO_EXTS  # decoded by PyAV: AAC, and video containers holding only sound
_PROBE_FRAMES = 4096  # decoded from each end of a file
_TAIL_SECONDS = 1.0  # PyAV: decoded from the end of an MPEG-4 file, whose header holds its exact duration
# scipy's resample_poly default: a Kaiser-windowed sinc of 2 * 10 * max(up, down) + 1 taps at the upsampled rate,
# i.e. 10 input samples each side (more when downsampling: 10 * source / target).
_FILTER_HALF_TAPS = 10
_MAX_FACTOR = 2048  # up / down beyond this (coprime odd rates): the ratio is approximated to a few ppm


def probe_audio(path: Path) -> ProbeResult:
    """Describe a usable audio file or raise MediaError: its header, its first frames and its last decoded (the
    header can promise samples a damaged body does not hold: a FLAC, MP3 or M4A cut short keeps a header counting
    every sample; WAV and AIFF count what is there)."""
    if path.suffix.lower() in FFMPEG_EXTS:
        return _pyav_probe(path)
    try:
        info = sf.info(str(path))
        if info.frames > 0:
            with sf.SoundFile(str(path)) as handle:
                handle.read(min(info.frames, _PROBE_FRAMES), dtype="float32")
                if info.frames > _PROBE_FRAMES:
                    handle.seek(info.frames - _PROBE_FRAMES)
                    if len(handle.read(_PROBE_FRAMES, dtype="float32")) < _PROBE_FRAMES:
                        raise MediaError("decode_error", f"{path.name} ends before the {info.frames} samples its "
                                                         "header counts (truncated)")
    except MediaError:
        raise
    except Exception as exc:  # libsndfile errors, plus whatever a damaged header provokes
        raise MediaError("decode_error", f"soundfile could not decode {path.name}: {short_error(exc)}") from exc
    if info.frames == 0:
        raise MediaError("no_content", "audio has zero samples")
    duration = info.frames / info.samplerate
    return ProbeResult("audio", 0, 0, info.frames, 0.0, duration, info.samplerate, info.channels, "soundfile")


def sound_only(path: Path) -> bool:
    """Whether a container holds an audio stream and no video stream."""
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio) and not container.streams.video
    except Exception:  # noqa: BLE001 - unreadable: not audio either; the caller keeps its own error
        return False


def _pyav_probe(path: Path) -> ProbeResult:
    import av  # lazy: most workers never decode AAC

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError("no_content", f"{path.name} has no audio stream")
            stream = container.streams.audio[0]
            rate, channels = int(stream.rate or 0), int(stream.channels or 0)
            duration = float(container.duration or 0) / av.time_base
            if next(iter(container.decode(stream)), None) is None or rate <= 0:
                raise MediaError("no_content", f"{path.name} has no decodable audio")
            if duration <= 0:  # a container that records no duration (a live-written WebM): counted by decoding
                container.seek(0)
                duration = sum(frame.samples for frame in container.decode(stream)) / rate
            # MPEG-4 records the exact duration, ADTS only an estimate from the bit rate (and WebM may record none):
            # only MPEG-4's end is checked.
            if "mp4" in container.format.name and duration > _TAIL_SECONDS:
                container.seek(int((duration - _TAIL_SECONDS) * av.time_base))
                end = max((f.time + f.samples / f.sample_rate for f in container.decode(stream)
                           if f.time is not None), default=0.0)
                if end < duration - _TAIL_SECONDS / 2:
                    where = f"ends at {end:.2f} s" if end else "has nothing to decode in its last second"
                    raise MediaError("decode_error", f"{path.name} {where}, of the {duration:.2f} s its header "
                                                     "counts (truncated)")
    except MediaError:
        raise
    except Exception as exc:  # FFmpeg errors on a damaged file (a cut MPEG-4 file lacks its index)
        raise MediaError("decode_error", f"pyav could not decode {path.name}: {short_error(exc)}") from exc
    return ProbeResult("audio", 0, 0, round(duration * rate), 0.0, duration, rate, channels, "pyav")


def decode_audio(path: str | Path, sample_rate: int, num_samples: int) -> np.ndarray:
    """Decode to float32 mono at `sample_rate`, cut or zero-padded to exactly `num_samples`."""
    data, source_rate = read_audio(path, sample_rate, num_samples)
    mono = _resample(data.mean(axis=1), source_rate, sample_rate)[:num_samples]
    out = np.zeros(num_samples, dtype=np.float32)
    out[: len(mono)] = mono
    return out


def read_audio(path: str | Path, sample_rate: int, num_samples: int) -> tuple[np.ndarray, int]:
    """The file's own float32 samples, (frames, channels) at its own rate, and that rate: as many frames as
    `num_samples` at `sample_rate` span, plus the resampling filter's reach past the last one (fewer where the
    file ends). Unmixed and not resampled, for scores that depend on the channels as recorded (clipping)."""
    path = Path(path)
    try:
        if path.suffix.lower() in FFMPEG_EXTS:
            return _pyav_read(path, sample_rate, num_samples)
        source_rate = sf.info(str(path)).samplerate
        data, _ = sf.read(str(path), frames=_frames_needed(num_samples, source_rate, sample_rate), dtype="float32",
                          always_2d=True)
    except MediaError:
        raise
    except Exception as exc:  # see probe_audio
        decoder = "pyav" if path.suffix.lower() in FFMPEG_EXTS else "soundfile"
        raise MediaError("decode_error", f"{decoder} could not decode {path.name}: {short_error(exc)}") from exc
    return data, source_rate


def _frames_needed(num_samples: int, source_rate: int, sample_rate: int) -> int:
    """Frames at `source_rate` that `num_samples` at `sample_rate` span, plus the filter's half-length (see
    _resample): the cut's last samples are then filtered from real signal, not from the zeros resample_poly pads
    an edge with."""
    ratio = source_rate / sample_rate
    return int(np.ceil(num_samples * ratio)) + int(np.ceil(_FILTER_HALF_TAPS * max(ratio, 1.0))) + 1


def _pyav_read(path: Path, sample_rate: int, num_samples: int) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise MediaError("no_content", f"{path.name} has no audio stream")
        stream = container.streams.audio[0]
        source_rate = int(stream.rate)
        needed = _frames_needed(num_samples, source_rate, sample_rate)
        resampler = av.AudioResampler(format="fltp")  # planar float at the stream's own rate and channels
        chunks, count = [], 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
                count += out.samples
            if count >= needed:
                break
    if not chunks:
        raise MediaError("no_content", f"{path.name} has no decodable audio")
    return np.ascontiguousarray(np.concatenate(chunks, axis=1)[:, :needed].T, dtype=np.float32), source_rate


def resample_channels(data: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """`_resample` of each channel of (frames, channels) data; float32 (frames', channels)."""
    return np.stack([_resample(data[:, c], source_rate, target_rate) for c in range(data.shape[1])], axis=1)


def _resample(signal: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling with an anti-aliasing low-pass at the lower rate's Nyquist (scipy's resample_poly).
    Linear interpolation, used before, folded everything above the target's Nyquist back into the band: a 7 kHz
    tone read at 8 kHz came out as a 1 kHz tone at 92% of its level, in the latents training learns from."""
    if source_rate == target_rate or len(signal) == 0:
        return signal.astype(np.float32, copy=False)
    from fractions import Fraction

    from scipy.signal import resample_poly

    ratio = Fraction(target_rate, source_rate).limit_denominator(_MAX_FACTOR)
    count = int(round(len(signal) * target_rate / source_rate))
    out = resample_poly(signal.astype(np.float32, copy=False), ratio.numerator, ratio.denominator)
    return out[:count].astype(np.float32, copy=False)


# ---------------------------------------------------------------- a video's audio track


def decode_video_audio(path: str | Path, sample_rate: int, start_s: float = 0.0, end_s: float | None = None,
                       *, timeout_s: float = 30.0) -> np.ndarray | None:
    """float32 mono at `sample_rate` of a video's first audio track within [start_s, end_s); None if it has none."""
    path = Path(path)

    def read() -> np.ndarray | None:
        import av  # lazy: most workers never decode a video's sound

        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            # libswresample through PyAV (anti-aliased, as _resample is), on the frames as they stream. Channels
            # are averaged here, as decode_audio does (a mono downmix adds them at -3 dB and can clip).
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)
            if start_s > 0:
                container.seek(int(start_s / stream.time_base), stream=stream)  # lands at or before start_s
            chunks, first = [], None
            for frame in container.decode(stream):
                if first is None:
                    first = float(frame.time if frame.time is not None else 0.0)
                if end_s is not None and frame.time is not None and frame.time >= end_s:
                    break
                chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(None)]
        mono = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        skip = max(0, round((start_s - (first or 0.0)) * sample_rate))
        stop = None if end_s is None else skip + max(0, round((end_s - start_s) * sample_rate))
        return mono[skip:stop]

    try:
        return run_with_timeout(read, timeout_s, "pyav audio")
    except MediaError:
        raise
    except Exception as exc:  # PyAV/FFmpeg errors on a damaged track
        raise MediaError("decode_error", f"pyav could not decode the audio of {path.name}: {short_error(exc)}") from exc
