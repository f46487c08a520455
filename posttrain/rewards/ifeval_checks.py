"""The instruction checks of IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language
Models", arXiv 2311.07911): one function per check family, ``text -> bool``, written from the semantics of
open-instruct's ``if_functions.py`` (the verifier TÜLU 3's RLVR data was built for) and lm-eval's
``tasks/ifeval/instructions.py`` (Google's checker). Where the two differ, a keyword option picks the variant and
``ifeval.py`` sets it per format; the docstrings say where either departs.

Shared departures from both: words are ``\\w+`` runs (open-instruct splits on whitespace); sentences are split
by a regex at ``. ! ?`` before whitespace, skipping common abbreviations (lm-eval uses nltk's punkt, which needs a
download; open-instruct a similar regex); a check whose language cannot be detected fails (lm-eval passes it).
"""
from __future__ import annotations

import json
import logging
import re

try:  # the language checks need it; without it they score None, counted as unavailable (see ifeval.py)
    import langdetect
except ImportError:  # pragma: no cover - a dependency of posttrain; kept optional for trimmed installs
    langdetect = None

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")
# A sentence ends at . ! or ? (runs of them, closing quotes/brackets allowed) followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "vs.", "etc.", "e.g.", "i.e.", "inc.",
                  "ltd.", "co.", "no.", "fig.", "approx."}
RELATIONS = ("exactly", "at least", "at most", "less than", "around")


class Unavailable(RuntimeError):
    """A check needs an optional library that is not installed (langdetect)."""


def compare(actual: int, n: int, relation: str | None, around: int | None = None) -> bool:
    """``actual`` against ``n``: exactly (None), at least, at most, less than (lm-eval's other relation), or
    around: within ``around`` (default max(1, round(n/10)), open-instruct's tolerance for words)."""
    relation = (relation or "exactly").strip().lower()
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
    if relation == "around":
        return abs(actual - n) <= (around if around is not None else max(1, round(n * 0.1)))
    return {"exactly": actual == n, "at least": actual >= n, "at most": actual <= n, "less than": actual < n}[relation]


