"""The HTML report, built from a real dataset directory whose rows point at a generated demo corpus."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.pipelines.report import write_report

SCRIPT_CAPTION = '<script>alert("x")</script> a shape'
KEPT = {  # relpath -> scores; varied so each (column, modality) gets a histogram
    "images/img_00000.png": {"score_sharpness": 10.0, "score_resolution": 64.0},
    "images/img_00001.jpg": {"score_sharpness": 25.0, "score_resolution": 64.0},
    "images/img_00002.png": {"score_sharpness": 40.0, "score_resolution": 64.0},
    "images/img_00003.jpg": {"score_sharpness": 55.0, "score_resolution": 64.0},
    "videos/vid_00000.mp4": {"score_motion": 0.2, "score_resolution": 64.0},
    "videos/vid_00001.mp4": {"score_motion": 0.7, "score_resolution": 64.0},
    "audio/aud_00000.wav": {"score_loudness": -20.0, "score_resolution": 0.0},  # 0 = not scored for audio
    "audio/aud_00001.wav": {"score_loudness": -14.0, "score_resolution": 0.0},
}
CONSTANT = {"score_caption_words": 5.0}  # the same for every row, so no histogram
REJECTS = [  # relpath, status, reason
    ("broken/empty.png", "rejected", "empty_file"),
    ("images/img_00004.png", "filtered", "resolution_below_min"),
    ("images/img_00005.jpg", "filtered", "resolution_below_min"),
    ("audio/aud_00002.wav", "filtered", "sample_rate_below_min"),
]


def _modality(relpath: str) -> str:
    return {"images": "image", "videos": "video", "audio": "audio"}.get(relpath.split("/")[0], "image")


def _kept_rows(corpus: Path, captions: dict[str, str]) -> list[dict]:
    rows = []
    for i, (relpath, scores) in enumerate(KEPT.items()):
        caption = SCRIPT_CAPTION if i == 0 else captions[relpath]
        rows.append({"id": f"k{i:03d}", "source_id": f"s{i:03d}", "uri": str(corpus / relpath), "relpath": relpath,
                     "modality": _modality(relpath), "caption": caption, "status": "ok", **CONSTANT, **scores})
    return rows


def _reject_rows(corpus: Path) -> list[dict]:
    return [{"id": f"r{i:03d}", "source_id": f"x{i:03d}", "uri": str(corpus / relpath), "relpath": relpath,
             "modality": _modality(relpath), "status": status, "stage": "filter", "reason": reason,
             "message": f"{reason} <b>detail</b>"} for i, (relpath, status, reason) in enumerate(REJECTS)]


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("report")
    corpus = tmp / "c"
    index = generate_demo_corpus(corpus, DemoCorpusSpec(num_images=4, num_videos=2, num_audio=2))
    captions = {entry["path"]: entry["caption"] for entry in index["files"]}
    dataset = tmp / "ds"
    dataset.mkdir()
    mf.write_table(mf.to_table(_kept_rows(corpus, captions), mf.MANIFEST_SCHEMA), dataset / mf.MANIFEST)
    mf.write_table(mf.to_table(_reject_rows(corpus), mf.REJECTS_SCHEMA), dataset / mf.REJECTS)
    card = {"name": "demo", "id": "demo-0123456789ab", "config_hash": "cafef00d",
            "encoders": {"visual": {"kind": "haar", "model": ""}, "audio": {"kind": "dct_frames"},
                         "text": {"kind": "minilm", "model": "all-MiniLM-L6-v2"}}}
    (dataset / mf.CARD).write_text(json.dumps(card))
    out = write_report(dataset)
    assert out == dataset / "report.html"
    return out.read_text(encoding="utf-8")


def _figures(page: str) -> list[str]:
    return re.findall(r"<figure class=\"thumb[^\"]*\".*?</figure>", page, flags=re.DOTALL)


def test_is_a_self_contained_page_with_the_header(report_html):
    assert report_html.startswith("<!doctype html>")
    assert report_html.rstrip().endswith("</html>")
    assert "<script" not in report_html and "http://" not in report_html.replace("http://www.w3.org/2000/svg", "")
    for text in ("demo-0123456789ab", "cafef00d", "haar", "dct_frames", "all-MiniLM-L6-v2"):
        assert text in report_html
    assert "kept <b>8</b>" in report_html and "rejected <b>1</b>" in report_html and "filtered <b>3</b>" in report_html


def test_reason_chart_names_reasons_with_counts_coloured_by_status(report_html):
    assert 'data-status="filtered" data-reason="resolution_below_min" data-count="2"' in report_html
    assert 'data-status="rejected" data-reason="empty_file" data-count="1"' in report_html
    assert 'data-status="filtered" data-reason="sample_rate_below_min" data-count="1"' in report_html
    assert "#c0392b" in report_html and "#e69f00" in report_html


def test_a_histogram_per_varying_score_and_modality(report_html):
    charts = set(re.findall(r'<svg class="histogram"[^>]*data-column="(\w+)" data-modality="(\w+)"', report_html))
    assert charts == {("score_sharpness", "image"), ("score_motion", "video"), ("score_loudness", "audio"),
                      ("score_resolution", "image"), ("score_resolution", "video")}
    assert report_html.count("<svg") == len(charts) + 1  # plus the reasons chart
    assert "min 10, max 55" in report_html and "score_caption_words" not in report_html


def test_thumbnails_for_every_modality_and_a_placeholder_for_undecodable_files(report_html):
    figures = _figures(report_html)
    assert len(figures) == len(KEPT) + len(REJECTS)
    for modality in ("image", "video", "audio"):
        assert any(f'data-modality="{modality}"' in f and "data:image/png;base64," in f for f in figures), modality
    empty = [f for f in figures if 'data-relpath="broken/empty.png"' in f]
    assert len(empty) == 1 and "placeholder" in empty[0] and "data:image/png" not in empty[0]
    assert "empty_file" in empty[0]


def test_text_is_escaped(report_html):
    assert '<script>alert("x")</script>' not in report_html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; a shape" in report_html
    assert "&lt;b&gt;detail&lt;/b&gt;" in report_html


def test_thumbnail_limit_and_explicit_out(tmp_path):
    # Missing files, no rejects table and no card: the report still renders, one placeholder per tile.
    dataset = tmp_path / "ds"
    dataset.mkdir()
    rows = [{"id": f"k{i}", "uri": str(tmp_path / f"missing{i}.png"), "relpath": f"missing{i}.png",
             "modality": "image", "caption": "gone", "status": "ok"} for i in range(5)]
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), dataset / mf.MANIFEST)
    out = write_report(dataset, tmp_path / "r.html", thumbnails=2)
    page = out.read_text(encoding="utf-8")
    figures = _figures(page)
    assert len(figures) == 2 and all("placeholder" in f and "not_found" in f for f in figures)


def test_thumbnails_are_picked_round_robin_across_modalities_from_the_table():
    """From the Arrow table, only the rows shown become dicts: the first of each modality in turn, a row
    without a modality under "unknown" (after image, video, audio)."""
    import pyarrow as pa

    from latentforge.pipelines.report import _pick

    modalities = ["image"] * 50 + ["audio", None, "video", "", "audio", "video"]
    table = pa.table({"id": [f"r{i:02d}" for i in range(len(modalities))], "modality": modalities})
    picked = [row["id"] for row in _pick(table, 7)]
    assert picked == ["r00", "r52", "r50", "r51", "r01", "r55", "r54"]  # image, video, audio, unknown, ...
    assert [row["id"] for row in _pick(table, 0)] == [] and len(_pick(table, 100)) == len(modalities)
    assert [row["id"] for row in _pick(table.drop_columns(["modality"]), 2)] == ["r00", "r01"]
