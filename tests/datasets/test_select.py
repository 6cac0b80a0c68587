"""`select`: a child dataset from the manifest alone; verify accepts it; training sees only the selection."""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.select import select_dataset
from latentforge.datasets.shards import LatentSample, LatentShardWriter, iter_shards, sha256_file
from latentforge.datasets.verify import verify_dataset


@pytest.fixture
def parent(tmp_path):
    root = tmp_path / "parent"
    rng = np.random.default_rng(0)
    rows, shards = [], []
    for s in range(3):
        name = f"shard-{s:06d}-00.tar"
        with LatentShardWriter(root / mf.SHARDS / name) as w:
            for i in range(4):
                key, modality = f"s{s}{i}", "image" if i % 2 else "video"
                w.write_sample(LatentSample(key, rng.normal(size=(12, 1, 4, 4)).astype(np.float32),
                                            np.zeros((8, 16), np.float32), np.ones(8, bool), "c", {"modality": modality}))
                rows.append({"id": key, "source_id": key, "modality": modality, "latent_shape": [12, 1, 4, 4],
                             "caption": "c", "shard": name, "status": "ok", "bucket": "1x8x8",
                             "score_motion": float(s * 4 + i)})
        shards.append({"name": name, "sha256": sha256_file(root / mf.SHARDS / name), "count": 4})
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    mf.write_table(mf.to_table([], mf.REJECTS_SCHEMA), root / mf.REJECTS)
    card = {"id": "demo-parent", "name": "demo", "num_samples": 12, "shards": shards,
            "encoders": {"text": {"dim": 16, "max_len": 8}}, "latent_stats": {}}
    (root / mf.CARD).write_text(json.dumps(card))
    return root


def test_selection_writes_a_verifiable_child_with_lineage(parent, tmp_path):
    child = tmp_path / "child"
    card = select_dataset(parent, child, "score_motion >= 6 and modality == 'image'")
    chosen = mf.Dataset(child).manifest()["id"].to_pylist()
    assert chosen == ["s13", "s21", "s23"]  # score = 4 * shard + index; odd indices are images
    assert card["parents"] == ["demo-parent"] and card["selection"]["parent"] == "demo-parent"
    assert card["num_samples"] == 3 and card["id"] != "demo-parent"
    assert [s["name"] for s in card["shards"]] == ["shard-000001-00.tar", "shard-000002-00.tar"]
    assert [s["count"] for s in card["shards"]] == [1, 2] and all(s["total"] == 4 for s in card["shards"])
    rejects = mf.Dataset(child).rejects().to_pylist()
    assert len(rejects) == 9 and {r["reason"] for r in rejects} == {"not_selected"}  # every parent row accounted
    assert verify_dataset(child).ok, verify_dataset(child).problems
    # shards are the parent's bytes (hard links), not rewritten
    assert sha256_file(child / mf.SHARDS / "shard-000001-00.tar") == card["shards"][0]["sha256"]


def test_training_reads_only_the_selected_samples(parent, tmp_path):
    from latentforge.training.config import TrainStageConfig
    from latentforge.training.loader import LatentNormalizer, load_batches, select_samples

    select_dataset(parent, tmp_path / "child", "score_motion < 3")
    stage = TrainStageConfig(name="s", modalities=["image", "video"], steps=1)
    child = mf.Dataset(tmp_path / "child")
    keys = [key for _, key in select_samples(child, stage)[1]]
    stats = {"visual": {"mean": [0.0] * 12, "std": [1.0] * 12}}  # this card has none; the loader normalises
    batches = load_batches(child, stage, LatentNormalizer({"latent_stats": stats}))
    assert sum(len(b.captions) for b in batches) == 3  # the loader reads exactly the selected samples
    assert keys == ["s00", "s01", "s02"]
    assert len(list(iter_shards([tmp_path / "child" / mf.SHARDS / "shard-000000-00.tar"]))) == 4


def test_empty_selection_and_existing_output_are_refused(parent, tmp_path):
    with pytest.raises(ValueError, match="matches no sample"):
        select_dataset(parent, tmp_path / "none", "score_motion > 100")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        select_dataset(parent, tmp_path / "busy", None, ["image"])


