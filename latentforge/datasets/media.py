"""Probe and decode images, videos and audio with real decoders.

`probe` is the gate a curation pipeline puts in front of everything else: it either returns a
`ProbeResult` or raises `MediaError` whose `reason` is a short code a filter can count and route on.
The `decode_*` functions return model-ready numpy arrays and raise `MediaError` on failure too, so
callers handle a single exception type.

Video goes through decord first and falls back to PyAV; both are imported lazily because they are
heavy and most workers never touch video.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
AUDIO_EXTS = {".wav", ".flac", ".ogg"}
_MODALITY_BY_EXT = {
    **dict.fromkeys(IMAGE_EXTS, "image"),
    **dict.fromkeys(VIDEO_EXTS, "video"),
    **dict.fromkeys(AUDIO_EXTS, "audio"),
}

_SNIFF_BYTES = 32
# (prefix, modality, label); labels carry their article so error messages read naturally.
_PREFIX_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image", "a PNG image"),
    (b"\xff\xd8\xff", "image", "a JPEG image"),
    (b"GIF8", "image", "a GIF image"),
    (b"\x1a\x45\xdf\xa3", "video", "a Matroska/WebM video"),
    (b"fLaC", "audio", "a FLAC audio file"),
    (b"OggS", "audio", "an Ogg audio file"),
)
_RIFF_FORMS = {
    b"WEBP": ("image", "a WebP image"),
    b"AVI ": ("video", "an AVI video"),
    b"WAVE": ("audio", "a WAV audio file"),
}
# ISO-BMFF brands that hold still images rather than video.
_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"}
# BITMAPINFOHEADER sizes; "BM" alone is too weak a signature (plenty of text starts with it).
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}
# EXIF orientations that rotate by 90 degrees and therefore swap width and height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


class MediaError(Exception):
    """A file that cannot be used; `reason` is a short machine-friendly code, str(e) a human sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce replays only `args` (the message), which would break copying the error
        # or shipping it between Ray workers.
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class ProbeResult:
    """What `probe` learned about a usable file; fields that do not apply to the modality are 0."""

    modality: str
    width: int = 0
    height: int = 0
    num_frames: int = 0
    fps: float = 0.0
    duration_s: float = 0.0
    sample_rate: int = 0
    channels: int = 0
    decoder: str = ""
    # A video's middle frame (uint8 HxWx3) when the probe decoded it on the way: the frame
    # `decode_video(path, 1, native size)` returns, so a stage that wants it need not open the file again.
    key_frame: np.ndarray | None = field(default=None, repr=False, compare=False)


def modality_from_extension(path: str | Path) -> str | None:
    """Return "image", "video" or "audio" from the file extension, or None if it is not one of ours."""
    return _MODALITY_BY_EXT.get(Path(path).suffix.lower())


def sniff_modality(path: str | Path) -> str | None:
    """Return the modality the file's magic bytes indicate, or None if they are not recognised."""
    found = _sniff(_read_head(Path(path)))
    return found[0] if found else None


def _read_head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(_SNIFF_BYTES)


def _sniff(head: bytes) -> tuple[str, str] | None:
    """Map leading bytes to (modality, label)."""
    for prefix, modality, label in _PREFIX_SIGNATURES:
        if head.startswith(prefix):
            return modality, label
    if head[:4] == b"RIFF":
        return _RIFF_FORMS.get(head[8:12])
    if head[4:8] == b"ftyp":
        if head[8:12] in _IMAGE_BRANDS:
            return "image", "a HEIF/AVIF image"
        return "video", "an MP4/QuickTime video"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "image", "a BMP image"
    return None


def probe(path: str | Path, *, max_pixels: int = 64_000_000, timeout_s: float = 30.0) -> ProbeResult:
    """Check that a file is usable media and describe it, or raise `MediaError`.

    Reasons: not_found, empty_file, unsupported_extension, extension_mismatch, decode_error,
    too_large, no_content, decode_timeout, unsupported_codec (the container is fine but neither decoder
    has a decoder for its video stream's codec).
    """
    path = Path(path)
    modality = _check_container(path)
    if modality == "image":
        return _run_with_timeout(lambda: _probe_image(path, max_pixels), timeout_s, "PIL")
    if modality == "video":
        return _video_with_fallback(lambda: _decord_probe(path), lambda: _pyav_probe(path), timeout_s)
    return _run_with_timeout(lambda: _probe_audio(path), timeout_s, "soundfile")


