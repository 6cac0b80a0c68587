"""Shard groups split into parts by size, with stable names and one checksum per part."""
from __future__ import annotations

import numpy as np

from latentforge.datasets.shards import iter_shards, npy_bytes, sha256_file
from latentforge.pipelines.stages.write_shards import write_parts


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