def test_cli_select(parent, tmp_path):
    from typer.testing import CliRunner

    from latentforge.orchestration.cli import app

    result = CliRunner().invoke(app, ["select", str(parent), "--out", str(tmp_path / "c"), "--where",
                                      "score_motion > 9"])
    assert result.exit_code == 0, result.output
    assert "selected 2 samples" in result.output
    bad = CliRunner().invoke(app, ["select", str(parent), "--out", str(tmp_path / "d"), "--where", "nope > 1"])
    assert bad.exit_code == 2 and "unknown column" in bad.output
    short = CliRunner().invoke(app, ["select", str(parent), "--out", str(tmp_path / "e"), "--where", "motion > 9"])
    assert short.exit_code == 0 and "selected 2 samples" in short.output, short.output


# --- repack: the selected samples in shards of their own ---------------------------------------------------

def raw_members(path):
    """Each sample's members exactly as stored, by key."""
    import tarfile

    out = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            out.setdefault(key, {})[member] = tar.extractfile(info).read()
    return out


def test_a_repacked_selection_holds_only_its_samples_byte_for_byte(parent, tmp_path):
    child = tmp_path / "child"
    card = select_dataset(parent, child, "modality == 'image'", repack=True)
    chosen = mf.Dataset(child).manifest().to_pylist()
    assert [r["id"] for r in chosen] == ["s01", "s03", "s11", "s13", "s21", "s23"]
    assert [s["name"] for s in card["shards"]] == ["shard-000000-00.tar"]  # six small samples: one tar
    assert card["shards"][0]["count"] == 6 and "total" not in card["shards"][0]
    assert card["selection"]["repacked"] is True and card["parents"] == ["demo-parent"]
    assert {r["shard"] for r in chosen} == {"shard-000000-00.tar"}
    packed = raw_members(child / mf.SHARDS / "shard-000000-00.tar")
    assert list(packed) == ["s01", "s03", "s11", "s13", "s21", "s23"]  # only the selection, in the parent's order
    original = {k: v for s in range(3) for k, v in raw_members(parent / mf.SHARDS / f"shard-{s:06d}-00.tar").items()}
    assert all(packed[k] == original[k] for k in packed)  # members copied, not decoded and encoded again
    report = verify_dataset(child)
    assert report.ok and report.checked["samples"] == 6, report.problems
    assert len(mf.Dataset(child).rejects()) == 6 and not list(tmp_path.glob(".child*"))
    linked = select_dataset(parent, tmp_path / "linked", "modality == 'image'")
    assert linked["id"] != card["id"]  # another dataset: other shards
    # its shards hold nothing else, so verify holds it to that (a linked selection's shards may hold more)
    tar = child / mf.SHARDS / "shard-000000-00.tar"
    with LatentShardWriter(tar) as w:
        for key, members in [*packed.items(), ("s00", original["s00"])]:
            w.write(key, members)
    card["shards"][0]["sha256"] = sha256_file(tar)
    (child / mf.CARD).write_text(json.dumps(card))
    assert "shard-000000-00.tar: sample s00 is not in the manifest" in verify_dataset(child).problems


def test_repacking_everything_compacts_small_shards_and_training_reads_the_same_samples(parent, tmp_path):
    from latentforge.training.config import TrainStageConfig
    from latentforge.training.loader import LatentNormalizer, load_batches

    members = raw_members(parent / mf.SHARDS / "shard-000000-00.tar")["s00"]
    per_sample = sum(len(v) for v in members.values()) + 512 * (len(members) + 1)  # with its tar headers
    card = select_dataset(parent, tmp_path / "packed", None, repack=True, shard_mb=5.5 * per_sample / 2**20)
    assert [s["count"] for s in card["shards"]] == [5, 5, 2]  # 12 samples from 3 tars of 4 into tars of up to 5
    assert verify_dataset(tmp_path / "packed").ok
    stage = TrainStageConfig(name="s", modalities=["image", "video"], steps=1)
    stats = LatentNormalizer({"latent_stats": {"visual": {"mean": [0.0] * 12, "std": [1.0] * 12}}})

    def latents(root):  # every sample the loader yields, as its latent's bytes
        return sorted(x.numpy().tobytes() for b in load_batches(mf.Dataset(root), stage, stats) for x in b.latent)

    assert len(latents(tmp_path / "packed")) == 12 and latents(tmp_path / "packed") == latents(parent)


