"""Bucket choice and the dataset compatibility check."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from latentforge.datasets.buckets import Bucket, choose_bucket
from latentforge.datasets.compat import IncompatibleDatasets, check_compatible, merged_latent_stats

TABLE = [Bucket(height=32, width=32, frames=8), Bucket(height=32, width=48, frames=8),
         Bucket(height=48, width=32, frames=4), Bucket(height=32, width=32, frames=2)]


@pytest.mark.parametrize("w,h,expected", [(640, 640, (32, 32)), (1920, 1080, (32, 48)), (300, 500, (48, 32))])
def test_images_take_the_nearest_aspect_ratio(w, h, expected):
    b = choose_bucket(TABLE, w, h, 1, "image")
    assert (b.height, b.width) == expected and b.name("image").startswith("1x")


def test_clips_prefer_buckets_they_have_frames_for():
    assert choose_bucket(TABLE, 100, 100, 20, "video").frames == 8
    assert choose_bucket(TABLE, 100, 100, 5, "video").frames == 2  # 8 would repeat frames
    assert choose_bucket(TABLE, 100, 100, 1, "video").frames == 2  # nothing fits: the shortest bucket


SQUARES = [Bucket(height=256, width=256, frames=8), Bucket(height=512, width=512, frames=8),
           Bucket(height=1024, width=1024, frames=8), Bucket(height=768, width=768, frames=4)]


@pytest.mark.parametrize("w,h,side", [(64, 64, 256), (300, 300, 256), (512, 512, 512), (600, 600, 512),
                                      (4000, 4000, 1024), (1000, 600, 512)])
def test_equal_aspects_take_the_largest_bucket_the_source_covers(w, h, side):
    """The largest of equal-aspect buckets upscaled a 64x64 image 16x into 1024x1024; the smallest upscales
    least when none fits, and a centre-cropped 1000x600 source covers 512x512, not 768x768."""
    b = choose_bucket(SQUARES, w, h, 1, "image")
    assert (b.height, b.width) == (side, side)


def test_clips_still_prefer_frames_then_the_covered_size():
    b = choose_bucket(SQUARES, 800, 800, 20, "video")  # 768x768 is covered too, but has fewer frames
    assert (b.height, b.frames) == (512, 8)
    b = choose_bucket(SQUARES, 800, 800, 5, "video")  # only the 4-frame bucket fits 5 frames
    assert (b.height, b.frames) == (768, 4)
    b = choose_bucket(SQUARES, 64, 64, 1, "video")  # no bucket fits 1 frame: the shortest, whatever its size
    assert (b.height, b.frames) == (768, 4)


def test_empty_table_is_refused():
    with pytest.raises(ValueError):
        choose_bucket([], 10, 10, 1, "image")


def card(kind="haar", text="minilm", mean=0.0, std=1.0, count=100):
    return {"name": kind, "encoders": {
        "visual": {"kind": kind, "model": None, "revision": None, "config_hash": f"h-{kind}", "channels": 12,
                   "scale": 1.0, "shift": 0.0},
        "text": {"kind": text, "model": text, "revision": None, "config_hash": f"t-{text}", "dim": 384, "max_len": 32}},
        "latent_stats": {"visual": {"mean": [mean] * 2, "std": [std] * 2, "count": count}}}


def test_same_encoders_are_compatible():
    check_compatible([card(), card()])


def test_different_visual_encoder_is_refused_naming_fields():
    other = card(kind="autoencoder_kl")
    with pytest.raises(IncompatibleDatasets) as e:
        check_compatible([card(), other], ["a", "b"])
    assert "visual.kind: a has 'haar', b has 'autoencoder_kl'" in str(e.value)
    assert "visual.config_hash" in str(e.value)


def test_different_text_encoder_is_refused():
    with pytest.raises(IncompatibleDatasets, match="text.kind"):
        check_compatible([card(), card(text="t5")])


def test_a_changed_scale_alone_is_refused():
    other = copy.deepcopy(card())
    other["encoders"]["visual"]["scale"] = 0.18215
    with pytest.raises(IncompatibleDatasets, match="visual.scale"):
        check_compatible([card(), other])


def test_merged_stats_equal_the_pooled_statistics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, 3000), rng.normal(-1.0, 0.5, 1000)
    cards = [card(mean=a.mean(), std=a.std(), count=a.size), card(mean=b.mean(), std=b.std(), count=b.size)]
    merged = merged_latent_stats(cards)["visual"]
    both = np.concatenate([a, b])
    assert merged["count"] == 4000
    np.testing.assert_allclose(merged["mean"], [both.mean()] * 2, rtol=1e-9)
    np.testing.assert_allclose(merged["std"], [both.std()] * 2, rtol=1e-9)
