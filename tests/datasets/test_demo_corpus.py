"""The generated demo corpus: layout, determinism, and that its ground truth matches the real decoders."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.datasets.demo_corpus import COLORS, POSITIONS, DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.audio import decode_audio
from latentforge.datasets.media import MediaError, probe
from latentforge.datasets.video import decode_video

SMALL = DemoCorpusSpec(num_images=4, num_videos=3, num_audio=6, seed=7)
IMAGE_CAPTION = re.compile(r"a (\w+) (circle|square|triangle) in the ([\w ]+) on a (\w+) background")
VIDEO_CAPTION = re.compile(r"a (\w+) (circle|square|triangle) moving (left|right|up|down) on a (\w+) background")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default-sized corpus, generated once for the module."""
    root = tmp_path_factory.mktemp("corpus")
    return root, generate_demo_corpus(root)


def entries(index: dict, expect: str, modality: str | None = None) -> list[dict]:
    return [e for e in index["files"] if e["expect"] == expect and modality in (None, e["modality"])]


def test_index_layout(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    assert json.loads((root / "corpus.json").read_text(encoding="utf-8")) == index
    paths = [e["path"] for e in index["files"]]
    assert paths == sorted(paths)
    counts = Counter((e["expect"], e["modality"]) for e in index["files"])
    assert counts[("kept", "image")] == 48 and counts[("kept", "video")] == 24 and counts[("kept", "audio")] == 24
    assert counts[("filtered", "image")] == 2 and counts[("filtered", "video")] == 1
    assert counts[("filtered", "audio")] == 1
    assert sum(n for (expect, _), n in counts.items() if expect == "rejected") >= 9
    suffixes = {Path(e["path"]).suffix for e in entries(index, "kept", "image")}
    assert suffixes == {".png", ".jpg"}


def test_every_listed_file_exists_with_its_caption(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    for entry in index["files"]:
        path = root / entry["path"]
        assert path.is_file(), entry
        if entry["caption"] is not None:
            assert path.with_suffix(".txt").read_text(encoding="utf-8") == entry["caption"]


def test_kept_and_filtered_files_probe_ok(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    for entry in entries(index, "kept") + entries(index, "filtered"):
        result = probe(root / entry["path"])
        assert result.modality == entry["modality"], entry
        assert entry["caption"], entry


def test_filtered_files_have_the_flaw_they_claim(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    def probed(modality: str) -> list:
        return [probe(root / e["path"]) for e in entries(index, "filtered", modality)]

    assert [(r.width, r.height) for r in probed("image")] == [(16, 16), (16, 16)]
    assert [r.num_frames for r in probed("video")] == [2]
    assert [r.sample_rate for r in probed("audio")] == [8000]


def test_rejected_files_fail_probe_or_lack_a_caption(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    reasons = set()
    for entry in entries(index, "rejected"):
        path = root / entry["path"]
        assert entry["why"], entry
        try:
            probe(path)
        except MediaError as error:
            reasons.add(error.reason)
            continue
        assert entry["caption"] is None, entry
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():
            with pytest.raises(UnicodeDecodeError):
                sidecar.read_text(encoding="utf-8")
    assert {"empty_file", "decode_error", "extension_mismatch", "no_content", "too_large"} <= reasons


def test_image_pixels_match_captions(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    for entry in entries(index, "kept", "image"):
        if not entry["path"].endswith(".png"):  # lossless only, so colours compare exactly
            continue
        color, _, position, background = IMAGE_CAPTION.fullmatch(entry["caption"]).groups()
        pixels = np.asarray(Image.open(root / entry["path"]))
        size = pixels.shape[0]
        fx, fy = POSITIONS[position]
        assert tuple(pixels[int(fy * size), int(fx * size)]) == COLORS[color], entry
        corner = (size - 1, 0) if position == "top right" else (0, size - 1)  # a corner far from the shape
        assert tuple(pixels[corner]) == COLORS[background], entry


def _shape_centroid(frame: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    distance = np.abs(frame.astype(int) - background).sum(axis=2)
    ys, xs = np.nonzero(distance > 60)
    return np.array([xs.mean(), ys.mean()])


def test_videos_move_the_way_captions_say(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for entry in entries(index, "kept", "video")[:8]:
        _, _, direction, background = VIDEO_CAPTION.fullmatch(entry["caption"]).groups()
        frames, _ = decode_video(root / entry["path"], 2, (64, 64))
        motion = _shape_centroid(frames[1], COLORS[background]) - _shape_centroid(frames[0], COLORS[background])
        assert np.dot(motion, steps[direction]) > 10, (entry, motion)


def test_audio_matches_captions(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    for entry in entries(index, "kept", "audio"):
        samples = decode_audio(root / entry["path"], 16000, 16000)
        caption = entry["caption"]
        if caption.endswith("Hz tone"):
            hz = float(caption.split()[2])
            peak = np.fft.rfftfreq(len(samples), 1 / 16000)[np.abs(np.fft.rfft(samples)).argmax()]
            assert peak == pytest.approx(hz, abs=3), entry
        elif caption == "a burst of white noise":
            quiet, loud = np.abs(samples[:3000]).max(), np.abs(samples[5000:11000]).std()
            assert quiet == 0 and loud > 0.04, entry  # levels vary from 0.5 to 1.0 of full scale
        else:
            first, last = _dominant_hz(samples[:4000]), _dominant_hz(samples[-4000:])
            assert (last > first) == caption.startswith("a rising"), entry


def _dominant_hz(samples: np.ndarray) -> float:
    return float(np.fft.rfftfreq(len(samples), 1 / 16000)[np.abs(np.fft.rfft(samples)).argmax()])


def _media_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_deterministic(tmp_path: Path) -> None:
    first = generate_demo_corpus(tmp_path / "a", SMALL)
    second = generate_demo_corpus(tmp_path / "b", SMALL)
    assert first == second
    files_a, files_b = _media_files(tmp_path / "a"), _media_files(tmp_path / "b")
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        if name.endswith(".mp4"):
            continue  # encoders may differ in metadata bytes; decoded content must match instead
        assert files_a[name] == files_b[name], name
    for entry in entries(first, "kept", "video"):
        frames_a, _ = decode_video(tmp_path / "a" / entry["path"], 4, (32, 32))
        frames_b, _ = decode_video(tmp_path / "b" / entry["path"], 4, (32, 32))
        np.testing.assert_array_equal(frames_a, frames_b)


def test_different_seed_changes_content(tmp_path: Path) -> None:
    first = generate_demo_corpus(tmp_path / "a", SMALL)
    other = generate_demo_corpus(tmp_path / "b", DemoCorpusSpec(num_images=4, num_videos=3, num_audio=6, seed=8))
    assert [e["caption"] for e in first["files"]] != [e["caption"] for e in other["files"]]


def test_without_broken_files(tmp_path: Path) -> None:
    spec = DemoCorpusSpec(num_images=2, num_videos=1, num_audio=1, include_broken=False)
    index = generate_demo_corpus(tmp_path, spec)
    assert not entries(index, "rejected")
    assert not (tmp_path / "broken").exists()
    assert index["spec"]["include_broken"] is False
