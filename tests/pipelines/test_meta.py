"""The job's metadata rows held in columns (pipelines/meta.py) and what reads them: the card, the manifest."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.shards import npy_bytes
from latentforge.pipelines import meta
from latentforge.pipelines.card import _stacked, encoder_descriptions, latent_statistics
from latentforge.pipelines.readmit import replace_rows

ENCODER = json.dumps({"kind": "haar", "channels": 4})
TEXT = json.dumps({"kind": "t5", "dim": 32})


def batch(ids: list[str], **extra) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands one over: object columns of str, typed numeric columns, npy bytes."""
    n = len(ids)
    out = {"id": np.array(ids, dtype=object), "status": np.array(["ok"] * n, dtype=object),
           "modality": np.array(["image", "audio"] * (n // 2) + ["image"] * (n % 2), dtype=object),
           "score_resolution": np.arange(n, dtype=np.float64), "width": np.full(n, 64, np.int64),
           "latent_encoder": np.array([ENCODER] * n, dtype=object), "text_encoder": np.array([TEXT] * n, dtype=object),
           "lat_stats": np.array([npy_bytes(np.full((3, 4), i + 1.0)) for i in range(n)], dtype=object),
           "latent": np.array([np.zeros((4, 2, 2), np.float32)] * n, dtype=object)}
    out.update(extra)
    return out


def test_a_batch_becomes_columns_without_its_latents_and_with_repeated_values_as_dictionaries() -> None:
    table = meta.from_batch(batch(["a", "b", "c"]), np.array([0, 2]))
    assert table.num_rows == 2 and "latent" not in table.column_names
    assert pa.types.is_dictionary(table["latent_encoder"].type) and pa.types.is_dictionary(table["status"].type)
    assert table["score_resolution"].type == pa.float64() and table["width"].type == pa.int64()
    row = table.to_pylist()[1]
    assert row["id"] == "c" and row["latent_encoder"] == ENCODER and row["score_resolution"] == 2.0
    # numpy scalars in object columns (a row's values, as dicts hold them) become plain values
    scalars = meta.from_rows([{"id": np.str_("x"), "score": np.float32(0.5), "n": np.int64(3), "b": np.bool_(True)}])
    assert scalars.to_pylist() == [{"id": "x", "score": 0.5, "n": 3, "b": True}]


def test_collected_pieces_are_one_table_whatever_their_types_and_columns(monkeypatch) -> None:
    monkeypatch.setattr(meta, "COMPACT_ROWS", 4)
    pieces = [
        [{"id": "a", "score": 1, "stage": "", "extra": None}],  # an int where later pieces have floats
        [{"id": "b", "score": 2.5, "stage": "dedup", "extra": None}, {"id": "c", "score": 0.0, "stage": ""}],
        [{"id": f"d{i}", "score": 1.5, "stage": "filter_basic", "extra": "x"} for i in range(5)],
        [{"id": "e", "score": 3.0}],  # no stage column at all
    ]
    collector = meta.Collector()
    for rows in pieces:
        collector.add(meta.from_rows(rows))
    collector.add(meta.from_rows([]))
    table = collector.table()
    assert table.schema.field("score").type == pa.float64()
    assert pa.types.is_dictionary(table["stage"].type)
    got = {r["id"]: r for r in table.to_pylist()}
    assert len(got) == table.num_rows == 9
    assert got["a"]["score"] == 1.0 and got["e"]["stage"] is None and got["c"]["extra"] is None
    assert got["d3"] == {"id": "d3", "score": 1.5, "stage": "filter_basic", "extra": "x"}
    assert table["id"].num_chunks <= 3  # compacted: one chunk per 4 rows or more, not one per piece
    # a dictionary column meeting the same column plain
    mixed = meta.concat([table, pa.table({"id": ["f"], "stage": ["dedup"]})])
    assert mixed.to_pylist()[-1]["stage"] == "dedup" and mixed.num_rows == 10


def test_batches_wait_as_numpy_and_become_columns_once_per_run_of_alike_batches(monkeypatch) -> None:
    """add_batch converts the batches that came together in one go (not one conversion per 32-row batch), starts
    a new run where the columns change, and keeps the rows in the order they came, tables added between too."""
    monkeypatch.setattr(meta, "COMPACT_ROWS", 8)
    between = meta.from_rows([{"id": "t0", "status": "rejected"}])
    conversions = []
    real = meta.from_columns
    monkeypatch.setattr(meta, "from_columns", lambda columns: conversions.append(len(columns["id"])) or real(columns))
    collector = meta.Collector()
    collector.add_batch(batch(["a0", "a1", "a2"]))
    collector.add_batch(batch(["b0", "b1", "b2", "b3"]), np.array([1, 3]))  # rows at `take` only
    collector.add_batch(batch(["c0", "c1"], width=np.array([1.5, 2.5])))  # float where int came: a new run
    collector.add(between)  # a table between batches
    for i in range(4):
        collector.add_batch(batch([f"d{i}{j}" for j in range(3)]))
    collector.add_batch(batch([]))
    table = collector.table()
    assert conversions == [5, 2, 9, 3]  # 3 + 2 alike; 2 (before the table); 9 rows reach COMPACT_ROWS; the last 3
    assert table["id"].to_pylist() == ["a0", "a1", "a2", "b1", "b3", "c0", "c1", "t0"] + [
        f"d{i}{j}" for i in range(4) for j in range(3)]
    assert table["width"].type == pa.float64() and table["width"].to_pylist()[5:8] == [1.5, 2.5, None]
    assert "latent" not in table.column_names and pa.types.is_dictionary(table["latent_encoder"].type)
    assert table.to_pylist()[3] == meta.from_batch(batch(["b0", "b1"]), np.array([1])).to_pylist()[0] | {
        "width": 64.0}


def test_replacing_rows_by_id_keeps_the_others_and_ignores_strangers() -> None:
    table = meta.from_rows([{"id": i, "status": "filtered"} for i in "abc"])
    out = replace_rows(table, meta.from_rows([{"id": "b", "status": "ok", "shard": 7}, {"id": "z", "status": "ok"}]))
    assert sorted((r["id"], r["status"], r["shard"]) for r in out.to_pylist()) == [
        ("a", "filtered", None), ("b", "ok", 7), ("c", "filtered", None)]


def test_latent_statistics_read_from_the_buffer_equal_those_read_one_value_at_a_time() -> None:
    rows = meta.from_batch(batch([f"s{i}" for i in range(7)]))
    column = rows["lat_stats"]
    one_by_one = np.stack([np.load(io.BytesIO(v), allow_pickle=False) for v in column.to_pylist()])
    assert np.array_equal(_stacked(column), one_by_one)
    stats = latent_statistics(rows)
    assert set(stats) == {"audio", "visual"} and stats["visual"]["count"] == 1 + 3 + 5 + 7
    # each family its own shape (audio latents have other channels than images')
    audio = np.array([npy_bytes(np.full((3, 2), 1.0)) if i % 2 else v for i, v in enumerate(column.to_pylist())],
                     dtype=object)
    mixed = latent_statistics(meta.from_batch(batch([f"s{i}" for i in range(7)], lat_stats=audio)))
    assert mixed["audio"]["count"] == 3 and len(mixed["audio"]["mean"]) == 2 and len(mixed["visual"]["mean"]) == 4
    # values of another shape among them: each read on its own (the stack then refuses them)
    odd = pa.chunked_array([pa.array(column.to_pylist() + [npy_bytes(np.zeros((3, 2)))], pa.binary())])
    with pytest.raises(ValueError):
        _stacked(odd)


def test_encoder_descriptions_are_read_once_each_and_must_agree() -> None:
    rows = meta.from_batch(batch(["a", "b", "c"]))
    assert encoder_descriptions(rows) == {"visual": json.loads(ENCODER), "audio": json.loads(ENCODER),
                                          "text": json.loads(TEXT)}
    other = json.dumps({"kind": "haar", "channels": 8})
    clash = meta.from_batch(batch(["a", "b", "c"], latent_encoder=np.array([ENCODER, ENCODER, other], dtype=object)))
    with pytest.raises(RuntimeError, match="visual encoder differs"):
        encoder_descriptions(clash)


def test_a_table_conforms_to_the_manifest_schema() -> None:
    rows = meta.from_batch(batch(["b", "a"], bucket=np.array(["64x64", "64x64"], dtype=object)))
    rows = rows.append_column("latent_shape", pa.array([[4, 8, 8], [4, 8, 8]], pa.list_(pa.int64())))
    table = mf.conform(rows, mf.MANIFEST_SCHEMA)
    assert table.schema == mf.MANIFEST_SCHEMA
    assert table["id"].to_pylist() == ["b", "a"] and table["width"].to_pylist() == [64, 64]
    assert table["caption"].null_count == 2 and table["latent_shape"].to_pylist() == [[4, 8, 8]] * 2


def test_a_few_rows_leave_by_slices_that_share_the_buffers_and_many_by_a_filter(monkeypatch) -> None:
    monkeypatch.setattr(meta, "SLICE_ROWS", 16)  # slices while there are at most ~37 runs of rows left
    table = meta.from_rows([{"id": f"r{i:03d}", "stage": ("", "dedup")[i % 2], "n": i} for i in range(600)])
    few = meta.without(table, ["r000", "r007", "r008", "r599", "absent"])
    assert [r["n"] for r in few.to_pylist()] == [i for i in range(600) if i not in (0, 7, 8, 599)]
    assert few["n"].num_chunks == 2  # [1, 7) and [9, 599): no copy; the empty [8, 8) is no chunk
    many = meta.without(table, [f"r{i:03d}" for i in range(0, 600, 2)])
    assert [r["n"] for r in many.to_pylist()] == list(range(1, 600, 2)) and many["n"].num_chunks == 1
    assert meta.without(table, []) is table and meta.without(table, ["absent"]) is table
    assert meta.without(table, [f"r{i:03d}" for i in range(600)]).num_rows == 0


def test_stacked_statistics_read_any_header_as_numpy_does() -> None:
    """Headers that differ (a Fortran-ordered array among C-ordered ones), or a header not a multiple of 8 bytes:
    the same values as np.load, read one at a time where the buffer cannot be viewed as one array."""
    values = [np.arange(12, dtype=np.float64).reshape(3, 4) + i for i in range(3)]
    fortran = [npy_bytes(v) for v in values[:2]] + [_fortran_npy(values[2])]
    assert np.array_equal(_stacked(pa.chunked_array([pa.array(fortran, pa.binary())])), np.stack(values))
    for kind in (pa.binary(), pa.large_binary()):  # both offset widths, from a slice of a longer array
        column = pa.array([b"x"] + [npy_bytes(v) for v in values], kind).slice(1)
        assert np.array_equal(_stacked(pa.chunked_array([column])), np.stack(values))


def _fortran_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(array), allow_pickle=False)
    return buf.getvalue()


def test_finished_rows_vote_in_dedup_as_they_stood_when_it_ran() -> None:
    from latentforge.pipelines.duplicates import SETTLED, voters

    rows = meta.from_rows([
        {"id": "rep", "status": "ok", "stage": "", "duplicate_of": "", "score_resolution": 2.0},
        {"id": "blurry", "status": "filtered", "stage": "filter_sharpness", "duplicate_of": "", "phash": "ab"},
        {"id": "copy", "status": "filtered", "stage": "dedup", "duplicate_of": "rep"},
        {"id": "broken", "status": "rejected", "stage": "probe", "duplicate_of": ""},
    ])
    later = {"filter_sharpness", "caption_select"}
    plain = {r["id"]: (r["status"], r[SETTLED]) for r in voters(rows, later).to_pylist()}
    assert plain == {"rep": ("ok", False), "blurry": ("ok", False), "copy": ("ok", False),
                     "broken": ("rejected", False)}
    settled = {r["id"]: (r["status"], r[SETTLED]) for r in voters(rows, later, settled=True).to_pylist()}
    assert settled == {"rep": ("ok", True), "blurry": ("ok", True), "broken": ("rejected", False)}
    assert voters(rows, later).to_pylist()[1]["phash"] == "ab"
    assert voters(rows, later).to_pylist()[0]["score_resolution"] == 2.0
    assert voters(meta.from_rows([]), later).num_rows == 0
