"""Grounding: the answer cites sources that are among the row's retrieved passages.

Each row carries its passages in a column (default `passages`): a list of ids or URLs, or of
objects with an id and/or a URL (`{"id": "doc-3", "url": "https://...", "text": ...}`). Citations
in the completion are bracketed ids (`[doc-3]`, `[3]`; several separated by commas or semicolons
inside one pair of brackets) and bare URLs.

Score: `grounded_score` (default 1) when the completion cites at least one of the passages,
`ungrounded_score` (default 0) when it cites none of them, and `penalty` (default 1) subtracted
when it cites any source that is not among the passages, so a fabricated citation scores below no
citation. Bracketed text that is not a citation ("[sic]", "[1, 2]" in maths) would count as an
unknown source: set `id_pattern` (a regex, e.g. `doc-\\d+`) to say what a cited id looks like.
Components: `valid`, `invalid` citation counts.

Recipe::

    rewards:
      - fn: rewards.grounding:cited_sources
        kwargs: {passages_column: retrieved, penalty: 1.0}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from rewards.base import RewardValues, column, completion_text

_URL = re.compile(r"https?://[^\s<>\"'\])]+", re.IGNORECASE)
_BRACKETS = re.compile(r"\[([^\[\]\n]{1,200})\]")
# Markdown links "[text](url)" put prose in brackets: those brackets are not citations (the URL is).
_MARKDOWN_LINK = re.compile(r"\[([^\[\]\n]{1,200})\]\((https?://[^)\s]+)\)", re.IGNORECASE)


def normalize_url(url: str) -> str:
    """Scheme and host lower-cased, `www.` and trailing slashes and punctuation dropped, fragment removed."""
    url = url.rstrip(".,;:!?")
    parts = urlsplit(url)
    host = parts.netloc.lower().removeprefix("www.")
    path = parts.path.rstrip("/")
    query = f"?{parts.query}" if parts.query else ""
    return f"{host}{path}{query}"


def _source_keys(passage: Any, id_key: str, url_key: str) -> set[str]:
    if isinstance(passage, Mapping):
        keys = set()
        if passage.get(id_key) is not None:
            keys.add(str(passage[id_key]).strip().lower())
        if passage.get(url_key):
            keys.add(normalize_url(str(passage[url_key])))
        return keys
    text = str(passage).strip()
    return {normalize_url(text)} if _URL.fullmatch(text) else {text.lower()}


def citations(text: str, id_pattern: re.Pattern[str] | None = None) -> list[str]:
    """Citation keys in a text: normalised URLs, then bracketed ids (lower case) that match
    `id_pattern` when one is given."""
    without_links = _MARKDOWN_LINK.sub(lambda m: f" {m.group(2)} ", text)
    found = [normalize_url(url) for url in _URL.findall(without_links)]
    for bracket in _BRACKETS.findall(_URL.sub(" ", without_links)):
        for item in re.split(r"[;,]", bracket):
            item = item.strip().lower()
            if item and (id_pattern is None or id_pattern.fullmatch(item)):
                found.append(item)
    return found


def cited_sources(
    completions: list[Any],
    *,
    passages_column: str = "passages",
    id_key: str = "id",
    url_key: str = "url",
    grounded_score: float = 1.0,
    ungrounded_score: float = 0.0,
    penalty: float = 1.0,
    id_pattern: str | None = None,
    **columns: Any,
) -> RewardValues:
    """See the module docstring. Rows whose passages are None get None (not applicable)."""
    all_passages = column(columns, passages_column, len(completions), "cited_sources")
    compiled_id = re.compile(id_pattern, re.IGNORECASE) if id_pattern else None
    scores: list[float | None] = []
    valid_counts: list[float | None] = []
    invalid_counts: list[float | None] = []
    for completion, passages in zip(completions, all_passages, strict=True):
        if passages is None:
            scores.append(None)
            valid_counts.append(None)
            invalid_counts.append(None)
            continue
        if not isinstance(passages, list):
            raise ValueError(
                f"cited_sources: column {passages_column!r} holds {type(passages).__name__}, expected a list"
            )
        known: set[str] = set()
        for passage in passages:
            known |= _source_keys(passage, id_key, url_key)
        cited = citations(completion_text(completion), compiled_id)
        valid = sum(1 for key in cited if key in known)
        invalid = len(cited) - valid
        score = grounded_score if valid else ungrounded_score
        if invalid:
            score -= penalty
        scores.append(score)
        valid_counts.append(float(valid))
        invalid_counts.append(float(invalid))
    return RewardValues(scores, components={"valid": valid_counts, "invalid": invalid_counts})
