"""The manifest: tables with a fixed schema, the selection grammar, dataset paths and latent statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.manifest import Dataset, channel_stats, merge_stats, parse_where, to_table


def manifest_row(sid: str, modality: str, side: int, caption: str, status: str = "ok", **extra) -> dict:
    shape = [64, 16, 1, 1] if modality == "audio" else [12, 1 if modality == "image" else 4, side // 2, side // 2]
    row = {
        "id": sid, "uri": f"/data/{sid}", "relpath": f"{modality}/{sid}", "modality": modality,
        "width": side, "height": side, "num_frames": 1, "fps": 0.0, "duration_s": 0.0, "sample_rate": 0,
        "decoder": "pil", "bucket": "x".join(map(str, shape)), "latent_shape": shape, "caption": caption,
        "score_resolution": float(side) if modality != "audio" else 0.0, "score_duration": 0.0,
        "score_sample_rate": 16000.0 if modality == "audio" else 0.0,
        "score_caption_words": float(len(caption.split())), "shard": "shard-000000.tar", "status": status,
    }
    row.update(extra)
    return row


ROWS = [
    manifest_row("s05", "image", 64, "a red circle in the top left"),
    manifest_row("s01", "image", 16, "a tiny blue square"),
    manifest_row("s03", "video", 32, "a green triangle moving left on a black background"),
    manifest_row("s02", "audio", 0, "a low 220 Hz tone"),
    manifest_row("s04", "image", 32, "it's a quoted caption"),
    manifest_row("s06", "image", 128, "a large yellow circle", status="filtered"),
]


@pytest.fixture
def table() -> pa.Table:
    return to_table(ROWS, mf.MANIFEST_SCHEMA)


def ids(t: pa.Table) -> list[str]:
    return t["id"].to_pylist()


def test_to_table_keeps_schema_sorts_by_id_and_drops_extra_keys() -> None:
    rows = [dict(r, lat_stats=b"x", text_emb=b"y") for r in ROWS]
    t = to_table(rows, mf.MANIFEST_SCHEMA)
    assert t.schema.equals(mf.MANIFEST_SCHEMA)
    assert ids(t) == ["s01", "s02", "s03", "s04", "s05", "s06"]
    # Rows moved with their ids, not just the id column.
    s05 = t.filter(pa.compute.field("id") == "s05").to_pylist()[0]
    assert s05["width"] == 64 and s05["latent_shape"] == [12, 1, 32, 32]
    assert s05["caption"] == "a red circle in the top left"


def test_to_table_fills_missing_columns_with_nulls_and_handles_no_rows() -> None:
    t = to_table([{"id": "b", "status": "rejected"}, {"id": "a", "reason": "empty_file"}], mf.REJECTS_SCHEMA)
    assert t.schema.equals(mf.REJECTS_SCHEMA)
    blank = dict.fromkeys(mf.REJECTS_SCHEMA.names)
    assert t.to_pylist() == [{**blank, "id": "a", "reason": "empty_file"}, {**blank, "id": "b", "status": "rejected"}]
    empty = to_table([], mf.MANIFEST_SCHEMA)
    assert empty.num_rows == 0 and empty.schema.equals(mf.MANIFEST_SCHEMA)


def test_to_table_refuses_values_of_the_wrong_type() -> None:
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        to_table([manifest_row("s1", "image", 32, "c", width="wide")], mf.MANIFEST_SCHEMA)


def test_write_table_round_trips_and_leaves_no_partial(tmp_path: Path, table: pa.Table) -> None:
    path = tmp_path / mf.MANIFEST
    mf.write_table(table, path)
    assert [p.name for p in tmp_path.iterdir()] == [mf.MANIFEST]
    assert Dataset(tmp_path).manifest().equals(table)


@pytest.mark.parametrize(
    "where, expected",
    [
        ("score_resolution >= 32 and modality == 'image'", ["s04", "s05", "s06"]),
        ("score_resolution>=32 AND modality=='image'", ["s04", "s05", "s06"]),
        ("modality != 'image'", ["s02", "s03"]),
        ('modality == "audio"', ["s02"]),
        ("score_resolution > 32", ["s05", "s06"]),
        ("score_resolution < 32", ["s01", "s02"]),
        ("score_resolution <= 32 and score_resolution > 0", ["s01", "s03", "s04"]),
        ("caption == \"it's a quoted caption\"", ["s04"]),
        ("caption == 'a red circle in the top left'", ["s05"]),
        ("score_caption_words >= 6", ["s03", "s05"]),
        ("width == 64", ["s05"]),
        ("modality == 'image' and modality == 'audio'", []),
    ],
)
def test_parse_where_on_a_real_table(table: pa.Table, where: str, expected: list[str]) -> None:
    assert ids(table.filter(parse_where(where, table.schema))) == expected


def test_parse_where_names_an_unknown_column(table: pa.Table) -> None:
    with pytest.raises(ValueError, match="unknown column 'score_resolutoin'; did you mean 'score_resolution'"):
        parse_where("modality == 'image' and score_resolutoin >= 32", table.schema)
    with pytest.raises(ValueError, match="unknown column 'resolutoin'; did you mean 'resolution'[?] [(]scores: "):
        parse_where("resolutoin >= 32", table.schema)
    with pytest.raises(ValueError, match="unknown column 'zzz' [(]scores: score_resolution, "):
        parse_where("zzz >= 32", table.schema)


def test_a_score_by_its_short_name_selects_as_by_its_column(table: pa.Table) -> None:
    """`aesthetic > 5` as selections are usually written, for the manifest's `score_aesthetic`."""
    for short, full in [("resolution >= 32 and modality == 'image'", "score_resolution >= 32 and modality == 'image'"),
                        ("caption_words >= 6", "score_caption_words >= 6")]:
        assert ids(table.filter(parse_where(short, table.schema))) == ids(
            table.filter(parse_where(full, table.schema))) != []