def _check_container(path: Path) -> str:
    """The cheap checks before any decoder runs; returns the modality the extension claims."""
    if not path.is_file():
        raise MediaError("not_found", f"{path} does not exist or is not a regular file")
    if path.stat().st_size == 0:
        raise MediaError("empty_file", f"{path.name} is empty (0 bytes)")
    modality = modality_from_extension(path)
    if modality is None:
        raise MediaError("unsupported_extension", f"extension {path.suffix or '(none)'!r} is not a known media type")
    sniffed = _sniff(_read_head(path))
    # Unrecognised magic is left to the decoder to judge: some valid containers (old QuickTime) have none.
    if sniffed is not None and sniffed[0] != modality:
        ext = path.suffix.lower()
        raise MediaError("extension_mismatch", f"extension {ext} says {modality} but content is {sniffed[1]}")
    return modality


def _run_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` on a worker thread and give up waiting after `timeout_s`.

    A stuck decoder thread cannot be killed from Python; on timeout the caller simply moves on and
    the thread is abandoned. It is a daemon thread rather than a ThreadPoolExecutor worker because
    the executor joins its workers at interpreter exit, so one hung decode would hang shutdown.
    """
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def work() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn())
        except BaseException as exc:  # re-raised in the caller's thread by future.result()
            future.set_exception(exc)

    threading.Thread(target=work, name=f"media-{what}", daemon=True).start()
    done, _ = concurrent.futures.wait([future], timeout=timeout_s)
    if not done:
        raise MediaError("decode_timeout", f"{what} did not finish within {timeout_s:g}s")
    return future.result()


def _short(exc: BaseException) -> str:
    """First line of an exception, capped: decord appends whole C++ backtraces to its messages, and starts
    them with the time of day (`[22:10:55] `), dropped so the same file is rejected with the same message."""
    lines = str(exc).strip().splitlines()
    first = re.sub(r"^\[\d{2}:\d{2}:\d{2}\] ", "", lines[0]) if lines else ""
    return f"{type(exc).__name__}: {first[:300]}"


# ---------------------------------------------------------------- images


def _probe_image(path: Path, max_pixels: int) -> ProbeResult:
    try:
        with Image.open(path) as img:
            # Checked on the header alone, before any pixel is decoded. This also pre-empts PIL's
            # DecompressionBombWarning, which cannot be trapped thread-safely via warnings filters.
            _check_pixels(*img.size, max_pixels)
            img.verify()  # must come straight after open, before anything else reads the file
        with Image.open(path) as img:  # verify() leaves the image unusable; reopen to really decode
            img.load()
            width, height = _oriented_size(img)
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError("too_large", str(exc)) from exc
    except Exception as exc:  # PIL surfaces corrupt data as many types (OSError, SyntaxError, struct.error, ...)
        raise MediaError("decode_error", f"PIL could not decode {path.name}: {_short(exc)}") from exc
    return ProbeResult("image", width=width, height=height, num_frames=1, decoder="pil")


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image will be shown, i.e. after its EXIF orientation is applied."""
    width, height = img.size
    if img.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaError("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")


def decode_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode to uint8 (H, W, 3) RGB, resized to cover `size`=(H, W) and centre-cropped."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft keeps the result >= the target.
            img.draft("RGB", (size[1], size[0]))
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise MediaError("too_large", str(exc)) from exc
    except Exception as exc:  # see _probe_image
        raise MediaError("decode_error", f"PIL could not decode {path.name}: {_short(exc)}") from exc
    return resize_crop(np.array(rgb), size)  # a copy: arrays viewing PIL memory are read-only


def resize_crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Aspect-preserving bicubic resize so `frame` covers `size`=(H, W), then a centre crop."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {frame.dtype} {frame.shape}")
    out_h, out_w = size
    in_h, in_w = frame.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return frame
    scale = max(out_h / in_h, out_w / in_w)
    new_w, new_h = max(out_w, round(in_w * scale)), max(out_h, round(in_h * scale))
    resized = Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return np.asarray(resized)[top : top + out_h, left : left + out_w].copy()  # writable, unlike PIL's buffer


# ---------------------------------------------------------------- video


def _video_with_fallback(read_decord: Callable[[], T], read_pyav: Callable[[], T], timeout_s: float) -> T:
    """Try decord, then PyAV; a decord timeout is final so one bad file costs at most `timeout_s` there."""
    try:
        return _run_with_timeout(read_decord, timeout_s, "decord")
    except MediaError as exc:
        if exc.reason == "decode_timeout":
            raise
        first: BaseException = exc
    except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
        first = exc
    logger.debug("decord failed (%s); falling back to PyAV", _short(first))
    try:
        return _run_with_timeout(read_pyav, timeout_s, "PyAV")
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises av.error.* (InvalidDataError, ...) and others
        if type(exc).__name__ == "DecoderNotFoundError":  # av.error's; by name so av is not imported here
            raise MediaError("unsupported_codec", f"no decoder for the video stream's codec (decord: "
                             f"{_short(first)}; PyAV: {_short(exc)})") from exc
        raise MediaError("decode_error", f"decord: {_short(first)}; PyAV: {_short(exc)}") from exc


def worker_threads() -> int | None:
    """Threads a worker's native libraries (decoders, torch, OpenCV, onnxruntime) should use: the CPUs Ray
    granted this worker, which Ray exports as OMP_NUM_THREADS; None outside a Ray worker (the libraries' own
    defaults, one thread per core).

    Each library otherwise starts one thread per core in every worker, and onnxruntime's threads spin while
    they wait: three actors on two cores then spend most of their time fighting over them."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def open_decord(path: str | Path, **kwargs: Any) -> Any:
    """A decord VideoReader on the CPU with `worker_threads()` decoder threads (FFmpeg's choice outside a
    worker). FFmpeg's frame threads start on every open, and a few frames per clip never keep them busy: on
    2 s clips at 256 px one thread probes with 1.5x less CPU and less wall time (bench/decode.py, BENCHMARKS)."""
    import decord  # lazy: heavy import most workers never need

    # The bridge is process-global; another library may have switched it to torch.
    decord.bridge.set_bridge("native")
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=worker_threads() or 0, **kwargs)


def _decord_probe(path: Path) -> ProbeResult:
    reader = open_decord(path)
    num_frames = len(reader)
    if num_frames == 0:
        raise MediaError("no_content", "video has no frames")
    # The index can claim frames a truncated file does not have; decoding both ends proves it. The middle frame
    # comes with them for no measurable CPU, against a second open for whoever wants it (bench/decode.py).
    middle = int(_even_indices(num_frames, 1)[0])
    frames = reader.get_batch([0, middle, num_frames - 1]).asnumpy()
    result = _video_result(frames.shape[2], frames.shape[1], num_frames, float(reader.get_avg_fps()), "decord")
    return replace(result, key_frame=frames[1])


def _video_result(width: int, height: int, num_frames: int, fps: float, decoder: str) -> ProbeResult:
    duration = num_frames / fps if fps > 0 else 0.0
    return ProbeResult("video", width, height, num_frames, fps, duration, decoder=decoder)


def _pyav_video_stream(container: Any) -> Any:
    if not container.streams.video:
        raise MediaError("no_content", "file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    # No codec context when FFmpeg has no decoder for the stream: decoding then raises DecoderNotFoundError.
    if (threads := worker_threads()) and stream.codec_context is not None:  # see open_decord
        stream.codec_context.thread_count = threads
    return stream


def _pyav_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _pyav_probe(path: Path) -> ProbeResult:
    """Decode every frame: slower than decord's index, but this path only runs on files decord refused."""
    import av  # lazy, see open_decord

    with av.open(str(path)) as container:
        stream = _pyav_video_stream(container)
        fps, num_frames, width, height = _pyav_fps(stream), 0, 0, 0
        for frame in container.decode(stream):
            if num_frames == 0:
                width, height = frame.width, frame.height
            num_frames += 1
    if num_frames == 0:
        raise MediaError("no_content", "video has no decodable frames")
    return _video_result(width, height, num_frames, fps, "pyav")


def _even_indices(total: int, count: int) -> np.ndarray:
    """Centres of `count` equal segments of the clip, so the returned frames are evenly spaced."""
    indices = ((np.arange(count) + 0.5) * total / count).astype(np.int64)
    return np.clip(indices, 0, total - 1)


def decode_video(
    path: str | Path, num_frames: int, size: tuple[int, int], *, timeout_s: float = 30.0
) -> tuple[np.ndarray, float]:
    """Decode `num_frames` evenly spaced frames as uint8 (T, H, W, 3); also return their frame rate."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    path = Path(path)
    return _video_with_fallback(
        lambda: _decord_decode(path, num_frames, size), lambda: _pyav_decode(path, num_frames, size), timeout_s
    )


def _decord_decode(path: Path, num_frames: int, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    reader = open_decord(path)
    total = len(reader)
    if total == 0:
        raise MediaError("no_content", "video has no frames")
    batch = reader.get_batch(_even_indices(total, num_frames).tolist()).asnumpy()
    frames = np.stack([resize_crop(frame, size) for frame in batch])
    return frames, float(reader.get_avg_fps()) * num_frames / total  # frames are total/num_frames apart


def _pyav_frame_count(path: Path) -> tuple[int, float]:
    """(frame count, fps) from the header, or by demuxing packets (no decoding) when it has none."""
    import av

    with av.open(str(path)) as container:
        stream = _pyav_video_stream(container)
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        return total, _pyav_fps(stream)


def _pyav_decode(path: Path, num_frames: int, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """One decode pass that keeps only the wanted frames, so memory stays at num_frames, not the clip."""
    import av

    total, fps = _pyav_frame_count(path)
    if total == 0:
        raise MediaError("no_content", "video has no frames")
    indices = _even_indices(total, num_frames)
    wanted, kept = set(indices.tolist()), {}
    with av.open(str(path)) as container:
        for position, frame in enumerate(container.decode(_pyav_video_stream(container))):
            if position in wanted:
                kept[position] = resize_crop(frame.to_ndarray(format="rgb24"), size)
            if position >= indices[-1]:
                break
    if not kept:
        raise MediaError("no_content", "video has no decodable frames")
    # A truncated file may hold fewer frames than its header says: clamp to the last one decoded.
    last = max(kept)
    frames = np.stack([kept[min(i, last)] for i in indices.tolist()])
    return frames, fps * num_frames / total


# ---------------------------------------------------------------- audio


def _probe_audio(path: Path) -> ProbeResult:
    try:
        info = sf.info(str(path))
        if info.frames > 0:  # the header can promise samples a damaged body does not hold
            sf.read(str(path), frames=min(info.frames, 4096), dtype="float32")
    except Exception as exc:  # libsndfile errors, plus whatever a damaged header provokes
        raise MediaError("decode_error", f"soundfile could not decode {path.name}: {_short(exc)}") from exc
    if info.frames == 0:
        raise MediaError("no_content", "audio has zero samples")
    duration = info.frames / info.samplerate
    return ProbeResult("audio", 0, 0, info.frames, 0.0, duration, info.samplerate, info.channels, "soundfile")


def decode_audio(path: str | Path, sample_rate: int, num_samples: int) -> np.ndarray:
    """Decode to float32 mono at `sample_rate`, cut or zero-padded to exactly `num_samples`."""
    path = Path(path)
    try:
        source_rate = sf.info(str(path)).samplerate
        needed = int(np.ceil(num_samples * source_rate / sample_rate)) + 1  # +1 for the interpolation edge
        data, _ = sf.read(str(path), frames=needed, dtype="float32", always_2d=True)
    except Exception as exc:  # see _probe_audio
        raise MediaError("decode_error", f"soundfile could not decode {path.name}: {_short(exc)}") from exc
    mono = _resample(data.mean(axis=1), source_rate, sample_rate)[:num_samples]
    out = np.zeros(num_samples, dtype=np.float32)
    out[: len(mono)] = mono
    return out


def _resample(signal: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Linear interpolation; no anti-alias filter, which is acceptable for curation-time scoring."""
    if source_rate == target_rate or len(signal) == 0:
        return signal.astype(np.float32, copy=False)
    count = int(round(len(signal) * target_rate / source_rate))
    positions = np.arange(count) * (source_rate / target_rate)
    return np.interp(positions, np.arange(len(signal)), signal).astype(np.float32)


def decode_video_audio(path: str | Path, sample_rate: int, start_s: float = 0.0, end_s: float | None = None,
                       *, timeout_s: float = 30.0) -> np.ndarray | None:
    """float32 mono at `sample_rate` of a video's first audio track within [start_s, end_s); None if it has none."""
    path = Path(path)

    def read() -> np.ndarray | None:
        import av  # lazy, see open_decord

        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            # libswresample through PyAV: anti-aliased rate conversion, which _resample is not. Channels are
            # averaged here, as decode_audio does (its mono downmix adds them at -3 dB and can clip).
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
        return _run_with_timeout(read, timeout_s, "pyav audio")
    except MediaError:
        raise
    except Exception as exc:  # PyAV/FFmpeg errors on a damaged track
        raise MediaError("decode_error", f"pyav could not decode the audio of {path.name}: {_short(exc)}") from exc
