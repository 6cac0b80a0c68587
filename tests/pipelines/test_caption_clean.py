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


@pytest.mark.parametrize("caption", [
    "A woman stands in the rain. The rain falls on her umbrella.",
    "A cat sleeps on the sofa. The sofa is red.",
])
def test_a_phrase_repeated_across_a_sentence_end_is_kept(caption: str) -> None:
    assert collapse_repeats(caption, 6) == caption
    assert clean_caption(caption) == caption


@pytest.mark.parametrize("caption", [
    "Mr. Smith walks his dog in the park",
    "St. Louis skyline at night",
    "Mt. Fuji at sunrise",
    "U.S. flag waving in the wind",
    "J. R. Tolkien reads a book",
    "Wait... a dog runs into the road",
    "Apples, pears, etc. lie on a table",
])
def test_abbreviations_initials_and_ellipses_do_not_end_a_sentence(caption: str) -> None:
    assert drop_dangling(caption) == caption
    assert clean_caption(caption) == caption


def test_a_sentence_after_an_abbreviation_is_judged_whole() -> None:
    assert drop_dangling("A dog runs on the beach. Dr. Jones watches from the") == "A dog runs on the beach."
    assert clean_caption("Mr. Smith waves. Mr. Jones waves.") == "Mr. Smith waves. Mr. Jones waves."


def test_a_long_last_sentence_is_not_dropped_for_a_short_first_one() -> None:
    caption = "Night. A man in a red coat walks along the river"
    assert drop_dangling(caption) == caption
    assert drop_dangling("A dog runs. The dog jumps over") == "A dog runs."  # what is left is not much shorter


def test_a_lone_separator_does_not_stop_the_cut_off_ending_from_going() -> None:
    assert drop_dangling("a man walking on the : on") == "a man walking"
    assert clean_caption("a red house - the") == "a red house"
