"""Clean generated captions: stock openings, captioner artefacts, repeated phrases and cut-off endings.

Captioners have habits a text encoder should not learn: BLIP prefixes "arafed" and repeats phrases when beam
search loops, video VLMs open with "The video shows", and a caption cut at `max_new_tokens` ends mid-phrase.
Pure functions over strings, so they are unit-tested without any model.
"""
from __future__ import annotations

import re

from pydantic import Field

from latentforge.pipelines.resources import Strict

DEFAULT_OPENINGS = [
    "the video shows", "this video shows", "the video depicts", "this video depicts", "the video features",
    "the video captures", "in this video", "in the video", "the clip shows", "this clip shows",
    "the image shows", "this image shows", "the image depicts", "this image depicts", "this image is",
    "the image features", "in this image", "in the image", "the picture shows", "this picture shows",
    "an image of", "a picture of", "a photo of", "a photograph of", "an illustration of", "a video of",
    "a close up of", "there is", "there are", "the audio features", "the audio contains", "this is",
]
# BLIP's best-known artefact (a mis-learned token from web alt-text); removed wherever it occurs.
DEFAULT_ARTEFACTS = ["arafed", "araffe", "arafe", "araffed", "arafly", "arafy"]
# A caption cut by the token limit tends to end on one of these; a finished phrase does not.
DANGLING_WORDS = {"a", "an", "the", "of", "and", "or", "with", "on", "in", "at", "to", "from", "by", "for", "is",
                  "are", "was", "were", "as", "while", "into", "onto", "over", "under", "its", "their", "his", "her",
                  "that", "which", "who", "but", "near", "behind", "between"}
# A word ending in one of these with a full stop is an abbreviation, not the end of a sentence ("Mr. Smith").
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "ft", "jr", "sr", "prof", "rev", "gen", "col", "lt", "sgt",
                 "capt", "gov", "sen", "rep", "pres", "ave", "rd", "blvd", "co", "corp", "inc", "ltd", "vs", "etc",
                 "approx", "dept", "est", "fig", "vol", "cf", "al", "ca"}
_SEPARATORS = " ,;:-"
_CLOSERS = "\"')]\u201d\u2019"


class CaptionCleanConfig(Strict):
    """How generated captions are cleaned before they are stored (sidecar captions are cleaned only on request)."""

    enabled: bool = Field(True, description="clean generated captions")
    openings: list[str] = Field(default_factory=lambda: list(DEFAULT_OPENINGS),
                                description="stock openings stripped from the start (case-insensitive, repeatedly)")
    extra_openings: list[str] = Field(default_factory=list, description="added to `openings` (keeps the defaults)")
    artefacts: list[str] = Field(default_factory=lambda: list(DEFAULT_ARTEFACTS),
                                 description="words removed wherever they occur")
    max_ngram: int = Field(6, ge=1, description="longest phrase (words) whose immediate repeats are collapsed")
    drop_dangling: bool = Field(True, description="drop a cut-off ending (a trailing 'of the', an unfinished "
                                "last sentence)")
    clean_sidecar: bool = Field(False, description="also clean sidecar (alt-text) captions")


def squeeze_whitespace(text: str) -> str:
    return " ".join(text.split())


def remove_artefacts(text: str, artefacts: list[str]) -> str:
    if not artefacts:
        return text
    pattern = r"\b(?:" + "|".join(re.escape(a) for a in sorted(artefacts, key=len, reverse=True)) + r")\b"
    return squeeze_whitespace(re.sub(pattern, " ", text, flags=re.IGNORECASE))


def strip_openings(text: str, openings: list[str]) -> str:
    """Remove stock openings (and the 'that', ':' or ',' after them) until none is left at the start."""
    ordered = sorted({o.strip().lower() for o in openings if o.strip()}, key=len, reverse=True)
    changed = True
    while changed and text:
        changed = False
        for opening in ordered:
            if re.match(re.escape(opening) + r"\b", text, flags=re.IGNORECASE):
                rest = text[len(opening):].lstrip(_SEPARATORS)
                rest = re.sub(r"^that\b\s*", "", rest, flags=re.IGNORECASE)
                if rest:  # an opening that is the whole caption stays (there is nothing else to keep)
                    text, changed = rest, True
                    break
    return text


