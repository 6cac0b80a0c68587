"""Exact and near-duplicate hashes per row inside Ray (`ContentHash`); the grouping runs once on the driver.

Duplicates waste compute and over-weight whatever was copied most. Grouping needs every row's hash at once,
so it cannot run inside a Ray batch: `ContentHash` writes `content_sha256` and `phash` columns, then the
driver groups all ok rows (pipelines/duplicates.py) and the first map after it marks the losers `filtered`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from latentforge.datasets import media, video
from latentforge.datasets.video import decode_clip
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Reject, Stage

_READ_CHUNK = 1 << 20


class DedupConfig(Strict):
    """Which duplicates to remove and how close a perceptual hash must be to count as a near duplicate."""

    enabled: bool = Field(True, description="hash rows and mark duplicates; when off, hash columns stay empty")
    exact: bool = Field(True, description="remove byte-identical files (clips: same bytes and same time span)")
    near: bool = Field(True, description="remove visually near-identical images / videos by perceptual hash")
    hash_size: int = Field(8, ge=4, le=16, description="pHash side: hash_size**2 bits from a (4*hash_size)^2 image")
    max_distance: int = Field(4, ge=0, description="largest Hamming distance between pHashes of near duplicates")
    readmit_rounds: int = Field(3, ge=0, description=(
        "when a later stage (a score, a caption) filters a representative, curate its best near duplicate in "
        "its place, and again if that one fails, up to this many rounds (0: its duplicates stay filtered)"))

    @model_validator(mode="after")
    def _bands_fit(self) -> DedupConfig:
        if self.max_distance + 1 > self.hash_size**2:  # banding needs max_distance + 1 non-empty bands
            raise ValueError(f"max_distance {self.max_distance} must be < hash_size**2 = {self.hash_size**2}")
        return self


# ---------------------------------------------------------------- hashes


def file_digest(path: str | Path) -> Any:
    """A sha256 object fed the file's bytes (read in chunks), to `copy()` and extend with a clip's span."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest


def file_sha256(path: str | Path, extra: bytes = b"") -> str:
    """sha256 of the file's bytes followed by `extra` (a clip's time span)."""
    digest = file_digest(path)
    digest.update(extra)
    return digest.hexdigest()


def clip_span(row: dict) -> bytes:
    """What a clip's exact hash adds to its file's bytes: its time span."""
    return f"|{float(row['clip_start_s']):.6f}|{float(row['clip_end_s']):.6f}".encode()


# Set by the probe (ProbeMedia): the grey thumbnail `phash` takes of an image or a video's middle frame, uint8
# bytes.
KEY_GREY = "key_grey"


@lru_cache(maxsize=8)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: `C @ x` is the DCT of x, so `C @ X @ C.T` is the 2D DCT of X."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


# Below this standard deviation (grey levels) a thumbnail is flat: black, one colour, or codec noise on them.
_FLAT_STD = 1.0


def phash(pixels: np.ndarray | Image.Image, hash_size: int = 8) -> str:
    """Perceptual hash: low DCT frequencies of a (4*hash_size)^2 grey image above their median, as hex.

    Low frequencies survive re-encoding and resizing, so near copies differ in few bits. It sees structure
    only, in grey, so a flat picture (black, any one colour) gets none: "" (only exact dedup applies to it).
    """
    return phash_of_grey(grey_thumbnail(pixels, hash_size), hash_size)


