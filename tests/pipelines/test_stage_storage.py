"""Stages on inputs at s3:// URIs (moto_server on loopback): decoders get per-row local copies, and real
stages (probe, sidecar captions, discovery) behave as they do on local files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lf_batches import by_relpath, to_batch

from latentforge.datasets import storage
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover, orphan_captions
from latentforge.pipelines.stage import Reject, map_ok_rows, rows_of
from latentforge.pipelines.stages.caption_sidecar import CaptionSidecar
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.staging import staged


@pytest.fixture
def scratch(tmp_path):
    storage.configure(storage.StorageConfig(cache_dir=tmp_path / "cache"))
    yield storage.scratch_dir()
    storage.configure(None)


def test_a_row_is_fetched_only_when_read_and_removed_after(s3_bucket, scratch):
    uris = [f"s3://{s3_bucket}/in/a.bin", f"s3://{s3_bucket}/in/b.bin"]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * 10)
    batch = to_batch([{"id": f"s{i}", "uri": u, "caption_path": u + ".txt", "status": "ok", "reason": "",
                       "message": "", "stage": ""} for i, u in enumerate(uris)])
    seen = []

    def reads(row):
        local = Path(row["uri"])
        seen.append(local)
        assert local.name == Path(row["uri"]).name and local.is_relative_to(scratch)
        assert {**row}["uri"].startswith("s3://")  # copies of the row keep the URI
        if row["id"] == "s1":
            raise Reject("bad", f"cannot read {local}")
        return {"first_byte": local.read_bytes()[0]}

    out = map_ok_rows(batch, reads, {"first_byte": -1}, "test")
    assert list(out["first_byte"]) == [0, -1] and list(out["reason"]) == ["", "bad"]
    assert out["message"][1] == f"cannot read {uris[1]}"  # messages name the object, not its scratch copy
    assert list(out["uri"]) == uris  # the output column is the URI, not a scratch path
    assert not any(p.exists() for p in seen) and not list(scratch.iterdir())
    map_ok_rows(batch, lambda row: {"n": len(row["id"])}, {"n": 0}, "test")
    assert not list(scratch.iterdir())  # a stage that never reads the file fetched nothing

    with staged({"uri": uris[0]}) as row:
        kept = Path(row["uri"])
        assert kept.read_bytes() == bytes(10)
    assert not kept.exists()


def test_rows_of_a_batch_naming_the_same_file_share_one_copy(s3_bucket, scratch, monkeypatch):
    video, other = f"s3://{s3_bucket}/in/v.bin", f"s3://{s3_bucket}/in/w.bin"
    storage.write_bytes(video, b"v" * 10)
    storage.write_bytes(other, b"w" * 10)
    fetched, download = [], storage.download

    def counted(source, target):
        fetched.append(source)
        return download(source, target)

    monkeypatch.setattr(storage, "download", counted)
    rows = [{"id": f"c{i}", "uri": video, "status": "filtered" if i == 1 else "ok"} for i in range(3)]
    rows.append({"id": "w", "uri": other, "status": "ok"})
    batch = to_batch([{**r, "reason": "", "message": "", "stage": ""} for r in rows])  # three clips, one file
    seen: dict[str, Path] = {}

    def reads(row):
        seen[row["id"]] = Path(row["uri"])
        if row["id"] == "w":
            assert not seen["c0"].exists()  # the clips' copy went when the last clip was done
        return {"byte": seen[row["id"]].read_bytes()[0]}

    out = map_ok_rows(batch, reads, {"byte": 0}, "test")
    assert list(out["byte"]) == [ord("v"), 0, ord("v"), ord("w")]
    assert fetched == [video, other] and seen["c0"] == seen["c2"]  # fetched once for both clips
    assert not list(scratch.iterdir())


def test_a_decoded_scratch_copy_leaves_no_kept_reader_behind(s3_bucket, scratch, tmp_path):
    from latentforge.datasets import video
    from latentforge.datasets.demo_corpus import draw_shape, encode_video

    frames = np.stack([draw_shape(64, "circle", "red", "blue", (16 + k, 32)) for k in range(16)])
    encode_video(tmp_path / "v.mp4", frames, 8)
    uri = f"s3://{s3_bucket}/in/v.mp4"
    storage.write_bytes(uri, (tmp_path / "v.mp4").read_bytes())
    batch = to_batch([{"id": f"c{i}", "uri": uri, "status": "ok", "reason": "", "message": "", "stage": ""}
                      for i in range(2)])
    kept = []

    def decode(row):
        frames, _ = video.decode_clip(row["uri"], 0.1, 0.9, 2, (32, 32))
        kept.append([k[0] for k in video.READERS._idle])
        return {"frames": len(frames)}

    out = map_ok_rows(batch, decode, {"frames": 0}, "test")
    assert list(out["frames"]) == [2, 2] and any(kept)  # the clips shared a kept reader of the copy
    assert not any(str(scratch) in path for path in (k[0] for k in video.READERS._idle))
    assert not list(scratch.iterdir())


def test_probe_captions_and_discovery_on_s3_match_local(s3_bucket, scratch, tmp_path):
    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=2, num_videos=1, num_audio=1, seed=9))
    root = f"s3://{s3_bucket}/corpus"
    storage.upload(corpus, root)
    local_rows, remote_rows = discover(corpus, 4), discover(root, 4)
    assert [r["id"] for r in remote_rows] == [r["id"] for r in local_rows]
    assert [r["shard"] for r in remote_rows] == [r["shard"] for r in local_rows]
    assert all(r["uri"] == f"{root}/{r['relpath']}" for r in remote_rows)
    assert orphan_captions(root) == orphan_captions(corpus)

    cfg = CurationConfig(input_dir=root)
    results = []
    for rows in (local_rows, remote_rows):
        batch = ProbeMedia(cfg)(to_batch(rows))
        batch = CaptionSidecar(cfg)(batch)
        results.append(by_relpath(batch))
    columns = ("status", "reason", "modality", "width", "height", "num_frames", "sample_rate", "caption")
    for relpath, local in results[0].items():
        remote = results[1][relpath]
        assert [remote[c] for c in columns] == [local[c] for c in columns], relpath
    reasons = {r["reason"] for r in results[1].values()}
    assert "missing_caption" in reasons and any(r["status"] == "ok" for r in results[1].values())
    assert not list(scratch.iterdir())


def test_stages_of_one_chain_fetch_a_remote_input_once_within_the_budget(s3_bucket, scratch, monkeypatch):
    """A StageChain's stages share their scratch copies (staging.chain_copies): a video on s3 is fetched once
    for every stage of the chain that reads it, not once per stage, as long as the kept copies fit
    `fusion.keep_inputs_mb`; past it a stage fetches again, and nothing outlives the chain's batch."""
    from latentforge.pipelines.stage import Stage, StageChain

    small, large = f"s3://{s3_bucket}/in/small.bin", f"s3://{s3_bucket}/in/large.bin"
    storage.write_bytes(small, b"s" * 1000)
    storage.write_bytes(large, b"l" * (2 << 20))
    fetched, download = [], storage.download

    def counted(source, target):
        fetched.append(source)
        return download(source, target)

    monkeypatch.setattr(storage, "download", counted)
    seen: list[Path] = []

    class ReadsFirst(Stage):
        name = "reads_first"

        def __call__(self, batch):
            def first(row):
                seen.append(Path(row["uri"]))
                return {"first": seen[-1].read_bytes()[:1].decode()}
            return map_ok_rows(batch, first, {"first": ""}, self.name)

    class ReadsAll(Stage):
        name = "reads_all"

        def __call__(self, batch):
            out = []
            for row in rows_of(batch):  # a stage reading its inputs outside map_ok_rows (as SplitClips does)
                with staged(row) as r:
                    seen.append(Path(r["uri"]))
                    out.append({**row, "size": seen[-1].stat().st_size})
            return to_batch(out)

    chain = type("Chain", (StageChain,), {"stages": (ReadsFirst, ReadsAll), "name": "chain"})
    rows = [{"id": i, "uri": u, "status": "ok", "reason": "", "message": "", "stage": ""}
            for i, u in enumerate([small, large, small])]  # two clips of `small`, one of `large`
    out = chain(CurationConfig(fusion={"keep_inputs_mb": 1}))(to_batch(rows))
    assert list(out["first"]) == ["s", "l", "s"] and list(out["size"]) == [1000, 2 << 20, 1000]
    # `small` fits the 1 MiB budget: fetched once for both stages and both clips; `large` does not: each
    # stage fetched its own copy and deleted it with its row, as without a chain
    assert sorted(fetched) == sorted([small, large, large])
    assert seen[0] == seen[2] == seen[3] == seen[5] and seen[1] != seen[4]
    assert not any(p.exists() for p in seen) and not list(scratch.iterdir())

    fetched.clear()
    chain(CurationConfig(fusion={"keep_inputs_mb": 0}))(to_batch(rows))
    # no budget: the old cost, a fetch per stage (and per row, for a stage that stages rows one at a time)
    assert sorted(fetched) == sorted([small, large, small, large, small])
