"""A generated demo corpus of images, videos and audio with ground-truth captions.

Content is drawn from small vocabularies (shapes, colours, directions, pitches) so a small model can
learn the captions, and the index records what a correct curation pipeline should do with every file:
"kept", "filtered" (valid but fails a quality filter) or "rejected" (unusable). In the index,
`modality` is what the file's extension claims, which is what a scanner sees first.

Files already in `root` that the generator does not write are left alone.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from latentforge.datasets.media import modality_from_extension

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# Shape centre as fractions of (x, y).
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}
# Unit step in (x, y) image coordinates, y growing downwards.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PITCHES = {"low": 220.0, "middle": 440.0, "high": 880.0}
SOUNDS = (*PITCHES, "rising", "falling", "noise")  # tones by pitch name, chirps by sweep direction
_SHAPE_RADIUS = 0.18  # of the image side
_AMPLITUDE = 0.5
_FADE_S = 0.01  # fade in/out so tones do not start or stop with a click
_SMALL_IMAGE = 16
_SHORT_VIDEO_FRAMES = 2
_LOW_SAMPLE_RATE = 8000
_BAD_UTF8 = b"\xff\xfe\xfa bad"


@dataclass(frozen=True)
class DemoCorpusSpec:
    """How big a demo corpus to generate, and whether to add broken files."""

    num_images: int = 48
    num_videos: int = 24
    num_audio: int = 24
    image_size: int = 64
    video_frames: int = 16
    video_fps: int = 8
    audio_sample_rate: int = 16000
    audio_seconds: float = 1.0
    include_broken: bool = True
    seed: int = 0


def generate_demo_corpus(root: str | Path, spec: DemoCorpusSpec = DemoCorpusSpec()) -> dict:
    """Write the corpus under `root` and return its ground-truth index (also written to root/corpus.json)."""
    root = Path(root)
    for folder in ("images", "videos", "audio"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    # One generator per section, so resizing one section leaves the others' content unchanged.
    files = _write_images(root, spec, _rng(spec.seed, 0))
    files += _write_videos(root, spec, _rng(spec.seed, 1))
    files += _write_audio(root, spec, _rng(spec.seed, 2))
    if spec.include_broken:
        files += _write_broken(root, spec, _rng(spec.seed, 3))
    index = {"spec": dataclasses.asdict(spec), "files": sorted(files, key=lambda entry: entry["path"])}
    (root / "corpus.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


def _rng(seed: int, section: int) -> np.random.Generator:
    return np.random.default_rng([seed, section])


def _entry(root: Path, path: Path, modality: str, caption: str | None, expect: str, why: str | None) -> dict:
    relative = path.relative_to(root).as_posix()
    return {"path": relative, "modality": modality, "caption": caption, "expect": expect, "why": why}


def _write_caption(media_path: Path, caption: str) -> None:
    media_path.with_suffix(".txt").write_text(caption, encoding="utf-8")


# ---------------------------------------------------------------- images


def _pick_scene(rng: np.random.Generator) -> tuple[str, str, str]:
    """A (shape, colour, background) triple whose two colours differ."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color, background = rng.choice(list(COLORS), size=2, replace=False).tolist()
    return shape, color, background


