"""Probe media files with real decoders; decode images (videos: `datasets.video`, audio: `datasets.audio`).

`probe` is the gate a curation pipeline puts in front of everything else: it either returns a
`ProbeResult` or raises `MediaError` whose `reason` is a short code a filter can count and route on.
The `decode_*` functions return model-ready numpy arrays and raise `MediaError` on failure too, so
callers handle a single exception type.

Video goes through decord first and falls back to PyAV (`video.py`); both are imported lazily because
they are heavy and most workers never touch video.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from PIL import Image, ImageOps

T = TypeVar("T")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".m4a", ".aac"}  # see datasets/audio.py
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
    (b"ID3", "audio", "an MP3 audio file"),  # an ID3v2 tag in front of the MPEG frames
)
_IFF_FORMS = {b"AIFF": ("audio", "an AIFF audio file"), b"AIFC": ("audio", "an AIFF audio file")}
_RIFF_FORMS = {
    b"WEBP": ("image", "a WebP image"),
    b"AVI ": ("video", "an AVI video"),
    b"WAVE": ("audio", "a WAV audio file"),
}
# ISO-BMFF brands that hold still images, or audio, rather than video.
_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P "}
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
    # Pixels the probe decoded on the way (uint8 HxWx3), so a stage that wants them need not open the file
    # again: a video's middle frame (what `video.decode_video(path, 1, native size)` returns), or an image at
    # the reduced scale `thumb_side` asked for.
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
    if head[:4] == b"FORM":
        return _IFF_FORMS.get(head[8:12])
    if head[4:8] == b"ftyp":
        if head[8:12] in _IMAGE_BRANDS:
            return "image", "a HEIF/AVIF image"
        if head[8:12] in _AUDIO_BRANDS:
            return "audio", "an MPEG-4 audio file"
        return "video", "an MP4/QuickTime video"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "image", "a BMP image"
    # An MPEG audio frame's 11-bit sync word (an MP3 without an ID3 tag, ADTS AAC; JPEG's FF D8 was matched above),
    # not UTF-16 text's byte-order mark FF FE.
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] != 0xFE:
        return "audio", "an MPEG audio file"
    return None


def probe(path: str | Path, *, max_pixels: int = 64_000_000, timeout_s: float = 30.0,
          thumb_side: int | None = None) -> ProbeResult:
    """Check that a file is usable media and describe it, or raise `MediaError`.

    Reasons: not_found, empty_file, unsupported_extension, extension_mismatch, decode_error,
    too_large, no_content, decode_timeout, unsupported_codec (the container is fine but neither decoder
    has a decoder for its video stream's codec).

    `thumb_side`: also return an image's pixels as `key_frame`, upright RGB at the smallest JPEG scale whose
    sides are still >= thumb_side (`upright_rgb`), for a stage that wants a small view of it (the pHash).
    """
    path = Path(path)
    modality = _check_container(path)
    if modality == "image":
        return run_with_timeout(lambda: _probe_image(path, max_pixels, thumb_side), timeout_s, "PIL")
    from latentforge.datasets import audio, video  # lazy: they import this module

    if modality == "video":
        try:
            return video.with_fallback(lambda: video.decord_probe(path), lambda: video.pyav_probe(path), timeout_s)
        except MediaError as exc:  # a container of video's kind that holds only sound (a podcast's .webm): audio
            if exc.reason != "no_content" or not run_with_timeout(lambda: audio.sound_only(path), timeout_s, "PyAV"):
                raise
    return run_with_timeout(lambda: audio.probe_audio(path), timeout_s, "audio decoder")


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


def run_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
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


def short_error(exc: BaseException) -> str:
    """First line of an exception, capped: decord appends whole C++ backtraces to its messages, and starts
    them with the time of day (`[22:10:55] `), dropped so the same file is rejected with the same message."""
    lines = str(exc).strip().splitlines()
    first = re.sub(r"^\[\d{2}:\d{2}:\d{2}\] ", "", lines[0]) if lines else ""
    return f"{type(exc).__name__}: {first[:300]}"


def worker_threads() -> int | None:
    """Threads a worker's native libraries (decoders, torch, OpenCV, onnxruntime) should use: the CPUs Ray
    granted this worker, which Ray exports as OMP_NUM_THREADS; None outside a Ray worker (the libraries' own
    defaults, one thread per core).

    Each library otherwise starts one thread per core in every worker, and onnxruntime's threads spin while
    they wait: three actors on two cores then spend most of their time fighting over them."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, a container's cpuset, a batch scheduler's
    allocation), not every core the machine has, which `os.cpu_count()` counts."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on macOS / Windows
        return os.cpu_count() or 1


# ---------------------------------------------------------------- images


def _probe_image(path: Path, max_pixels: int, thumb_side: int | None) -> ProbeResult:
    key_frame = None
    try:
        with Image.open(path) as img:
            # Checked on the header alone, before any pixel is decoded. This also pre-empts PIL's
            # DecompressionBombWarning, which cannot be trapped thread-safely via warnings filters.
            _check_pixels(*img.size, max_pixels)
            img.verify()  # must come straight after open, before anything else reads the file
        with Image.open(path) as img:  # verify() leaves the image unusable; reopen to really decode
            width, height = _oriented_size(img)  # before draft, which shrinks img.size
            # A JPEG decoded at 1/8 scale still entropy-decodes every byte, so a truncated or corrupt body
            # fails exactly as at full size, for 2-4x less CPU on photos (bench/probe_images.py).
            if thumb_side:
                key_frame = np.asarray(upright_rgb(img, (thumb_side, thumb_side)))
            else:
                img.draft("RGB", (1, 1))
                img.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError("too_large", str(exc)) from exc
    except Exception as exc:  # PIL surfaces corrupt data as many types (OSError, SyntaxError, struct.error, ...)
        raise MediaError("decode_error", f"PIL could not decode {path.name}: {short_error(exc)}") from exc
    return ProbeResult("image", width=width, height=height, num_frames=1, decoder="pil", key_frame=key_frame)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image will be shown, i.e. after its EXIF orientation is applied."""
    width, height = img.size
    if img.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaError("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")


def upright_rgb(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`img` decoded in RGB, EXIF orientation applied. A JPEG decodes at 1/2, 1/4 or 1/8 scale for free when
    that still covers `size` (H, W); other formats decode at full size."""
    img.draft("RGB", (size[1], size[0]))
    return _to_rgb(ImageOps.exif_transpose(img))


_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16- (and 32-) bit greys: 16-bit PNG, PGM
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any mode. PIL's `convert("RGB")` alone clips 16-bit greys at 255 (a 16-bit PNG came out
    nearly all white): they are scaled to 8 bits instead. Transparency (an alpha channel, or a palette or colour
    key marked transparent) is composited over white, as a viewer shows it: the colour stored under a transparent
    pixel is arbitrary (usually black), and the pixels a model would learn from should be the visible ones."""
    if img.mode in _WIDE_GREY_MODES:
        grey = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and grey.max(initial=0) <= 255:  # an "I" image that holds 8-bit values
            scaled = grey
        else:
            scaled = grey / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode to uint8 (H, W, 3) RGB, resized to cover `size`=(H, W) and centre-cropped."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            rgb = upright_rgb(img, size)
    except Image.DecompressionBombError as exc:
        raise MediaError("too_large", str(exc)) from exc
    except Exception as exc:  # see _probe_image
        raise MediaError("decode_error", f"PIL could not decode {path.name}: {short_error(exc)}") from exc
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
