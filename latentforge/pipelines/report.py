"""A self-contained HTML report of a curated dataset: what was kept, why the rest was dropped, how the
scores are distributed, and what the samples look like.

One file with inline CSS, inline SVG charts and base64 PNG thumbnails, so it can be attached to a run or
a ticket and opened anywhere, without a server, the dataset or a network. The charts are simple enough to
emit as SVG by hand, which keeps a plotting stack out of curation environments.
"""
from __future__ import annotations

import base64
import html
import io
import itertools
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from latentforge.datasets import manifest as mf
from latentforge.datasets import audio, media, storage, video

REPORT = "report.html"
MODALITIES = ("image", "video", "audio")
STATUS_COLORS = {"rejected": "#c0392b", "filtered": "#e69f00"}
HIST_BINS = 20
IMAGE_THUMB = (96, 96)
VIDEO_FRAMES, VIDEO_THUMB = 4, (64, 64)
WAVE_SIZE = (160, 48)  # (width, height), PIL order
AUDIO_RATE, AUDIO_SECONDS = 16_000, 2.0
# Thumbnails are a side show: a file that decodes slowly or is huge gets a placeholder instead of stalling the report.
DECODE_TIMEOUT_S = 10.0
MAX_THUMB_PIXELS = 64_000_000
# media raises MediaError for bad content; OSError / ValueError cover files that vanish or odd arrays.
_DECODE_ERRORS = (media.MediaError, OSError, ValueError)

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 16px 8px 0;display:inline-table;vertical-align:top}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}td.n{text-align:right}
.meta{color:#555}.meta code{background:#eee;padding:1px 4px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}
figure.thumb{width:260px}figure.thumb img{image-rendering:pixelated;display:block}
figcaption{font-size:12px;color:#444;word-break:break-word}
.placeholder{width:96px;height:96px;background:#bbb;color:#333;font-size:11px;display:flex;
 align-items:center;justify-content:center;text-align:center;padding:4px;box-sizing:border-box}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def write_report(dataset_dir: Path | str, out: Path | str | None = None, *, thumbnails: int = 12) -> Path | str:
    """Write the HTML report of `dataset_dir` (default: dataset_dir/report.html) and return its path.

    Either may be a URI (s3://...): thumbnails are then decoded from scratch copies and the page uploaded."""
    dataset_dir = storage.as_location(dataset_dir)
    out = storage.as_location(out) if out is not None else storage.join(dataset_dir, REPORT)
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory() as tmp:
            storage.upload(write_report(dataset_dir, Path(tmp) / REPORT, thumbnails=thumbnails), out)
        return out
    card, kept, rejects = _load(mf.Dataset(dataset_dir))
    body = [
        _header(card, kept, rejects),
        _section("Why inputs were dropped", _reasons_chart(rejects)),
        _section("Score distributions", _histograms(kept)),
        _section("Kept samples", _thumb_grid(_pick(kept, thumbnails), kept=True)),
        _section("Rejected and filtered samples", _thumb_grid(_pick(rejects, thumbnails), kept=False)),
    ]
    title = f"latentforge report: {card.get('name') or storage.name_of(dataset_dir)}"
    tmp = out.with_suffix(".partial")  # a reader never sees half a report
    tmp.write_text(_page(title, body), encoding="utf-8")
    tmp.replace(out)
    return out


def _load(dataset: mf.Dataset) -> tuple[dict, pa.Table, pa.Table]:
    """Card, kept rows and rejects; a dataset without rejects or a card still gets a report."""
    card = dataset.card if storage.is_file(storage.join(dataset.root, mf.CARD)) else {}
    manifest = dataset.manifest()
    kept = manifest.filter(pc.field("status") == "ok") if "status" in manifest.column_names else manifest
    has_rejects = storage.is_file(storage.join(dataset.root, mf.REJECTS))
    rejects = dataset.rejects() if has_rejects else mf.REJECTS_SCHEMA.empty_table()
    return card, kept, rejects


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float) -> str:
    return f"{value:.4g}"


def _page(title: str, body: list[str]) -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _section(title: str, content: str) -> str:
    return f"<section><h2>{_e(title)}</h2>\n{content}\n</section>"


def _modality_key(modality: str) -> tuple[int, str]:
    """Image, video, audio first, in that order; anything else (e.g. "unknown") after, by name."""
    return (MODALITIES.index(modality) if modality in MODALITIES else len(MODALITIES), modality)


# ---------------------------------------------------------------- header


def _header(card: dict, kept: pa.Table, rejects: pa.Table) -> str:
    statuses = Counter(rejects.column("status").to_pylist())
    sources = len(set(kept.column("source_id").to_pylist())) if "source_id" in kept.column_names else 0
    meta = (f"<p class=\"meta\">id <code>{_e(card.get('id', '?'))}</code> · config hash "
            f"<code>{_e(card.get('config_hash', '?'))}</code> · kept <b>{kept.num_rows}</b> samples from "
            f"{sources} sources · rejected <b>{statuses.get('rejected', 0)}</b> · "
            f"filtered <b>{statuses.get('filtered', 0)}</b></p>")
    tables = _modality_table(kept, rejects) + _encoder_table(card.get("encoders", {}))
    return f"<header><h1>{_e(card.get('name', 'dataset'))}</h1>\n{meta}\n{tables}</header>"


def _modality_table(kept: pa.Table, rejects: pa.Table) -> str:
    counts = Counter((str(m), "kept") for m in kept.column("modality").to_pylist())
    dropped = zip(rejects.column("modality").to_pylist(), rejects.column("status").to_pylist())
    counts.update((str(m), status) for m, status in dropped)
    modalities = sorted({m for m, _ in counts}, key=_modality_key)
    columns = ("kept", "filtered", "rejected")
    head = "<tr><th>modality</th>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
    rows = "".join(f"<tr><td>{_e(m)}</td>" + "".join(f"<td class=\"n\">{counts[(m, c)]}</td>" for c in columns)
                   + "</tr>" for m in modalities)
    return f"<table class=\"modalities\">{head}{rows}</table>"


def _encoder_table(encoders: dict) -> str:
    if not encoders:
        return "<p class=\"meta\">The card records no encoders.</p>"
    rows = "".join(f"<tr><td>{_e(family)}</td><td>{_e(desc.get('kind'))}</td><td>{_e(desc.get('model', ''))}</td></tr>"
                   for family, desc in sorted(encoders.items()) if isinstance(desc, dict))
    return f"<table class=\"encoders\"><tr><th>encoder</th><th>kind</th><th>model</th></tr>{rows}</table>"


# ---------------------------------------------------------------- reasons


def _reasons_chart(rejects: pa.Table) -> str:
    """One horizontal bar per (status, reason), longest first, coloured by status."""
    counts = Counter(zip(rejects.column("status").to_pylist(), rejects.column("reason").to_pylist()))
    if not counts:
        return "<p>No input was rejected or filtered.</p>"
    rows = sorted(counts.items(), key=lambda item: (-item[1], str(item[0][1])))
    label_w, bar_w, row_h, peak = 240, 360, 22, max(counts.values())
    bars = [_reason_bar(i * row_h, status, reason, n, round(bar_w * n / peak), label_w, row_h)
            for i, ((status, reason), n) in enumerate(rows)]
    svg = (f"<svg class=\"reasons\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{label_w + bar_w + 50}\" "
           f"height=\"{len(rows) * row_h}\" role=\"img\" aria-label=\"rejection and filter reasons\">"
           + "".join(bars) + "</svg>")
    legend = "".join(f"<span style=\"background:{color}\"></span>{status}" for status, color in STATUS_COLORS.items())
    return f"<div class=\"legend\">{legend}</div>\n{svg}"


def _reason_bar(y: int, status: str, reason: str, count: int, width: int, label_w: int, row_h: int) -> str:
    color = STATUS_COLORS.get(status, "#777")
    return (f"<g class=\"bar\" data-status=\"{_e(status)}\" data-reason=\"{_e(reason)}\" data-count=\"{count}\">"
            f"<text x=\"{label_w - 6}\" y=\"{y + 15}\" text-anchor=\"end\">{_e(reason)}</text>"
            f"<rect x=\"{label_w}\" y=\"{y + 3}\" width=\"{max(width, 1)}\" height=\"{row_h - 6}\" fill=\"{color}\">"
            f"<title>{_e(status)}: {_e(reason)} ({count})</title></rect>"
            f"<text x=\"{label_w + max(width, 1) + 4}\" y=\"{y + 15}\">{count}</text></g>")


# ---------------------------------------------------------------- score histograms


def _score_columns(kept: pa.Table) -> list[str]:
    """`score_*` columns with at least two distinct non-null values: a constant one says nothing."""
    names = []
    for name in kept.column_names:
        values = kept.column(name).drop_null() if name.startswith("score_") else None
        if values is not None and len(values) and pc.count_distinct(values).as_py() > 1:
            names.append(name)
    return names


def _score_values(kept: pa.Table, column: str, modality: str) -> np.ndarray:
    rows = kept.filter(pc.field("modality") == modality).column(column).drop_null()
    values = rows.to_numpy().astype(np.float64)
    return values[np.isfinite(values)]


def _histograms(kept: pa.Table) -> str:
    """A histogram per (score column, modality); all-zero means the stage did not score that modality."""
    modalities = sorted({str(m) for m in kept.column("modality").to_pylist()}, key=_modality_key)
    charts = []
    for column in _score_columns(kept):
        for modality in modalities:
            values = _score_values(kept, column, modality)
            if values.size and np.any(values != 0):
                charts.append(_histogram_svg(column, modality, values))
    if not charts:
        return "<p>No score column varies across the kept samples.</p>"
    return "<div class=\"grid\">" + "\n".join(charts) + "</div>"


def _histogram_svg(column: str, modality: str, values: np.ndarray) -> str:
    lo, hi = float(values.min()), float(values.max())
    counts, _ = np.histogram(values, bins=HIST_BINS, range=(lo - 0.5, hi + 0.5) if lo == hi else (lo, hi))
    width, height, left, bottom, top = 260, 130, 30, 18, 8
    plot_w, plot_h, peak = width - left - 6, height - bottom - top, int(counts.max())
    step = plot_w / HIST_BINS
    bars = "".join(
        f"<rect x=\"{left + i * step:.1f}\" y=\"{top + plot_h * (1 - c / peak):.1f}\" width=\"{step - 1:.1f}\" "
        f"height=\"{plot_h * c / peak:.1f}\" fill=\"#3b73b9\"><title>{c}</title></rect>"
        for i, c in enumerate(counts.tolist()) if c)
    base = top + plot_h
    axes = (f"<line x1=\"{left}\" y1=\"{base}\" x2=\"{left + plot_w}\" y2=\"{base}\" stroke=\"#666\"/>"
            f"<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{base}\" stroke=\"#666\"/>"
            f"<text x=\"{left}\" y=\"{height - 4}\">{_num(lo)}</text>"
            f"<text x=\"{left + plot_w}\" y=\"{height - 4}\" text-anchor=\"end\">{_num(hi)}</text>"
            f"<text x=\"{left - 4}\" y=\"{top + 9}\" text-anchor=\"end\">{peak}</text>"
            f"<text x=\"{left - 4}\" y=\"{base}\" text-anchor=\"end\">0</text>")
    label = f"{column} · {modality} (n={values.size}, min {_num(lo)}, max {_num(hi)})"
    return (f"<figure class=\"hist\"><svg class=\"histogram\" xmlns=\"http://www.w3.org/2000/svg\" "
            f"width=\"{width}\" height=\"{height}\" data-column=\"{_e(column)}\" data-modality=\"{_e(modality)}\" "
            f"role=\"img\" aria-label=\"{_e(label)}\">{bars}{axes}</svg><figcaption>{_e(label)}</figcaption></figure>")


# ---------------------------------------------------------------- thumbnails


def _pick(table: pa.Table, limit: int) -> list[dict]:
    """Up to `limit` rows taken round-robin across modalities, so a dominant modality cannot hide the others.
    Only the rows shown become Python objects: the first `limit` of each modality (a whole manifest as dicts
    took 5.5 s and 2 GB at a million rows)."""
    limit = max(limit, 0)
    if "modality" in table.column_names:
        names = pc.fill_null(table["modality"].cast(pa.string()), "unknown")
        names = pc.if_else(pc.equal(names, ""), "unknown", names)
    else:
        names = pa.array(["unknown"] * table.num_rows, pa.string())
    groups = {m: table.filter(pc.equal(names, m)).slice(0, limit).to_pylist() for m in pc.unique(names).to_pylist()}
    queues = [groups[m] for m in sorted(groups, key=_modality_key)]
    interleaved = (row for batch in itertools.zip_longest(*queues) for row in batch if row is not None)
    return list(itertools.islice(interleaved, limit))


def _thumb_grid(rows: list[dict], *, kept: bool) -> str:
    if not rows:
        return "<p>None.</p>"
    return "<div class=\"grid\">" + "\n".join(_thumb_tile(row, kept=kept) for row in rows) + "</div>"


def _thumb_tile(row: dict, *, kept: bool) -> str:
    """A thumbnail with its caption or path and reason; an undecodable file gets a grey tile saying why."""
    relpath = row.get("relpath") or Path(str(row.get("uri") or "")).name
    reason = "kept" if kept else f"{row.get('status')}: {row.get('reason')}"
    try:
        visual, css = f"<img src=\"data:image/png;base64,{_thumbnail_png(row)}\" alt=\"{_e(relpath)}\">", "thumb"
    except _DECODE_ERRORS as exc:
        why = getattr(exc, "reason", type(exc).__name__)
        shown = "" if kept else f"<br>{_e(row.get('reason'))}"
        visual, css = f"<div class=\"placeholder\">cannot decode:<br>{_e(why)}{shown}</div>", "thumb placeholder"
    lines = [f"<b>{_e(row['caption'])}</b>"] if kept and row.get("caption") else []
    lines += [f"<code>{_e(relpath)}</code>", _e(reason)]
    if not kept and row.get("message"):
        lines.append(_e(str(row["message"])[:200]))
    return (f"<figure class=\"{css}\" data-modality=\"{_e(row.get('modality'))}\" data-relpath=\"{_e(relpath)}\">"
            f"{visual}<figcaption>{'<br>'.join(lines)}</figcaption></figure>")


def _thumbnail_png(row: dict) -> str:
    """The base64 PNG of a row's preview, or a `_DECODE_ERRORS` exception saying why there is none."""
    uri, modality = row.get("uri"), row.get("modality")
    if not uri:
        raise media.MediaError("not_found", "the row has no uri")
    if storage.is_remote(str(uri)):  # decoders read local files
        with storage.local_copy(str(uri)) as local:
            return _thumbnail_png({**row, "uri": str(local)})
    if modality == "image":
        pixels = _image_thumb(uri)
    elif modality == "video":
        frames, _ = video.decode_video(uri, VIDEO_FRAMES, VIDEO_THUMB, timeout_s=DECODE_TIMEOUT_S)
        pixels = np.concatenate(list(frames), axis=1)  # a left-to-right strip
    elif modality == "audio":
        pixels = _waveform(audio.decode_audio(uri, AUDIO_RATE, int(AUDIO_RATE * AUDIO_SECONDS)))
    else:
        raise media.MediaError("unsupported_modality", f"no preview for modality {modality!r}")
    return _png_base64(pixels)


def _image_thumb(uri: str) -> np.ndarray:
    """Probe first: it names the failure (empty_file, too_large, ...) and refuses decompression bombs."""
    media.probe(uri, max_pixels=MAX_THUMB_PIXELS, timeout_s=DECODE_TIMEOUT_S)
    return media.decode_image(uri, IMAGE_THUMB)


def _waveform(signal: np.ndarray) -> np.ndarray:
    """A grey min/max envelope on white; not normalised, so a quiet clip looks quiet."""
    width, height = WAVE_SIZE
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    mid = (height - 1) / 2
    draw.line([(0, mid), (width - 1, mid)], fill=200)
    for x, chunk in enumerate(np.array_split(np.clip(signal, -1.0, 1.0), width)):
        if chunk.size:
            draw.line([(x, mid - float(chunk.max()) * mid), (x, mid - float(chunk.min()) * mid)], fill=40)
    return np.asarray(image)


def _png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