def test_a_damaged_parent_shard_stops_a_repack_and_leaves_no_child(parent, tmp_path):
    shard = parent / mf.SHARDS / "shard-000001-00.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first sample's first member: the tar still reads
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-000001-00.tar has sha256 .* not the .* card records"):
        select_dataset(parent, tmp_path / "child", None, repack=True)
    assert not (tmp_path / "child").exists() and not list(tmp_path.glob(".child*"))
    shard.write_bytes(bytes(data[:1500]))  # cut short
    with pytest.raises(ValueError, match="shard-000001-00.tar (cannot be read|has sha256)"):
        select_dataset(parent, tmp_path / "child", None, repack=True)
    assert not (tmp_path / "child").exists()
    linked = select_dataset(parent, tmp_path / "linked", "score_motion < 4", repack=True)  # shard 0 only: fine
    assert linked["num_samples"] == 4


def test_a_sample_missing_from_its_shard_is_named(parent, tmp_path):
    table = mf.Dataset(parent).manifest()
    ids = [("s99" if i == "s00" else i) for i in table["id"].to_pylist()]  # the manifest names a sample no tar holds
    mf.write_table(table.set_column(0, "id", pa.array(ids, pa.string())), parent / mf.MANIFEST)
    with pytest.raises(ValueError, match="shard-000000-00.tar lacks 1 samples its manifest places there: s99"):
        select_dataset(parent, tmp_path / "child", None, repack=True)


@pytest.mark.parametrize("repack", [False, True])
def test_a_parent_shard_gone_is_named_before_anything_is_written(parent, tmp_path, repack):
    (parent / mf.SHARDS / "shard-000002-00.tar").unlink()
    with pytest.raises(ValueError, match="1 shards holding selected samples are missing .*: shard-000002-00.tar"):
        select_dataset(parent, tmp_path / "child", None, repack=repack)
    assert not (tmp_path / "child").exists() and not list(tmp_path.glob(".child*"))
    kept = select_dataset(parent, tmp_path / "first", "score_motion < 8", repack=repack)
    assert kept["num_samples"] == 8  # a selection that needs only the shards still there goes ahead


def test_a_manifest_naming_a_shard_the_card_lacks_is_refused(parent, tmp_path):
    table = mf.Dataset(parent).manifest()
    shards = [("shard-000009-00.tar" if s == "shard-000002-00.tar" else s) for s in table["shard"].to_pylist()]
    mf.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(shards, pa.string())),
                   parent / mf.MANIFEST)
    for repack in (False, True):  # a linked child used to drop those rows' shard from its card silently
        with pytest.raises(ValueError, match="shards the card does not list: shard-000009-00.tar"):
            select_dataset(parent, tmp_path / "child", None, repack=repack)


def test_cli_select_repack(parent, tmp_path):
    from typer.testing import CliRunner

    from latentforge.orchestration.cli import app

    result = CliRunner().invoke(app, ["select", str(parent), "--out", str(tmp_path / "c"), "--repack"])
    assert result.exit_code == 0, result.output
    assert "selected 12 samples" in result.output and "1 shard" in result.output
    assert verify_dataset(tmp_path / "c").ok


# --- the `where` grammar on real manifests ------------------------------------------------------------------
def write_manifest(root, rows, cast=None):
    """A dataset dir holding only a manifest (all `select` reads), optionally rewritten with other column types."""
    root.mkdir(parents=True)
    table = mf.to_table([{"modality": "image", "status": "ok", **r} for r in rows], mf.MANIFEST_SCHEMA)
    if cast:
        table = table.cast(pa.schema([pa.field(f.name, cast(f.type)) for f in table.schema]))
    mf.write_table(table, root / mf.MANIFEST)
    return mf.Dataset(root)