def grey_thumbnail(pixels: np.ndarray | Image.Image, hash_size: int = 8) -> np.ndarray:
    """What `phash` looks at: the image in grey at (4*hash_size)^2, uint8."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels))
    side = 4 * hash_size
    return np.asarray(image.convert("L").resize((side, side), Image.Resampling.LANCZOS), dtype=np.uint8)


def phash_of_grey(grey: np.ndarray, hash_size: int = 8) -> str:
    """`phash` of a `grey_thumbnail`; "" when it is flat.

    A flat thumbnail's bits say nothing: black hashed to all zeros and any one colour to floating-point noise
    (grey 1 and grey 128 alike), so unrelated black or uniform frames (a fade) were near duplicates.
    """
    side = 4 * hash_size
    grey = np.asarray(grey, dtype=np.float64).reshape(side, side)
    if grey.std() < _FLAT_STD:
        return ""
    c = _dct_matrix(side)
    low = (c @ grey @ c.T)[:hash_size, :hash_size]
    bits = (low > np.median(low)).ravel()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return f"{value:0{(len(bits) + 3) // 4}x}"


def _image_for_hash(path: str, side: int) -> Image.Image:
    with Image.open(path) as img:
        return media.upright_rgb(img, (side, side))  # as the probe's key frame (thumb_side), so hashes agree


def visual_phash(row: dict, hash_size: int, timeout_s: float) -> str:
    """pHash of an image, a clip's middle frame or a whole video's middle frame."""
    if row["modality"] == "image":
        try:
            return phash(_image_for_hash(row["uri"], 4 * hash_size), hash_size)
        except Exception as e:  # PIL reports corrupt data as many types; probe normally caught them already
            raise media.MediaError("decode_error", f"PIL could not decode {Path(row['uri']).name}: {e}") from e
    if int(row.get("clip_index", -1)) >= 0:
        frames, _ = decode_clip(row["uri"], float(row["clip_start_s"]), float(row["clip_end_s"]), 1, None, timeout_s)
    else:  # native size from probe, so the crop in decode_video keeps the whole frame
        size = (int(row.get("height") or 0) or 64, int(row.get("width") or 0) or 64)
        frames, _ = video.decode_video(row["uri"], 1, size, timeout_s=timeout_s)
    return phash(frames[0], hash_size)


class ContentHash(Stage):
    """Write `content_sha256` (all ok rows) and `phash` (images and videos; "" for audio and for a flat picture or
    middle frame, e.g. black in a fade). An image's or a whole video's hash comes from the probe's KEY_GREY when
    it left one (pixels decoded on the probe's open); the column ends here.

    A video cut into many clips is read once for all of them, not once per clip: its bytes' sha256 is kept
    (the last few files; a clip's hash extends a copy with its span). A two-hour film cut into a thousand clips
    was otherwise hashed a thousand times over. Its clips' middle frames come from one kept decoder
    (`video.READERS`), not an open each (bench/long_videos.py)."""

    name = "content_hash"
    resources = StageResources(num_cpus=0.5, batch_size=16, pool=1)
    outputs = {"content_sha256": "", "phash": ""}
    _KEEP_DIGESTS = 4  # files whose digest is kept: clips of one video arrive together

    def __call__(self, batch):
        if not self.cfg.dedup.enabled:  # the columns still exist, so the schema does not depend on the config
            n = len(batch["id"])
            out = {**batch, **{k: np.array([v] * n, dtype=object) for k, v in self.outputs.items()}}
        else:
            out = super().__call__(batch)
        out.pop(KEY_GREY, None)
        return out

    def process_row(self, row: dict) -> dict:
        cfg = self.cfg.dedup
        clip = int(row.get("clip_index", -1)) >= 0
        if clip:
            digest = self._file_digest(row)
            digest.update(clip_span(row))
            out = {"content_sha256": digest.hexdigest(), "phash": ""}
        else:
            out = {"content_sha256": file_sha256(row["uri"]), "phash": ""}
        grey = row.get(KEY_GREY) or b""
        if not clip and len(grey) == (4 * cfg.hash_size) ** 2:  # images and whole videos the probe decoded
            out["phash"] = phash_of_grey(np.frombuffer(grey, dtype=np.uint8), cfg.hash_size)
        elif row.get("modality") in ("image", "video"):
            try:
                out["phash"] = visual_phash(row, cfg.hash_size, self.cfg.decode_timeout_s)
            except media.MediaError as e:
                raise Reject(e.reason, str(e)) from e
        return out

    def _file_digest(self, row: dict) -> Any:
        # Created on first use, not in __init__: a stage with its own __init__ counts as holding state (a model)
        # and runs on actors, while this one belongs in the scan's Ray tasks.
        digests: OrderedDict[str, Any] = vars(self).setdefault("_digests", OrderedDict())  # URI -> sha256 object
        uri = str(dict.get(row, "uri"))  # the URI itself, not a staged copy's path
        if uri in digests:
            digests.move_to_end(uri)
        else:
            digests[uri] = file_digest(row["uri"])  # row["uri"] fetches a remote file
            while len(digests) > self._KEEP_DIGESTS:
                digests.popitem(last=False)
        return digests[uri].copy()
