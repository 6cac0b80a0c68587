"""Video: decord first, PyAV when decord refuses a file, every decode under a timeout.

Frames either evenly spaced over a whole video (`decode_video`) or at given times (`decode_frames_at`,
`decode_clip`: clips, shot detection); a video's own audio track is `audio.decode_video_audio`. Failures raise
`media.MediaError` like the image and audio decoders. decord and PyAV are imported lazily: they are heavy
and most workers never touch video.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from PIL import Image

from latentforge.datasets.media import (
    MediaError,
    ProbeResult,
    resize_crop,
    run_with_timeout,
    short_error,
    worker_threads,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DECODE_CHUNK = 64  # frames per decord batch in decode_frames_at: bounds memory at full resolution


def with_fallback(read_decord: Callable[[], T], read_pyav: Callable[[], T], timeout_s: float) -> T:
    """Try decord, then PyAV; a decord timeout is final so one bad file costs at most `timeout_s` there."""
    try:
        return run_with_timeout(read_decord, timeout_s, "decord")
    except MediaError as exc:
        if exc.reason == "decode_timeout":
            raise
        first: BaseException = exc
    except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
        first = exc
    logger.debug("decord failed (%s); falling back to PyAV", short_error(first))
    try:
        return run_with_timeout(read_pyav, timeout_s, "PyAV")
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises av.error.* (InvalidDataError, ...) and others
        if type(exc).__name__ == "DecoderNotFoundError":  # av.error's; by name so av is not imported here
            raise MediaError("unsupported_codec", f"no decoder for the video stream's codec (decord: "
                             f"{short_error(first)}; PyAV: {short_error(exc)})") from exc
        raise MediaError("decode_error", f"decord: {short_error(first)}; PyAV: {short_error(exc)}") from exc


def open_decord(path: str | Path, **kwargs: Any) -> Any:
    """A decord VideoReader on the CPU with `worker_threads()` decoder threads (FFmpeg's choice outside a
    worker). FFmpeg's frame threads start on every open, and a few frames per clip never keep them busy: on
    2 s clips at 256 px one thread probes with 1.5x less CPU and less wall time (bench/decode.py, BENCHMARKS)."""
    import decord  # lazy: heavy import most workers never need

    # The bridge is process-global; another library may have switched it to torch.
    decord.bridge.set_bridge("native")
    # FFmpeg inside decord writes each broken file's complaint ("moov atom not found") to stderr, which Ray
    # forwards from every worker to the driver's console. The sample's recorded message carries decord's and
    # PyAV's errors for that file already.
    decord.logging.set_level(decord.logging.QUIET)
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=worker_threads() or 0, **kwargs)


def decord_probe(path: Path) -> ProbeResult:
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


def pyav_video_stream(container: Any) -> Any:
    if not container.streams.video:
        raise MediaError("no_content", "file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    # No codec context when FFmpeg has no decoder for the stream: decoding then raises DecoderNotFoundError.
    if (threads := worker_threads()) and stream.codec_context is not None:  # see open_decord
        stream.codec_context.thread_count = threads
    return stream


def pyav_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def pyav_probe(path: Path) -> ProbeResult:
    """The frame count from the container's packets (demuxed, not decoded), and the first, middle and last
    frames decoded to prove the body, as decord_probe does: decoding every frame made a probe as slow as
    playing the file (an hour of AV1, which decord cannot open, ran past the decode timeout). A file whose
    frames carry no timestamps is decoded in full once, then up to its middle frame."""
    import av  # lazy, see open_decord

    total, fps = _pyav_frame_count(path)
    if total == 0:
        raise MediaError("no_content", "video has no frames")
    middle = int(_even_indices(total, 1)[0])
    ends = _pyav_frames(path, np.array([0, middle, total - 1]), None, False, fps=fps)
    if ends is None:  # no timestamps: counted by decoding, keeping the first and last frames on the way
        first = last = None
        total = 0
        with av.open(str(path)) as container:
            for frame in _frames_of(container, pyav_video_stream(container)):
                first = frame if first is None else first
                last, total = frame, total + 1
        if total == 0:
            raise MediaError("no_content", "video has no decodable frames")
        # then decoded again only up to the middle one (it was to the last: two whole passes)
        middle_frame = _pyav_frames(path, np.array([total // 2]), None, False, fps=fps, seek=False)[0][0]
        ends = np.stack([_upright(first), middle_frame, _upright(last)]), fps
    frames, _ = ends
    result = _video_result(frames.shape[2], frames.shape[1], total, fps, "pyav")
    return replace(result, key_frame=frames[1])


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
    return with_fallback(
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
        stream = pyav_video_stream(container)
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        return total, pyav_fps(stream)


def _pyav_decode(path: Path, num_frames: int, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Only the wanted frames are kept, so memory stays at num_frames, not the clip."""
    total, fps = _pyav_frame_count(path)
    if total == 0:
        raise MediaError("no_content", "video has no frames")
    indices = _even_indices(total, num_frames)
    # Seeking to each wanted frame (see _pyav_frames): one middle frame was a decode of half the file. A
    # truncated file may hold fewer frames than its header says: the last one decoded stands in for the rest.
    frames = (_pyav_frames(path, indices, size, False, fps=fps, truncated_ok=True)
              or _pyav_frames(path, indices, size, False, fps=fps, truncated_ok=True, seek=False))
    return frames[0], fps * num_frames / total