@pytest.mark.parametrize(
    "where, message",
    [
        ("modality = 'image'", "cannot parse"),
        ("score_resolution >= 32 or modality == 'image'", "'or' is not supported"),
        ("__import__('os').system('true')", "cannot parse"),
        ("score_resolution >=", "must be a number or a quoted string"),
        ("modality == image", "must be a number or a quoted string"),
        ("modality == 'image", "must be a number or a quoted string"),
        ("score_resolution >= 32 and", "must be a number or a quoted string"),
        ("", "cannot parse"),
    ],
)
def test_parse_where_refuses_garbage(table: pa.Table, where: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_where(where, table.schema)


def write_dataset(root: Path, rows: list[dict]) -> Dataset:
    root.mkdir(parents=True)
    mf.write_table(to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    (root / mf.CARD).write_text(json.dumps({"name": "t", "num_samples": len(rows)}))
    return Dataset(root)


def test_select_keeps_only_ok_rows_of_the_modalities_and_where(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "ds", ROWS)
    assert ds.card == {"name": "t", "num_samples": len(ROWS)}
    assert ids(ds.select()) == ["s01", "s02", "s03", "s04", "s05"]  # s06 is filtered
    assert ids(ds.select(modalities=["image"])) == ["s01", "s04", "s05"]
    assert ids(ds.select(modalities=["image", "video"])) == ["s01", "s03", "s04", "s05"]
    assert ids(ds.select("score_resolution >= 32", ["image", "video"])) == ["s03", "s04", "s05"]
    assert ids(ds.select("score_caption_words >= 6", ["audio"])) == []
    assert ds.select("score_resolution >= 32").schema.equals(mf.MANIFEST_SCHEMA)


def test_select_with_a_bad_query_fails_before_filtering(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "ds", ROWS)
    with pytest.raises(ValueError, match="unknown column 'nope'"):
        ds.select("nope > 1", ["image"])


def test_shard_path_stays_inside_the_shards_dir(tmp_path: Path) -> None:
    ds = Dataset(tmp_path / "ds")
    assert ds.shard_path("shard-000003.tar") == (tmp_path / "ds" / mf.SHARDS / "shard-000003.tar").resolve()
    for name in ("../x.tar", "../../etc/passwd", "sub/x.tar", "/etc/passwd", "..", "."):
        with pytest.raises(ValueError, match="outside"):
            ds.shard_path(name)


def test_channel_stats_merge_to_numpy_mean_and_std_over_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    channels = 12
    latents = [
        (rng.standard_normal((channels, 1, 16, 16)) * rng.uniform(0.5, 3.0, (channels, 1, 1, 1))
         + rng.uniform(-2, 2, (channels, 1, 1, 1))).astype(np.float32),
        rng.standard_normal((channels, 4, 16, 16)).astype(np.float32) * 2 + 1,
        rng.standard_normal((channels, 1, 8, 6)).astype(np.float32) - 3,
    ]
    stats = merge_stats([channel_stats(lat) for lat in latents])
    flat = np.concatenate([lat.reshape(channels, -1).astype(np.float64) for lat in latents], axis=1)
    assert stats["count"] == flat.shape[1] == 256 + 1024 + 48
    np.testing.assert_allclose(stats["mean"], flat.mean(axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["std"], flat.std(axis=1), rtol=1e-7)
    assert len(stats["mean"]) == len(stats["std"]) == channels
    json.dumps(stats)  # goes into card.json as is


def test_channel_stats_layout_and_constant_channel() -> None:
    latent = np.zeros((3, 2, 2, 2), dtype=np.float32)
    latent[1] = 5.0
    latent[2, 0] = 1.0
    part = channel_stats(latent)
    assert part.shape == (3, 3) and part.dtype == np.float64
    np.testing.assert_array_equal(part[0], [8, 8, 8])  # counts
    np.testing.assert_array_equal(part[1], [0, 40, 4])  # sums
    np.testing.assert_array_equal(part[2], [0, 200, 4])  # sums of squares
    merged = merge_stats([part])
    assert merged["mean"] == [0.0, 5.0, 0.5]
    # A constant channel gets a small positive std, never 0 (it is divided by when normalising).
    assert 0 < merged["std"][0] < 1e-5 and 0 < merged["std"][1] < 1e-5
    assert merged["std"][2] == pytest.approx(0.5)


def test_parse_where_quoted_value_may_contain_and(table: pa.Table) -> None:
    rows = [manifest_row("s1", "image", 32, "salt and pepper"), manifest_row("s2", "image", 32, "salt")]
    t = to_table(rows, mf.MANIFEST_SCHEMA)
    assert ids(t.filter(parse_where("caption == 'salt and pepper'", t.schema))) == ["s1"]


@pytest.mark.parametrize("where", ["modality == 3", "width >= 'a'"])
def test_parse_where_refuses_a_literal_of_the_wrong_type(table: pa.Table, where: str) -> None:
    with pytest.raises(ValueError, match="modality|width"):
        table.filter(parse_where(where, table.schema))