def draw_shape(size: int, shape: str, color: str, background: str, centre: tuple[float, float]) -> np.ndarray:
    """A uint8 (size, size, 3) image of one filled shape; `centre` is (x, y) in pixels."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = centre
    radius = _SHAPE_RADIUS * size
    if shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    elif shape == "square":
        mask = (np.abs(xs - cx) <= radius) & (np.abs(ys - cy) <= radius)
    elif shape == "triangle":  # apex up, base as wide as the shape is tall
        top = cy - radius
        mask = (ys >= top) & (ys <= cy + radius) & (np.abs(xs - cx) <= (ys - top) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = COLORS[background]
    image[mask] = COLORS[color]
    return image


def _random_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    shape, color, background = _pick_scene(rng)
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    fx, fy = POSITIONS[position]
    pixels = draw_shape(size, shape, color, background, (fx * size, fy * size))
    return pixels, f"a {color} {shape} in the {position} on a {background} background"


def _save_image(path: Path, pixels: np.ndarray) -> None:
    # Explicit quality so the JPEG bytes do not depend on PIL's default.
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(pixels).save(path, **options)


def _write_images(root: Path, spec: DemoCorpusSpec, rng: np.random.Generator) -> list[dict]:
    entries = []
    sizes = [spec.image_size] * spec.num_images + [_SMALL_IMAGE] * 2
    for number, size in enumerate(sizes):
        path = root / "images" / f"img_{number:05d}.{'png' if number % 2 == 0 else 'jpg'}"
        pixels, caption = _random_image(rng, size)
        _save_image(path, pixels)
        _write_caption(path, caption)
        if size == _SMALL_IMAGE:
            entries.append(_entry(root, path, "image", caption, "filtered", f"only {size}x{size} pixels, too small"))
        else:
            entries.append(_entry(root, path, "image", caption, "kept", None))
    return entries


# ---------------------------------------------------------------- videos


def _moving_frames(rng: np.random.Generator, size: int, num_frames: int) -> tuple[np.ndarray, str]:
    """A shape crossing from one side to the other in a random direction."""
    shape, color, background = _pick_scene(rng)
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    dx, dy = DIRECTIONS[direction]
    frames = []
    for step in np.linspace(-0.25, 0.25, num_frames):
        centre = ((0.5 + dx * step) * size, (0.5 + dy * step) * size)
        frames.append(draw_shape(size, shape, color, background, centre))
    return np.stack(frames), f"a {color} {shape} moving {direction} on a {background} background"


def encode_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """Write uint8 (T, H, W, 3) frames as H.264 (mpeg4 where this PyAV build lacks libx264)."""
    import av  # lazy: heavy, and only needed when videos are generated

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def _write_videos(root: Path, spec: DemoCorpusSpec, rng: np.random.Generator) -> list[dict]:
    entries = []
    lengths = [spec.video_frames] * spec.num_videos + [_SHORT_VIDEO_FRAMES]
    for number, length in enumerate(lengths):
        path = root / "videos" / f"vid_{number:05d}.mp4"
        frames, caption = _moving_frames(rng, spec.image_size, length)
        encode_video(path, frames, spec.video_fps)
        _write_caption(path, caption)
        if length == _SHORT_VIDEO_FRAMES:
            entries.append(_entry(root, path, "video", caption, "filtered", f"only {length} frames, too short"))
        else:
            entries.append(_entry(root, path, "video", caption, "kept", None))
    return entries


# ---------------------------------------------------------------- audio


def _fade(signal: np.ndarray, sample_rate: int) -> np.ndarray:
    ramp_len = min(int(_FADE_S * sample_rate), len(signal) // 2)
    envelope = np.ones(len(signal), dtype=np.float64)
    if ramp_len > 0:
        ramp = np.linspace(0.0, 1.0, ramp_len)
        envelope[:ramp_len], envelope[-ramp_len:] = ramp, ramp[::-1]
    return signal * envelope


def synthesize_sound(rng: np.random.Generator, sample_rate: int, seconds: float) -> tuple[np.ndarray, str]:
    """A float32 mono tone, chirp or noise burst, and its caption; each of SOUNDS is equally likely."""
    sound = SOUNDS[rng.integers(len(SOUNDS))]
    # A random level and phase: two clips of the same kind are alike, as in real data, but not byte-identical.
    level, phase = rng.uniform(0.5, 1.0), rng.uniform(0, 2 * np.pi)
    count = int(round(sample_rate * seconds))
    t = np.arange(count) / sample_rate
    if sound in PITCHES:
        signal = np.sin(2 * np.pi * PITCHES[sound] * t + phase)
        caption = f"a {sound} {PITCHES[sound]:.0f} Hz tone"
    elif sound in ("rising", "falling"):
        start, end = (PITCHES["low"], PITCHES["high"]) if sound == "rising" else (PITCHES["high"], PITCHES["low"])
        # Phase is the integral of a linearly swept frequency.
        signal = np.sin(2 * np.pi * (start * t + (end - start) * t**2 / (2 * max(seconds, 1e-9))))
        caption = f"a {sound} chirp"
    else:
        signal = np.zeros(count)
        burst = slice(count // 4, 3 * count // 4)  # silence around the noise is what makes it a burst
        signal[burst] = _fade(rng.uniform(-1.0, 1.0, burst.stop - burst.start), sample_rate)
        caption = "a burst of white noise"
    return (level * _AMPLITUDE * _fade(signal, sample_rate)).astype(np.float32), caption


def _write_audio(root: Path, spec: DemoCorpusSpec, rng: np.random.Generator) -> list[dict]:
    entries = []
    rates = [spec.audio_sample_rate] * spec.num_audio + [_LOW_SAMPLE_RATE]
    for number, rate in enumerate(rates):
        path = root / "audio" / f"aud_{number:05d}.wav"
        signal, caption = synthesize_sound(rng, rate, spec.audio_seconds)
        sf.write(str(path), signal, rate, subtype="PCM_16")
        _write_caption(path, caption)
        if rate == _LOW_SAMPLE_RATE:
            entries.append(_entry(root, path, "audio", caption, "filtered", f"sample rate {rate} Hz is too low"))
        else:
            entries.append(_entry(root, path, "audio", caption, "kept", None))
    return entries


# ---------------------------------------------------------------- broken files


def _write_broken(root: Path, spec: DemoCorpusSpec, rng: np.random.Generator) -> list[dict]:
    """Files a pipeline must reject; each is (name, bytes, caption written?, why)."""
    folder = root / "broken"
    folder.mkdir(parents=True, exist_ok=True)
    pixels, image_caption = _random_image(rng, spec.image_size)
    frames, video_caption = _moving_frames(rng, spec.image_size, spec.video_frames)
    _, audio_caption = synthesize_sound(rng, spec.audio_sample_rate, spec.audio_seconds)
    captions = {"image": image_caption, "video": video_caption, "audio": audio_caption}
    encode_video(folder / "truncated.mp4", frames, spec.video_fps)
    valid_video = (folder / "truncated.mp4").read_bytes()
    cases = [
        ("empty.png", b"", True, "empty file"),
        ("truncated.mp4", valid_video[: int(len(valid_video) * 0.3)], True, "first 30% of a valid video"),
        ("noise_video.mp4", rng.bytes(4096), True, "random bytes, not a video"),
        ("unknown_codec.mp4", _unknown_codec_bytes(valid_video), True,
         "a valid MP4 container whose video codec no decoder knows"),
        ("noise_image.jpg", rng.bytes(4096), True, "random bytes, not an image"),
        ("png_named.wav", _png_bytes(pixels), True, "a PNG image named .wav"),
        ("text_named.flac", b"this is a text file, not FLAC audio\n", True, "a text file named .flac"),
        ("zero_frames.wav", None, True, "valid WAV header with zero samples"),
        ("bomb.png", _bomb_png_bytes(), True, "9000x9000 pixels, a decompression bomb"),
        ("missing_caption.png", _png_bytes(pixels), False, "valid image without a caption file"),
        ("bad_caption.png", _png_bytes(pixels), False, "caption file is not valid UTF-8"),
    ]
    entries = []
    for name, content, with_caption, why in cases:
        path = folder / name
        if content is None:
            sf.write(str(path), np.zeros((0, 1), dtype=np.float32), spec.audio_sample_rate, subtype="PCM_16")
        else:
            path.write_bytes(content)
        modality = modality_from_extension(path) or "unknown"
        path.with_suffix(".txt").unlink(missing_ok=True)  # a stale caption would contradict the index
        if with_caption:
            _write_caption(path, captions[modality])
        entries.append(_entry(root, path, modality, captions[modality] if with_caption else None, "rejected", why))
    (folder / "bad_caption.txt").write_bytes(_BAD_UTF8)
    return entries


def _unknown_codec_bytes(mp4: bytes) -> bytes:
    """The MP4 with its video sample entry renamed to a codec tag (`lfzz`) no decoder knows: the container
    and its index still parse, so probing finds a video stream, but no frame can be decoded."""
    entry = mp4.index(b"stsd") + 16  # box name, version+flags, entry count, entry size: then the codec tag
    return mp4[:entry] + b"lfzz" + mp4[entry + 4:]


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png_bytes() -> bytes:
    """A tiny file that claims 81 Mpixels: above probe's 64 Mpixel default, below PIL's own bomb limit."""
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")
    return buffer.getvalue()