# ---------------------------------------------------------------- frames at given times


def frame_indices(times_s: np.ndarray, fps: float, total: int | None) -> np.ndarray:
    """The frame shown at each time; the epsilon keeps t = k/fps on frame k despite float rounding."""
    if fps <= 0:
        raise MediaError("decode_error", "video reports no frame rate")
    indices = np.floor(np.asarray(times_s, dtype=np.float64) * fps + 1e-6).astype(np.int64)
    return np.clip(indices, 0, None if total is None else total - 1)


def _fit(frame: np.ndarray, size: tuple[int, int] | None, stretch: bool) -> np.ndarray:
    if size is None or frame.shape[:2] == tuple(size):
        return frame
    if stretch:
        return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return resize_crop(frame, size)


class _Readers:
    """The last few decord readers, for the clips of one video that arrive one after another: opening a video
    builds its whole frame index (3 ms for 10 s, 27 ms for 4 min at 256 px, linear in length), and each clip of
    a film otherwise paid that in every stage that decodes it, and a fresh reader seeks back to a keyframe
    (bench/long_videos.py).

    A reader is taken out while in use and put back after, so no two threads ever share one (decodes run on
    their own threads for the timeout; a decode abandoned on timeout never hands its reader back). Keyed by
    the file's size and mtime too: a path reused by another file opens afresh."""

    KEEP = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: OrderedDict[tuple, Any] = OrderedDict()

    def take(self, path: Path, width: int, height: int) -> tuple[tuple, Any]:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, width, height, worker_threads())
        with self._lock:
            reader = self._idle.pop(key, None)
        return key, reader if reader is not None else open_decord(path, width=width, height=height)

    def give_back(self, key: tuple, reader: Any) -> None:
        with self._lock:
            self._idle[key] = reader
            while len(self._idle) > self.KEEP:
                self._idle.popitem(last=False)

    def forget(self, path: str | Path | None = None) -> None:
        """Drop the kept readers (of `path` only, when given: a scratch copy about to be deleted, whose open
        handle would otherwise keep its disk space in use)."""
        with self._lock:
            for key in [k for k in self._idle if path is None or k[0] == str(path)]:
                del self._idle[key]


READERS = _Readers()


def _decord_frames_at(path: Path, times_s: np.ndarray, size, stretch: bool) -> tuple[np.ndarray, float]:
    # decord resizes while decoding when asked to stretch: far cheaper than decoding full frames.
    h, w = size if (stretch and size) else (-1, -1)
    key, reader = READERS.take(path, w, h)
    total, fps = len(reader), float(reader.get_avg_fps())
    if total == 0:
        raise MediaError("no_content", "video has no frames")
    indices = frame_indices(times_s, fps, total)
    unique = np.unique(indices)
    decoded = {}
    for start in range(0, len(unique), _DECODE_CHUNK):
        chunk = unique[start : start + _DECODE_CHUNK].tolist()
        for index, frame in zip(chunk, reader.get_batch(chunk).asnumpy()):
            decoded[index] = _fit(frame, size, stretch)
    READERS.give_back(key, reader)  # only after a clean decode: a reader that raised is dropped
    return np.stack([decoded[i] for i in indices.tolist()]), fps


def _upright(frame: Any) -> np.ndarray:
    """A PyAV frame as RGB, turned as its display matrix says (a phone's portrait video is stored landscape with
    a rotation), as decord returns it: both decoders give a file the same frames, whichever reads it."""
    pixels = frame.to_ndarray(format="rgb24")
    turns = round(getattr(frame, "rotation", 0) / 90) % 4  # counterclockwise; decord keeps only multiples of 90
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels


def _frames_of(container: Any, stream: Any) -> Any:
    """The stream's decoded frames from where the container stands (one place, so tests can count them)."""
    return container.decode(stream)


SEEK_AFTER_S = 2.0  # PyAV seeks to the next wanted frame's keyframe rather than decode this far to it


