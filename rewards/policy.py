"""Policy rewards: blocked terms, and PII from the prompt echoed back in the completion.

Both return `clean_score` for a clean completion and `violation_score` otherwise (defaults 0 and
-1: a penalty). For a rubric's "+1 safe" component, set `clean_score: 1, violation_score: 0`.

Recipe::

    rewards:
      - fn: rewards.policy:blocked_terms
        kwargs: {terms: [guarantee, "legal advice"], violation_score: -1}
      - fn: rewards.policy:PIIEcho
        kwargs: {scope: echo}        # or `any`: penalise PII in the completion wherever it came from

PII is found with Presidio's pattern recognizers (see rewards/pii.py): emails, phone numbers, card
numbers (Luhn-checked), IBANs, IP addresses, US SSN/ITIN/passport numbers, UK NHS numbers, crypto
wallets; `entities: [PERSON, LOCATION, ...]` adds names, places and street addresses (spaCy NER).
A value counts as echoed when its canonical form (digits only for numbers, lower case
otherwise) appears in the completion, so "+1 (415) 555-0132" is caught as "415 555 0132" too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rewards.base import RewardValues, column, completion_text, prompt_text
from rewards.pii import PIIDetector, canonical


def _term_pattern(terms: Sequence[str], whole_word: bool, case_sensitive: bool) -> re.Pattern[str]:
    if not terms:
        raise ValueError("blocked_terms: `terms` is empty")
    alternatives = "|".join(re.escape(term) for term in sorted(terms, key=len, reverse=True))
    body = rf"(?<!\w)(?:{alternatives})(?!\w)" if whole_word else f"(?:{alternatives})"
    return re.compile(body, 0 if case_sensitive else re.IGNORECASE)


def blocked_terms(
    completions: list[Any],
    *,
    terms: Sequence[str],
    whole_word: bool = True,
    case_sensitive: bool = False,
    violation_score: float = -1.0,
    clean_score: float = 0.0,
    **columns: Any,
) -> RewardValues:
    """`violation_score` when the completion uses any blocked term, else `clean_score`.
    Component `hits`: how many blocked terms each completion used."""
    pattern = _term_pattern(terms, whole_word, case_sensitive)
    hits = [float(len(pattern.findall(completion_text(c)))) for c in completions]
    scores = [violation_score if count else clean_score for count in hits]
    return RewardValues(scores, components={"hits": hits})


class PIIEcho:
    """`violation_score` when the completion repeats PII found in the prompt (`scope: echo`) or holds
    any PII (`scope: any`), else `clean_score`. Component `leaked`: PII values per completion."""

    def __init__(
        self,
        scope: str = "echo",
        entities: Sequence[str] | None = None,
        min_score: float = 0.3,
        violation_score: float = -1.0,
        clean_score: float = 0.0,
        prompt_column: str | None = None,
    ):
        if scope not in ("echo", "any"):
            raise ValueError(f"PIIEcho: scope {scope!r}; use echo or any")
        self.__name__ = "pii_echo"
        self.scope = scope
        self.violation_score = violation_score
        self.clean_score = clean_score
        self.prompt_column = prompt_column
        self.detector = PIIDetector(entities=entities, min_score=min_score)
        self.reward_range = (min(violation_score, clean_score), max(violation_score, clean_score))

    def __call__(
        self, completions: list[Any], prompts: list[Any] | None = None, **columns: Any
    ) -> RewardValues:
        if self.prompt_column is not None:
            prompts = column(columns, self.prompt_column, len(completions), "pii_echo")
        if prompts is None and self.scope == "echo":
            raise ValueError("pii_echo (scope echo) needs the prompts")
        leaked: list[float | None] = []
        for index, completion in enumerate(completions):
            answer = completion_text(completion)
            if self.scope == "any":
                leaked.append(float(len(self.detector.find(answer))))
                continue
            assert prompts is not None
            secrets = {canonical(span) for span in self.detector.find(prompt_text(prompts[index]))}
            answer_forms = _canonical_forms(answer)
            leaked.append(float(sum(1 for secret in secrets if secret and secret in answer_forms)))
        scores = [self.violation_score if count else self.clean_score for count in leaked]
        return RewardValues(scores, components={"leaked": leaked})


# A run of digits with the separators people put in numbers: "+1 (415) 555-0132", "4111 1111 1111 1111".
_DIGIT_RUN = re.compile(r"\+?\d[\d\s().\-/]*\d")


def _canonical_forms(text: str) -> str:
    """The text lower-cased without spaces, then the digits of each number-like run, one a line:
    a digits-only secret matches however the completion spaced or punctuated it, and digits of
    unrelated numbers are never joined into a false match."""
    runs = ("".join(ch for ch in run if ch.isdigit()) for run in _DIGIT_RUN.findall(text))
    return "\n".join(["".join(text.lower().split()), *runs])
