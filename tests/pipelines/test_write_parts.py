"""Shard groups split into parts by size, with stable names and one checksum per part; groups written where
their rows finished (the last stage map's workers) once the batch holds them whole."""
from __future__ import annotations

import json

import numpy as np

from latentforge.datasets.shards import iter_shards, npy_bytes, sha256_file
from latentforge.pipelines.stages.write_shards import WRITTEN, finished_groups, write_finished_groups, write_parts


def rows(n: int, group: int = 3) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"id": f"s{i:03d}", "shard": group, "latent": npy_bytes(np.full((12, 1, 8, 8), i, np.float32)),
                    "text_emb": npy_bytes(np.zeros((4, 8), np.float16)), "text_mask": npy_bytes(np.ones(4, bool)),
                    "caption": f"caption {i}", "relpath": f"x/{i}.png", "modality": "image", "width": 8, "height": 8,
                    "num_frames": 1, "fps": 0.0, "duration_s": 0.0, "sample_rate": 0, "bucket": "1x16x16"})
    return out


def test_a_small_byte_limit_splits_a_group_into_numbered_parts(tmp_path):
    placed = write_parts(rows(10), tmp_path, max_bytes=12_000)
    names = sorted({name for name, _ in placed.values()})
    assert len(names) > 2 and names[0] == "shard-000003-00.tar" and names[1] == "shard-000003-01.tar"
    assert set(placed) == {f"s{i:03d}" for i in range(10)}
    for name in names:
        path = tmp_path / name
        assert path.stat().st_size <= 12_000 + 10_240  # the limit, plus tar's end-of-archive padding
        keys = [s.key for s in iter_shards([path])]
        assert keys == sorted(k for k, (n, _) in placed.items() if n == name)  # id order within a part
        assert {d for n, d in placed.values() if n == name} == {sha256_file(path)}


def test_a_large_limit_keeps_one_part(tmp_path):
    placed = write_parts(rows(5), tmp_path, max_bytes=10**9)
    assert {name for name, _ in placed.values()} == {"shard-000003-00.tar"}


def test_nothing_kept_writes_nothing(tmp_path):
    assert write_parts([], tmp_path, max_bytes=1000) == {}
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- groups written where the rows are


def group_batch(layout: dict[int, dict[str, int]], clips_missing: set[str] = frozenset()) -> dict:
    """A finished batch: group -> {source id: clips it makes}; each clip one row (ids SOURCE-cK), every row kept,
    a timing column as the chain leaves it. `clips_missing`: sources whose last clip is not in the batch."""
    from latentforge.pipelines.stage import TIMING_COLUMN, batch_of

    out = []
    for group, sources in layout.items():
        for source, clips in sources.items():
            for k in range(clips - (1 if source in clips_missing else 0)):
                row = rows(1, group)[0] | {"id": f"{source}-c{k}", "source_id": source, "source_rows": clips,
                                           "status": "ok", "lat_stats": b"stats"}
                out.append(row | {TIMING_COLUMN: json.dumps({"encode_latents": [0.5, 1.0]})})
    return batch_of(out)


LAYOUT = {0: {"a": 1, "b": 2}, 1: {"c": 1, "d": 3}, 2: {"e": 1}}
GROUP_INPUTS = {0: 2, 1: 2, 2: 2}  # group 2's second input is in another block


def test_a_group_is_finished_when_every_input_sent_every_row() -> None:
    assert set(finished_groups(group_batch(LAYOUT), GROUP_INPUTS)) == {0, 1}
    assert set(finished_groups(group_batch(LAYOUT, clips_missing={"d"}), GROUP_INPUTS)) == {0}
    assert finished_groups(group_batch(LAYOUT), {0: 3, 1: 2, 2: 1}) == {1: [3, 4, 5, 6], 2: [7]}


def test_the_workers_write_the_finished_groups_and_return_the_rest_whole(tmp_path) -> None:
    from latentforge.pipelines.resume import marker_path
    from latentforge.pipelines.stage import TIMING_COLUMN

    batch = group_batch(LAYOUT, clips_missing={"d"})
    out = write_finished_groups(batch, GROUP_INPUTS, str(tmp_path), max_bytes=10**9, config_hash="cfg")
    groups = [int(g) for g in out["shard"]]
    assert list(out["id"]) == list(batch["id"])  # every row, in order
    assert [bool(w) for w in out[WRITTEN]] == [g == 0 for g in groups]
    assert [s.key for s in iter_shards([tmp_path / "shard-000000-00.tar"])] == ["a-c0", "b-c0", "b-c1"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000-00.tar"]
    digest = sha256_file(tmp_path / "shard-000000-00.tar")
    for i, group in enumerate(groups):
        if group == 0:  # written: shard and digest named, latents gone (they never reach the driver)
            assert (out["shard_name"][i], out["shard_sha256"][i]) == ("shard-000000-00.tar", digest)
            assert all(out[k][i] == b"" for k in ("latent", "text_emb", "text_mask"))
        else:  # for the driver to write with the rest of its group: unchanged
            assert out["shard_name"][i] == "" and out["latent"][i] == batch["latent"][i]
        timing = json.loads(out[TIMING_COLUMN][i])
        assert timing["encode_latents"] == [0.5, 1.0] and "write_shards" in timing
    assert batch["latent"][0] != b""  # the input batch is left as it was
    marker = json.loads(marker_path(tmp_path, 0).read_text())
    assert [r["id"] for r in marker["rows"]] == ["a-c0", "b-c0", "b-c1"]
    assert marker["shards"] == {"shard-000000-00.tar": digest}
    assert all(TIMING_COLUMN not in r and WRITTEN not in r for r in marker["rows"])
    assert not marker_path(tmp_path, 1).exists() and not marker_path(tmp_path, 2).exists()