def _pyav_frames_at(path: Path, times_s: np.ndarray, size, stretch: bool,
                    seek: bool = True) -> tuple[np.ndarray, float]:
    """The frames shown at `times_s` through PyAV (files decord refused: AV1, which its FFmpeg cannot decode,
    and damaged files)."""
    frames = _pyav_frames(path, times_s, size, stretch, seek=seek)
    return frames if frames is not None else _pyav_frames(path, times_s, size, stretch, seek=False)


def _pyav_frames(path: Path, times_s: np.ndarray, size, stretch: bool, *, fps: float | None = None,
                 seek: bool = True, truncated_ok: bool = False) -> tuple[np.ndarray, float] | None:
    """The wanted frames (shown at `times_s`; frame indices when `fps` is given) and the fps, decoding only
    from the keyframe before each run of them.

    With `seek`, each run of wanted frames more than SEEK_AFTER_S apart from the one before starts with a seek
    to its keyframe, and frames are placed by their timestamps: decoding from frame 0 on every call made
    cutting a film into clips (the windows of shot detection, then each clip's frames in every scoring stage)
    quadratic in its length (bench/pyav_seek.py). None when frames carry no timestamps or a seek lands past
    the frame it was for: the caller then decodes from the start, counting frames (`seek=False`).
    `truncated_ok`: wanted frames past the last decodable one are that one, not a decode_error."""
    import av

    with av.open(str(path)) as container:
        stream = pyav_video_stream(container)
        if fps is None:
            fps = pyav_fps(stream)
            indices = frame_indices(times_s, fps, stream.frames or None)
        else:
            indices = np.asarray(times_s, dtype=np.int64)
        order, kept = sorted(set(indices.tolist())), {}
        origin, base = stream.start_time or 0, float(stream.time_base or 0)
        if not (seek and base > 0 and fps > 0):
            wanted = set(order)
            for position, frame in enumerate(_frames_of(container, stream)):
                if position in wanted:
                    kept[position] = _fit(_upright(frame), size, stretch)
                if position >= order[-1]:
                    break
        else:
            gap, ended = SEEK_AFTER_S * fps, False
            while len(kept) < len(order) and not ended:
                target = order[len(kept)]
                container.seek(origin + int(target / fps / base), stream=stream, backward=True)
                ended = True
                for frame in _frames_of(container, stream):
                    if frame.pts is None:
                        return None
                    position = round((frame.pts - origin) * base * fps)
                    if position > target:
                        return None  # landed past it, or timestamps skip it
                    if position == target:
                        kept[position] = _fit(_upright(frame), size, stretch)
                        if len(kept) == len(order):
                            break
                        target = order[len(kept)]
                        if target - position > gap:
                            ended = False  # seek ahead to the next run
                            break
    if not kept:
        raise MediaError("no_content", "video has no decodable frames")
    last = max(kept)
    # One frame of slack: header frame counts are sometimes off by one. More missing means a truncated body.
    if order[-1] > last + 1 and not truncated_ok:
        raise MediaError("decode_error", f"{path.name} ends at frame {last}, frame {order[-1]} was "
                               "expected (truncated?)")
    return np.stack([kept[min(i, last)] for i in indices.tolist()]), fps


def decode_frames_at(path: str | Path, times_s, size: tuple[int, int] | None, *, timeout_s: float = 30.0,
                     stretch: bool = False) -> tuple[np.ndarray, float]:
    """uint8 (N, H, W, 3) frames shown at `times_s` and the source fps; raises `MediaError`.

    `size` is (H, W): centre-cropped to it, or squashed when `stretch` (analysis frames, where aspect does not
    matter); None keeps the native resolution.
    """
    path, times = Path(path), np.asarray(times_s, dtype=np.float64)
    if times.size == 0:
        raise ValueError("no timestamps to decode")
    return with_fallback(lambda: _decord_frames_at(path, times, size, stretch),
                         lambda: _pyav_frames_at(path, times, size, stretch), timeout_s)


def decode_clip(uri: str | Path, start_s: float, end_s: float, num_frames: int, size: tuple[int, int] | None,
                timeout_s: float = 30.0) -> tuple[np.ndarray, float]:
    """`num_frames` evenly spaced frames of [start_s, end_s) as uint8 (T, H, W, 3), and their frame rate.

    Frames sit at the centres of `num_frames` equal segments (as `decode_video` does for whole videos),
    so a one-frame clip gives its middle frame.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not end_s > start_s >= 0:
        raise ValueError(f"need 0 <= start_s < end_s, got [{start_s}, {end_s})")
    step = (end_s - start_s) / num_frames
    frames, _ = decode_frames_at(uri, start_s + (np.arange(num_frames) + 0.5) * step, size, timeout_s=timeout_s)
    return frames, 1.0 / step
