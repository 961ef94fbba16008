"""Text rewards: exact or normalised match, numeric tolerance, regex format, length bands.

Recipe::

    rewards:
      - fn: rewards.text:exact_match
        kwargs: {normalize: true, extract_pattern: "ANSWER:\\\\s*(.+)"}
      - fn: rewards.text:numeric_match
        kwargs: {rel_tol: 0.01}
      - fn: rewards.text:regex_format
        kwargs: {pattern: "^<think>.*</think>\\\\s*<answer>.*</answer>$", flags: "s"}
      - fn: rewards.text:length_band
        kwargs: {unit: words, min: 20, max: 120, falloff: 40}
"""

from __future__ import annotations

import builtins
import math
import re
import string
from typing import Any

from rewards.base import column, completion_text, reference_value

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Thousands separators and currency or percent signs are formatting, not value.
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?%?|-?\.\d+")
_FLAG_BITS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def _extract(text: str, pattern: re.Pattern[str] | None) -> str | None:
    if pattern is None:
        return text.strip()
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.groups() else last.group(0)).strip()


def _compile(pattern: str | None, flags: str = "") -> re.Pattern[str] | None:
    if pattern is None:
        return None
    unknown = set(flags) - set(_FLAG_BITS)
    if unknown:
        raise ValueError(f"regex flags {sorted(unknown)} unknown; use any of {sorted(_FLAG_BITS)}")
    bits = 0
    for flag in flags:
        bits |= _FLAG_BITS[flag]
    return re.compile(pattern, bits)


def exact_match(
    completions: list[Any],
    *,
    answer_column: str = "reference_answer",
    answer_key: str | None = None,
    normalize: bool = False,
    extract_pattern: str | None = None,
    **columns: Any,
) -> list[float | None]:
    """1.0 when the answer equals the reference, else 0.0; None for rows without a reference.

    `extract_pattern` (a regex; its first group, or the whole match) picks the answer out of the
    completion's last match; no match scores 0. `normalize` compares SQuAD-normalised strings. A
    reference list accepts any of its items.
    """
    pattern = _compile(extract_pattern)
    references = column(columns, answer_column, len(completions), "exact_match")
    prepare = normalize_answer if normalize else str.strip
    scores: list[float | None] = []
    for completion, reference in zip(completions, references, strict=True):
        if reference is None:
            scores.append(None)
            continue
        answer = _extract(completion_text(completion), pattern)
        gold = reference_value(reference, answer_key)
        accepted = {prepare(str(g)) for g in (gold if isinstance(gold, list) else [gold])}
        scores.append(1.0 if answer is not None and prepare(answer) in accepted else 0.0)
    return scores


exact_match.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]


def parse_number(text: str) -> float | None:
    """The last number in a text, ignoring thousands separators, `$` and `%`; None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    cleaned = found[-1].replace(",", "").replace("$", "").replace("%", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def numeric_match(
    completions: list[Any],
    *,
    answer_column: str = "reference_answer",
    answer_key: str | None = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 0.0,
    extract_pattern: str | None = None,
    **columns: Any,
) -> list[float | None]:
    """1.0 when the completion's last number (or the number in `extract_pattern`'s match) is within
    `rel_tol` / `abs_tol` of the reference (math.isclose), else 0.0; None without a reference."""
    pattern = _compile(extract_pattern)
    references = column(columns, answer_column, len(completions), "numeric_match")
    scores: list[float | None] = []
    for completion, reference in zip(completions, references, strict=True):
        if reference is None:
            scores.append(None)
            continue
        gold = reference_value(reference, answer_key)
        gold_number = float(gold) if isinstance(gold, int | float) else parse_number(str(gold))
        if gold_number is None:
            raise ValueError(f"numeric_match: reference {gold!r} holds no number")
        text = _extract(completion_text(completion), pattern)
        number = parse_number(text) if text is not None else None
        close = number is not None and math.isclose(number, gold_number, rel_tol=rel_tol, abs_tol=abs_tol)
        scores.append(1.0 if close else 0.0)
    return scores


numeric_match.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]


def regex_format(
    completions: list[Any], *, pattern: str, mode: str = "search", flags: str = "", **columns: Any
) -> list[float]:
    """1.0 when the completion matches `pattern` (`mode`: search, match or fullmatch; `flags`: any of
    i, m, s, x), else 0.0."""
    if mode not in ("search", "match", "fullmatch"):
        raise ValueError(f"regex_format: mode {mode!r}; use search, match or fullmatch")
    compiled = _compile(pattern, flags)
    assert compiled is not None
    matcher = getattr(compiled, mode)
    return [1.0 if matcher(completion_text(c).strip()) else 0.0 for c in completions]


regex_format.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]

# Sentence ends: terminal punctuation followed by whitespace or the end. A regex rather than nltk's
# punkt, whose model is a separate download this project cannot rely on; abbreviations ("e.g.")
# over-count slightly, which a length band tolerates.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def count_units(text: str, unit: str) -> int:
    """Words (whitespace-separated) or sentences in a text."""
    if unit == "words":
        return len(text.split())
    if unit == "sentences":
        stripped = text.strip()
        if not stripped:
            return 0
        ends = len(_SENTENCE_END.findall(stripped))
        # A final sentence without terminal punctuation still counts.
        return ends + (0 if _SENTENCE_END.search(stripped[-1:] + " ") else 1)
    raise ValueError(f"length_band: unit {unit!r}; use words or sentences")


def length_band(
    completions: list[Any],
    *,
    unit: str = "words",
    min: int | None = None,
    max: int | None = None,  # `min` / `max` shadow the builtins here to keep recipes readable
    falloff: float = 0.0,
    **columns: Any,
) -> list[float]:
    """1.0 inside [min, max] words or sentences; outside, 1 - distance / falloff (floored at 0), or
    0 when `falloff` is 0."""
    if min is None and max is None:
        raise ValueError("length_band: set min, max or both")
    if min is not None and max is not None and min > max:
        raise ValueError(f"length_band: min {min} > max {max}")
    scores = []
    for completion in completions:
        size = count_units(completion_text(completion), unit)
        distance = 0
        if min is not None and size < min:
            distance = min - size
        elif max is not None and size > max:
            distance = size - max
        if distance == 0:
            scores.append(1.0)
        else:
            scores.append(0.0 if falloff <= 0 else builtins.max(0.0, 1.0 - distance / falloff))
    return scores


length_band.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]