def count_sentences(text: str) -> int:
    pieces = [p for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    merged = 0
    for i, piece in enumerate(pieces):  # "Dr. Who" is one sentence: an abbreviation ends no sentence
        last = piece.split()[-1].lower() if piece.split() else ""
        merged += not (i < len(pieces) - 1 and last in _ABBREVIATIONS)
    return merged


def keywords_present(text: str, keywords: list[str]) -> bool:
    """Every keyword occurs, case-insensitively, as a substring (both sources)."""
    low = text.lower()
    return all(str(k).lower() in low for k in keywords)


def keyword_count(text: str, word: str, n: int, relation: str | None = None, whole_word: bool = True) -> bool:
    """``word`` occurs ``relation`` ``n`` times, case-insensitively: as a whole word (open-instruct, exactly n)
    or as a substring (lm-eval, less than / at least)."""
    if whole_word:
        found = sum(w == word.lower() for w in _WORD.findall(text.lower()))
    else:
        found = len(re.findall(re.escape(word), text, flags=re.IGNORECASE))
    return compare(found, int(n), relation)


def no_forbidden_words(text: str, words: list[str], whole_word: bool = False) -> bool:
    """None of ``words`` occurs, case-insensitively: as a substring (open-instruct) or a whole word (lm-eval)."""
    for w in words:
        pattern = rf"\b{re.escape(str(w))}\b" if whole_word else re.escape(str(w))
        if re.search(pattern, text, flags=re.IGNORECASE):
            return False
    return True


def letter_count(text: str, letter: str, n: int, relation: str | None = None, ignore_case: bool = False) -> bool:
    """The letter occurs ``relation`` ``n`` times: case-sensitively, exactly (open-instruct), or ignoring case
    with less than / at least (lm-eval)."""
    if not isinstance(letter, str) or len(letter) != 1:
        raise ValueError(f"letter must be one character, got {letter!r}")
    if ignore_case:
        text, letter = text.lower(), letter.lower()
    return compare(text.count(letter), int(n), relation)


def in_language(text: str, language: str) -> bool:
    """langdetect's code for the text equals ``language`` (an ISO 639-1 code, as both sources use). A text it
    cannot classify (no letters) fails; lm-eval counts it as followed, open-instruct crashes on it."""
    if langdetect is None:
        raise Unavailable("langdetect is not installed")
    langdetect.DetectorFactory.seed = 0  # langdetect samples: without a seed one text can flip between languages
    try:
        return langdetect.detect(text) == language
    except langdetect.LangDetectException:
        return False


def paragraph_count(text: str, n: int, divider: str = "* * *") -> bool:
    """Exactly ``n`` paragraphs between markdown dividers: open-instruct's prompts say ``* * *``, IFEval's
    ``***``. An empty paragraph between dividers fails; an empty one before the first or after the last is not
    counted (lm-eval; open-instruct fails those too)."""
    parts = re.split(r"\s*" + re.escape(divider) + r"\s*", text.strip())
    if any(not p.strip() for p in parts[1:-1]):
        return False
    return sum(bool(p.strip()) for p in parts) == int(n)


def word_count(text: str, n: int, relation: str | None) -> bool:
    return compare(len(_WORD.findall(text)), int(n), relation)


def sentence_count(text: str, n: int, relation: str | None) -> bool:
    """``around`` is within one sentence (open-instruct)."""
    return compare(count_sentences(text), int(n), relation, around=1)


def nth_paragraph_first_word(text: str, n: int, nth: int, first_word: str) -> bool:
    """``n`` non-empty paragraphs separated by blank lines, the ``nth`` (from 1) starting with the word
    ``first_word``, compared without case, quotes or trailing punctuation (lm-eval; open-instruct compares a
    case-sensitive prefix, so "The" would pass for "Theory", and counts empty paragraphs)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    nth = int(nth)
    if len(paragraphs) != int(n) or not 1 <= nth <= len(paragraphs):
        return False
    word = paragraphs[nth - 1].split()[0].strip("'\"“”‘’*").rstrip(".,;:!?")
    return word.lower() == str(first_word).strip().lower()


def has_postscript(text: str, marker: str) -> bool:
    """The marker (case-insensitive; a space after each dot allowed, as lm-eval allows in P.P.S) occurs and some
    text follows it (open-instruct's condition)."""
    pattern = r"\s?".join(re.escape(part) for part in re.split(r"(?<=\.)\s*", marker.strip()) if part)
    return re.search(pattern + r"\s*\S", text, flags=re.IGNORECASE) is not None


def placeholders(text: str, n: int) -> bool:
    """At least ``n`` ``[...]`` placeholders (both sources)."""
    return len(re.findall(r"\[[^\]\n]*\]", text)) >= int(n)


def bullet_count(text: str, n: int) -> bool:
    """Exactly ``n`` lines starting with ``* `` or ``-`` (lm-eval; open-instruct counts ``**bold**`` lines too)."""
    return len(re.findall(r"^\s*(?:\*(?!\*)|-).*$", text, flags=re.MULTILINE)) == int(n)


def has_title(text: str) -> bool:
    """A non-blank ``<<title>>`` on one line (lm-eval; open-instruct accepts an empty ``<<>>``)."""
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", text))


def one_of(text: str, options: list[str]) -> bool:
    """One of the options occurs in the text (both sources; a substring match)."""
    return any(str(o) in text for o in options)


def highlighted(text: str, n: int) -> bool:
    """At least ``n`` non-blank ``*highlighted*`` or ``**highlighted**`` spans on one line each (lm-eval;
    open-instruct counts every ``*...*`` match, empty ones included)."""
    spans = re.findall(r"\*\*([^\n*]+)\*\*|\*([^\n*]+)\*", text)
    return sum(bool((a or b).strip()) for a, b in spans) >= int(n)


def sections(text: str, n: int, splitter: str) -> bool:
    """At least ``n`` section headers ``<splitter> <number>``, case-insensitive (both sources)."""
    return len(re.findall(re.escape(splitter.strip()) + r"\s?\d+", text, flags=re.IGNORECASE)) >= int(n)


def is_json(text: str, fences: bool = False) -> bool:
    """The whole text parses as JSON; with ``fences`` (lm-eval) a surrounding markdown code fence is removed."""
    if fences:
        text = re.sub(r"^\s*```(?:json)?", "", text, flags=re.IGNORECASE)
        text = re.sub(r"```\s*$", "", text)
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def repeats_prompt(text: str, prompt: str, ignore_case: bool = False) -> bool:
    """The text starts with the prompt, leading whitespace aside: exactly (open-instruct) or ignoring case
    (lm-eval)."""
    text, prompt = text.lstrip(), prompt.strip()
    return text.lower().startswith(prompt.lower()) if ignore_case else text.startswith(prompt)


def two_responses(text: str) -> bool:
    """Two different non-empty responses separated by ``******`` (empty text before or after allowed, as lm-eval)."""
    parts = text.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    kept = [p.strip() for p in parts if p.strip()]
    return len(kept) == 2 and kept[0] != kept[1]


def all_case(text: str, upper: bool, english: bool = False) -> bool:
    """Every cased letter upper (lower) case and at least one (``str.isupper``; open-instruct's ``text ==
    text.upper()`` also passes an empty text); with ``english`` (lm-eval) langdetect must say English too."""
    if not (text.isupper() if upper else text.islower()):
        return False
    return in_language(text, "en") if english else True


def capital_words(text: str, n: int, relation: str | None) -> bool:
    """Words in capitals (``\\w+`` runs that are ``isupper``) ``relation`` ``n`` times."""
    return compare(sum(w.isupper() for w in _WORD.findall(text)), int(n), relation)


def ends_with(text: str, phrase: str, loose: bool = False) -> bool:
    """The text, trailing whitespace aside, ends with the phrase: exactly (open-instruct) or ignoring case and
    a closing quote (lm-eval)."""
    text, phrase = text.rstrip(), phrase.strip()
    if loose:
        return text.strip('"').lower().endswith(phrase.lower())
    return text.endswith(phrase)


def quoted(text: str) -> bool:
    """Wrapped in double quotes, surrounding whitespace aside (lm-eval; open-instruct passes a lone ``"``)."""
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def no_commas(text: str) -> bool:
    return "," not in text