@pytest.mark.parametrize("where, word", [
    ("modality == 'image' or modality == 'video'", "or"),
    ("modality == 'image' OR modality == 'video'", "OR"),
    ("modality != 'audio' or caption == 'blue'", "or"),
    ("modality == 'image' and not modality == 'video'", "not"),
    ("(modality == 'image')", "("),
])
def test_or_not_and_parentheses_are_refused_not_read_as_one_string(tmp_path, where, word):
    """The quoted value once ran from the first quote to the last: `== 'image' or ... 'video'` matched nothing,
    and `!=` everything; a training stage accepted it."""
    from pydantic import ValidationError

    from latentforge.training.config import TrainStageConfig

    ds = write_manifest(tmp_path / "ds", [{"id": "a", "caption": "red"}, {"id": "b", "modality": "video"}])
    with pytest.raises(ValueError, match=f"{re.escape(repr(word))} is not supported.*joined by `and`"):
        ds.select(where)
    with pytest.raises(ValidationError, match="is not supported"):
        TrainStageConfig(name="s", modalities=["image", "video"], where=where)


@pytest.mark.parametrize("where", ["caption == 'a' 'b'", "caption == 'a' == 'b'", "caption == 'a'b"])
def test_a_quoted_value_is_exactly_one_quoted_string(tmp_path, where):
    ds = write_manifest(tmp_path / "ds", [{"id": "a", "caption": "a"}])
    with pytest.raises(ValueError, match="must be a number or a quoted string"):
        ds.select(where)


def test_or_and_quotes_inside_a_quoted_value_are_text(tmp_path):
    rows = [{"id": "a", "caption": "black or white", "relpath": "it's"}, {"id": "b", "caption": "black"}]
    ds = write_manifest(tmp_path / "ds", rows)
    assert ds.select("caption == 'black or white'")["id"].to_pylist() == ["a"]
    assert ds.select("caption != 'black or white' and modality == 'image'")["id"].to_pylist() == ["b"]
    assert ds.select("""relpath == "it's" and caption == 'black or white'""")["id"].to_pylist() == ["a"]


@pytest.mark.parametrize("minimum, maximum", [(0.3, None), (5.1, None), (0.0, 0.7), (0.0, 0.3), (0.0, 5.1)])
def test_reselecting_with_a_curation_threshold_keeps_what_curation_kept(tmp_path, minimum, maximum):
    """Curation compares the float64 score with its threshold, then stores float32: float32(5.1) < 5.1 and
    float32(0.3) > 0.3, so comparing stored scores with float64 literals dropped rows kept at the threshold."""
    from latentforge.pipelines.stages.filter_motion import FilterMotion, MotionConfig

    cfg = MotionConfig(min_motion=minimum, max_motion=maximum)
    edge = minimum if maximum is None else maximum
    scores = [edge, np.nextafter(edge, np.inf), np.nextafter(edge, -np.inf), edge + 0.01, edge - 0.01]
    rows = [{"id": f"s{i}", "modality": "video", "score_motion": float(s),
             "status": "filtered" if FilterMotion._verdict(float(s), cfg) else "ok"} for i, s in enumerate(scores)]
    kept = [r["id"] for r in rows if r["status"] == "ok"]
    outside, rounds_in = ("s3", "s1") if maximum is not None else ("s4", "s2")
    assert "s0" in kept and outside not in kept and rounds_in not in kept  # the threshold itself is kept
    where = f"score_motion >= {minimum}" + (f" and score_motion <= {maximum}" if maximum is not None else "")
    ds = write_manifest(tmp_path / "ds", rows)
    assert ds.select(where)["id"].to_pylist() == kept
    # Ignoring status: a row filtered by more than float32 rounding stays out; one an ulp past the threshold
    # is stored as the threshold itself, so no selection can tell it from a kept one.
    everything = ds.manifest()
    chosen = set(everything.filter(mf.parse_where(where, everything.schema))["id"].to_pylist())
    assert chosen - {rounds_in} == set(kept)