def _word_key(word: str) -> str:
    return word.strip(".,;:!?\"'").lower()


def ends_sentence(word: str) -> bool:
    """Whether a sentence ends at `word`: '!' or '?', or a full stop that is not an ellipsis, an initial ('J.',
    'U.S.') or a known abbreviation ('Mr.', 'St.')."""
    word = word.rstrip(_CLOSERS)
    if word.endswith(("!", "?")):
        return True
    if not word.endswith(".") or word.endswith(".."):
        return False
    stem = word[:-1].lstrip("\"'([\u201c\u2018")
    if "." in stem or (len(stem) == 1 and stem.isalpha()):
        return False
    return stem.lower() not in ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    sentences, words = [], []
    for word in text.split():
        words.append(word)
        if ends_sentence(word):
            sentences.append(" ".join(words))
            words = []
    return sentences + ([" ".join(words)] if words else [])


def collapse_repeats(text: str, max_ngram: int) -> str:
    """'a man a man a man walking' -> 'a man walking': immediate repeats of any phrase up to `max_ngram` words.

    Within a sentence only: 'in the rain. The rain falls' repeats 'the rain' across the full stop, and is kept."""
    return " ".join(_collapse_sentence(s, max_ngram) for s in split_sentences(text))


def _collapse_sentence(text: str, max_ngram: int) -> str:
    words = text.split()
    for n in range(min(max_ngram, len(words) // 2), 0, -1):
        i = 0
        while i + 2 * n <= len(words):
            here = [_word_key(w) for w in words[i : i + n]]
            if here == [_word_key(w) for w in words[i + n : i + 2 * n]] and any(here):
                # keep the later copy's last word: it carries the punctuation that closes the phrase
                del words[i : i + n]
            else:
                i += 1
    return " ".join(words)


def dedupe_sentences(text: str) -> str:
    seen, kept = set(), []
    for sentence in split_sentences(text):
        key = " ".join(_word_key(w) for w in sentence.split())
        if key and key not in seen:
            seen.add(key)
            kept.append(sentence)
    return " ".join(kept)


def drop_dangling(text: str) -> str:
    """Drop trailing function words and separators, then an unfinished last sentence after finished ones.

    The last sentence goes only when what is left is at least half its length: 'Night. A man in a red coat
    walks' is more likely one caption with an odd full stop than a short one with a cut-off tail."""
    words = text.split()
    while len(words) > 1:
        words[-1] = words[-1].rstrip(_SEPARATORS)
        if words[-1] and (_word_key(words[-1]) not in DANGLING_WORDS or words[-1][-1] in ".!?"):
            break
        words.pop()
    sentences = split_sentences(" ".join(words).rstrip(_SEPARATORS))
    if len(sentences) > 1 and not sentences[-1].endswith((".", "!", "?")):
        head = " ".join(sentences[:-1])
        if 2 * len(head.split()) >= len(sentences[-1].split()):
            return head
    return " ".join(sentences)


DEFAULT_CLEAN = CaptionCleanConfig()


def clean_caption(text: str, cfg: CaptionCleanConfig = DEFAULT_CLEAN) -> str:
    """The cleaned caption; '' when nothing usable is left."""
    text = squeeze_whitespace(text)
    if not cfg.enabled or not text:
        return text
    text = remove_artefacts(text, cfg.artefacts)
    text = strip_openings(text, [*cfg.openings, *cfg.extra_openings])
    text = dedupe_sentences(collapse_repeats(text, cfg.max_ngram))
    if cfg.drop_dangling:
        text = drop_dangling(text)
    text = squeeze_whitespace(text)
    return "" if not any(c.isalnum() for c in text) else text


def merge_captions(captions: list[str], joiner: str = ", then ", max_parts: int = 3) -> str:
    """Captions of a clip's frames (in time order) -> one: distinct captions joined in order, repeats dropped."""
    seen, parts = set(), []
    for caption in captions:
        key = " ".join(_word_key(w) for w in caption.split())
        if key and key not in seen:
            seen.add(key)
            parts.append(caption.rstrip("."))
    return joiner.join(parts[:max_parts])
