"""Clip splitting through the Ray Data job: a video becomes several rows, and the shard group it belongs to is
written (by a task, while the job goes on) only once every clip of every input in the group has arrived."""
from __future__ import annotations

import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from latentforge.datasets import manifest as mf
from latentforge.datasets.demo_corpus import draw_shape, encode_video
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation
from latentforge.pipelines.resume import DONE_DIR

pytestmark = pytest.mark.integration

SIDE, FPS = 64, 8
SHOTS = [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "white", "green")]


def shots_video(path, seconds_per_shot: float, order: list[int]) -> None:
    frames = [draw_shape(SIDE, *SHOTS[i], (SIDE / 2, SIDE / 2)) for i in order
              for _ in range(int(seconds_per_shot * FPS))]
    encode_video(path, np.stack(frames), FPS)
    path.with_suffix(".txt").write_text(f"{len(order)} shots")


def test_split_videos_fill_their_groups_exactly_once(tmp_path, ray_local):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # Inputs sort as a_*, b_*, c_*: with 3 inputs per group, group 0 is two stills then a video whose clips
    # are the group's last rows (a writer that counted inputs, not rows, would write it before they came).
    for i in range(2):
        Image.fromarray(draw_shape(SIDE, *SHOTS[i], (32, 32))).save(corpus / f"a_still{i}.png")
        (corpus / f"a_still{i}.txt").write_text(f"still {i}")
    shots_video(corpus / "a_three.mp4", 1.5, [0, 1, 2])
    shots_video(corpus / "b_two.mp4", 1.5, [2, 0])
    shots_video(corpus / "c_one.mp4", 1.5, [1])
    (corpus / "c_empty.mp4").write_bytes(b"")
    (corpus / "c_empty.txt").write_text("nothing")
    cfg = CurationConfig(input_dir=corpus, samples_per_shard=3, video_frames=4,
                         clips={"enabled": True, "min_seconds": 1.0, "max_seconds": 2.0},
                         dedup={"enabled": False})
    result = run_curation(cfg, tmp_path / "out")

    manifest = mf.Dataset(tmp_path / "out").manifest().to_pylist()
    rejects = mf.Dataset(tmp_path / "out").rejects().to_pylist()
    clips = Counter(r["source_id"] for r in manifest if r["modality"] == "video")
    assert sorted(clips.values()) == [1, 2, 3]  # one clip per shot
    assert result.inputs == 6 and {r["reason"] for r in rejects} == {"empty_file"}
    assert len(manifest) == 3 + 2 + 1 + 2 and result.samples == len(manifest) + len(rejects)
    # Wall time per phase, logged to MLflow with the counts (seconds_scan, ...).
    assert list(result.seconds) == ["scan", "dedup", "first_row", "stages", "readmit", "tables"]
    assert result.seconds["scan"] > 0 and all(v >= 0 for v in result.seconds.values())
    assert result.metrics()["seconds_first_row"] == result.seconds["first_row"]
    # Time per stage, summed over the workers from the rows (stage.TIMING_COLUMN), in the order they ran.
    names = list(result.stage_seconds)
    assert names[:5] == ["probe", "filter_basic", "caption_sidecar", "split_clips", "content_hash"]
    assert names.index("encode_latents") > names.index("filter_sharpness") > names.index("content_hash")
    assert result.stage_seconds["probe"]["cpu_s"] > 0 and result.stage_seconds["split_clips"]["wall_s"] > 0
    assert result.metrics()["stage_encode_latents_cpu_s"] == result.stage_seconds["encode_latents"]["cpu_s"]
    assert "stage_seconds" not in mf.Dataset(tmp_path / "out").manifest().column_names

    # Every manifest row is in exactly one tar, every tar member is in the manifest, and each group's marker
    # lists all the rows of its inputs (clips included).
    shard_dir = tmp_path / "out" / mf.SHARDS
    in_tars = Counter()
    for tar in shard_dir.glob("*.tar"):
        with tarfile.open(tar) as t:
            in_tars.update({m.name.split(".", 1)[0] for m in t.getmembers()})
    assert set(in_tars) == {r["id"] for r in manifest}
    markers = [json.loads(p.read_text()) for p in sorted((shard_dir / DONE_DIR).glob("group-*.json"))]
    assert len(markers) == 2
    marked = [r["id"] for m in markers for r in m["rows"]]
    assert sorted(marked) == sorted([r["id"] for r in manifest] + [r["id"] for r in rejects])