def test_scores_compare_in_their_stored_type_and_nan_or_null_match_nothing(tmp_path):
    """A NaN is unequal to everything yet matches no comparison, `!=` included, as a null does (SQL's NULL)."""
    rows = [{"id": "a", "score_motion": 0.3}, {"id": "b", "score_motion": 0.5},
            {"id": "c", "score_motion": float("nan")}, {"id": "d", "score_motion": None}]
    ds = write_manifest(tmp_path / "ds", rows)

    def ids(where):
        return ds.select(where)["id"].to_pylist()

    assert ids("score_motion == 0.3") == ["a"]
    assert ids("score_motion <= 0.3") == ["a"] and ids("score_motion > 0.3") == ["b"]
    assert ids("score_motion != 0.3") == ["b"]
    assert ids("score_motion < inf") == ["a", "b"] and ids("score_motion > -inf") == ["a", "b"]
    with pytest.raises(ValueError, match="NaN"):
        ids("score_motion != nan")


def test_integer_columns_compare_exactly_with_integers_and_fractions(tmp_path):
    ds = write_manifest(tmp_path / "ds", [{"id": "a", "width": 64}, {"id": "b", "width": 65}])
    assert ds.select("width == 64")["id"].to_pylist() == ["a"]
    assert ds.select("width > 64.5")["id"].to_pylist() == ["b"]
    assert ds.select("width < 10000000000")["id"].to_pylist() == ["a", "b"]  # past int32: still compares


def test_a_list_column_is_refused_when_the_config_is_validated(tmp_path):
    """`latent_shape >= 4` used to pass validation and fail inside pyarrow once training planned its data."""
    from pydantic import ValidationError

    from latentforge.training.config import TrainStageConfig

    with pytest.raises(ValidationError, match=r"column 'latent_shape' holds list<item: int32>"):
        TrainStageConfig(name="s", modalities=["image"], where="latent_shape >= 4")
    ds = write_manifest(tmp_path / "ds", [{"id": "a", "latent_shape": [4, 1, 8, 8]}])
    with pytest.raises(ValueError, match="'latent_shape' holds list.*only string and number columns"):
        ds.select("latent_shape >= 4")


def test_a_manifest_rewritten_with_large_strings_and_doubles_still_selects(tmp_path):
    """polars and pandas write large_string (and often float64): quoted comparisons must still work."""
    def widen(t):
        return pa.large_string() if t == pa.string() else pa.float64() if t == pa.float32() else t

    rows = [{"id": "a", "score_motion": 0.3}, {"id": "b", "modality": "video", "score_motion": 0.2}]
    ds = write_manifest(tmp_path / "ds", rows, cast=widen)
    assert ds.manifest().schema.field("modality").type == pa.large_string()
    assert ds.select("modality == 'image'")["id"].to_pylist() == ["a"]
    assert ds.select("modality != 'image' and score_motion < 0.3")["id"].to_pylist() == ["b"]


def test_rows_a_selection_cannot_judge_are_counted_in_a_warning(tmp_path, caplog):
    """Images have no motion score: `score_motion > 0.3` over images and videos drops every image, which is what
    it says, but a user who meant the videos' motion must hear that a whole modality went."""
    rows = [{"id": "i1", "score_motion": None}, {"id": "i2", "score_motion": float("nan")},
            {"id": "v1", "modality": "video", "score_motion": 0.5, "score_aesthetic": 6.0},
            {"id": "v2", "modality": "video", "score_motion": 0.1, "score_aesthetic": 6.0},
            {"id": "r", "status": "filtered", "score_motion": None}]  # not a candidate: not counted
    ds = write_manifest(tmp_path / "ds", rows)
    with caplog.at_level("WARNING", logger="latentforge.datasets.manifest"):
        assert ds.select("score_motion > 0.3")["id"].to_pylist() == ["v1"]
    assert "2 kept rows have no score_motion" in caplog.text and "image 2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="latentforge.datasets.manifest"):
        assert ds.select("score_motion > 0.3", modalities=["video"])["id"].to_pylist() == ["v1"]
        ds.select("modality == 'video'")
    assert caplog.text == ""
