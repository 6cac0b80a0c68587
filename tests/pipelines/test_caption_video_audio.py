"""Audio tracks of videos: decoded by CaptionPrep within the clip's span, transcribed by CaptionAudio (the tiny
random-weight Whisper), a damaged track costing only the transcript. Real mp4 files with an AAC track."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lf_batches import by_relpath, to_batch
from tiny_captioners import captioning_config

from latentforge.datasets.demo_corpus import encode_video
from latentforge.datasets.shards import load_npy
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.caption_audio import AUDIO_COLUMN, CaptionAudio
from latentforge.pipelines.stages.caption_prep import CaptionPrep
from latentforge.pipelines.stages.caption_select import CaptionSelect
from latentforge.pipelines.stages.caption_vlm import FRAMES_COLUMN
from latentforge.pipelines.stages.probe_media import ProbeMedia

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def encode_video_with_audio(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray, rate: int) -> None:
    """An mp4 with a video stream and a stereo AAC track carrying `audio` on both channels."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = container.add_stream("aac", rate=rate, layout="stereo")
        for pixels in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(video.encode())
        stereo = np.stack([audio, audio]).astype(np.float32)
        for start in range(0, stereo.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, start : start + 1024]), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts = rate, start
            container.mux(sound.encode(frame))
        container.mux(sound.encode())


@pytest.fixture(scope="module")
def av_rows(tmp_path_factory, captioners: dict) -> dict[str, dict]:
    """Probed rows: a 2 s video whose track is a tone for 1 s then silence, and the same video without a track."""
    root = tmp_path_factory.mktemp("av")
    rate, frames = 44100, np.full((16, 32, 32, 3), 120, np.uint8)
    t = np.arange(2 * rate) / rate
    encode_video_with_audio(root / "talk.mp4", frames, 8, np.where(t < 1.0, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0),
                            rate)
    encode_video(root / "mute.mp4", frames, 8)
    cfg = captioning_config(captioners, root)
    batch = ProbeMedia(cfg)(to_batch(discover(root, samples_per_shard=64)))
    batch.update(clip_start_s=np.zeros(len(batch["id"])), clip_end_s=np.array(batch["duration_s"], dtype=float),
                 clip_index=np.full(len(batch["id"]), -1), caption_error=np.full(len(batch["id"]), "", dtype=object))
    return by_relpath(batch)


def test_prep_decodes_a_videos_audio_track_within_the_clip(av_rows: dict, captioners: dict) -> None:
    talk, mute = av_rows["talk.mp4"], av_rows["mute.mp4"]
    halves = [{**talk, "clip_start_s": 0.0, "clip_end_s": 1.0, "clip_index": 0},
              {**talk, "clip_start_s": 1.0, "clip_end_s": 2.0, "clip_index": 1}]
    out = CaptionPrep(captioning_config(captioners, "av"))(to_batch([talk, mute, *halves]))
    assert list(out["status"]) == ["ok"] * 4 and list(out["caption_error"]) == [""] * 4
    whole, first, second = (load_npy(out[AUDIO_COLUMN][i]) for i in (0, 2, 3))
    assert whole.dtype == np.float32 and whole.ndim == 1 and abs(len(whole) - 32000) <= 1024  # 16 kHz mono
    assert len(first) == len(second) == 16000
    assert 0.25 < np.abs(first).mean() < 0.4 and np.abs(second[800:]).mean() < 0.01  # the tone, then silence
    assert out[AUDIO_COLUMN][1] == b"" and load_npy(out[FRAMES_COLUMN][1]).shape == (3, 32, 32, 3)  # no track


def damage_audio_packets(path: Path) -> int:
    """Overwrite every audio packet's bytes in place with noise (the container and the video stream intact);
    returns how many packets were damaged."""
    import av

    with av.open(str(path)) as container:
        spans = [(p.pos, p.size) for p in container.demux(container.streams.audio[0]) if p.size and (p.pos or 0) > 0]
    data, rng = bytearray(path.read_bytes()), np.random.default_rng(0)
    for pos, size in spans:
        data[pos:pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return len(spans)


def test_a_damaged_audio_track_costs_only_the_transcript(tmp_path: Path, av_rows: dict, captioners: dict) -> None:
    """A video whose AAC packets are noise: its frames are still captioned, the track's decode error is noted in
    caption_error, Whisper gets no waveform for it, and the row stays ok (the transcript alone is lost)."""
    import shutil

    damaged = tmp_path / "damaged.mp4"
    shutil.copy(av_rows["talk.mp4"]["uri"], damaged)
    assert damage_audio_packets(damaged) > 10
    row = {**av_rows["talk.mp4"], "uri": str(damaged), "relpath": "damaged.mp4", "id": "damaged"}
    cfg = captioning_config(captioners, "av")
    prepared = CaptionPrep(cfg)(to_batch([row, av_rows["talk.mp4"]]))
    assert list(prepared["status"]) == ["ok", "ok"]
    note = prepared["caption_error"][0]
    assert note.startswith("audio: decode_error") and "damaged.mp4" in note
    assert prepared[AUDIO_COLUMN][0] == b"" and prepared["caption_error"][1] == ""  # the intact copy keeps its track
    assert load_npy(prepared[FRAMES_COLUMN][0]).shape == load_npy(prepared[FRAMES_COLUMN][1]).shape
    out = CaptionAudio(cfg)(prepared)
    assert out["caption_audio"][0] == "" and out["caption_audio"][1].strip()
    assert out["caption_error"][0] == prepared["caption_error"][0] and out["status"][0] == "ok"


def test_whisper_transcribes_a_videos_track_and_select_can_pick_it(av_rows: dict, captioners: dict) -> None:
    cfg = captioning_config(captioners, "av", vlm={"enabled": False})
    prepared = CaptionPrep(cfg)(to_batch([av_rows["talk.mp4"], av_rows["mute.mp4"]]))
    out = CaptionAudio(cfg)(prepared)
    assert isinstance(out["caption_audio"][0], str) and out["caption_audio"][0].strip()
    assert out["caption_audio"][1] == "" and out["caption_error"][1] == ""  # no track: not an error
    base = {"caption": "", "caption_origin": "", "caption_sidecar": "", "caption_generated": ""}
    selected = CaptionSelect(cfg)({**out, **{k: np.array([v, v], dtype=object) for k, v in base.items()}})
    assert list(selected["caption_origin"]) == ["audio", ""]
    assert selected["caption"][0] == out["caption_audio"][0]
    assert (selected["status"][1], selected["reason"][1]) == ("rejected", "no_caption")
