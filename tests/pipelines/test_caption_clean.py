"""Caption cleaning rules, one behaviour per test (pure functions, no model)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from latentforge.pipelines.caption_clean import (
    CaptionCleanConfig,
    clean_caption,
    collapse_repeats,
    drop_dangling,
    merge_captions,
    strip_openings,
)


@pytest.mark.parametrize("raw, clean", [
    ("The video shows a red circle moving left.", "a red circle moving left."),
    ("This image depicts a dog on a beach", "a dog on a beach"),
    ("a picture of a cat", "a cat"),
    ("A Photo Of a cat", "a cat"),
    ("In this video, a man runs", "a man runs"),
    ("The image shows that a car is parked", "a car is parked"),
    ("the video shows: the image shows a bridge", "a bridge"),  # openings stacked
    ("there are two dogs", "two dogs"),
])
def test_stock_openings_are_stripped(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_an_opening_must_end_at_a_word_boundary() -> None:
    assert clean_caption("there isotopes glow") == "there isotopes glow"
    assert clean_caption("this island is green") == "this island is green"


def test_an_opening_that_is_the_whole_caption_stays() -> None:
    assert strip_openings("a picture of", ["a picture of"]) == "a picture of"


@pytest.mark.parametrize("raw, clean", [
    ("arafed man standing on a street", "man standing on a street"),
    ("a Araffe woman with an umbrella", "a woman with an umbrella"),
    ("there is a arafed dog", "a dog"),
])
def test_blip_artefacts_are_removed(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_whitespace_is_squeezed() -> None:
    assert clean_caption("  a   red\n\tcircle  ") == "a red circle"


@pytest.mark.parametrize("raw, clean", [
    ("a man a man a man walking", "a man walking"),
    ("red red red circle", "red circle"),
    ("a dog on the beach on the beach on the beach", "a dog on the beach"),
    ("a cat, a cat, a cat.", "a cat."),
])
def test_repeated_phrases_collapse(raw: str, clean: str) -> None:
    assert collapse_repeats(raw, 6) == clean


def test_repeats_longer_than_max_ngram_are_kept() -> None:
    phrase = "one two three four"
    assert collapse_repeats(f"{phrase} {phrase}", 3) == f"{phrase} {phrase}"
    assert collapse_repeats(f"{phrase} {phrase}", 4) == phrase


def test_non_adjacent_repeats_are_kept() -> None:
    assert clean_caption("a red circle and a blue circle") == "a red circle and a blue circle"


def test_repeated_sentences_are_dropped() -> None:
    assert clean_caption("A cat sleeps. A dog barks. A cat sleeps.") == "A cat sleeps. A dog barks."


@pytest.mark.parametrize("raw, clean", [
    ("a man walking on the", "a man walking"),
    ("a bowl of fruit and", "a bowl of fruit"),
    ("a red circle,", "a red circle"),
    ("A dog runs. The dog jumps over", "A dog runs."),
    ("a man with", "a man"),
])
def test_cut_off_endings_are_dropped(raw: str, clean: str) -> None:
    assert drop_dangling(raw) == clean


def test_a_finished_caption_keeps_its_end() -> None:
    assert drop_dangling("a cat sitting on a mat.") == "a cat sitting on a mat."
    assert drop_dangling("an old man") == "an old man"


def test_nothing_left_gives_empty_string() -> None:
    assert clean_caption("   ") == ""
    assert clean_caption("arafed") == ""
    assert clean_caption("... ,") == ""


def test_lists_are_configurable() -> None:
    cfg = CaptionCleanConfig(extra_openings=["a rendering of"], artefacts=["blurry"])
    assert clean_caption("a rendering of a blurry house", cfg) == "a house"
    assert clean_caption("arafed house", cfg) == "arafed house"  # replaced list: no default artefacts
    only = CaptionCleanConfig(openings=["behold"])
    assert clean_caption("The video shows a cat", only) == "The video shows a cat"
    assert clean_caption("behold a cat", only) == "a cat"


def test_disabled_cleaning_only_squeezes_whitespace() -> None:
    cfg = CaptionCleanConfig(enabled=False)
    assert clean_caption(" The video shows  arafed man a man ", cfg) == "The video shows arafed man a man"


def test_dangling_rule_can_be_switched_off() -> None:
    assert clean_caption("a man walking on the", CaptionCleanConfig(drop_dangling=False)) == "a man walking on the"


def test_cleaning_is_idempotent() -> None:
    for raw in ("The video shows arafed man a man a man walking on the", "a picture of red red circle,"):
        once = clean_caption(raw)
        assert clean_caption(once) == once


def test_config_forbids_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="opennings"):
        CaptionCleanConfig(opennings=["x"])


def test_merge_keeps_time_order_and_drops_repeats() -> None:
    assert merge_captions(["a red circle.", "a red circle", "a blue square", "a red circle"]) == \
        "a red circle, then a blue square"
    assert merge_captions(["x", "y", "z", "w"], max_parts=2) == "x, then y"
    assert merge_captions(["", ""]) == ""
