"""Maths answers, checked with `math-verify` (Hugging Face's parser and verifier, used by open-r1 and TRL).

`math_answer` parses the reference and the completion's final answer with math-verify and compares
them symbolically (1/2 = 0.5 = \\frac{1}{2}, 1,000 = 1000, sets, intervals, units stripped), so no
hand-written answer regex decides correctness. GSM8K's form is understood on both sides: a
reference like "...<<48/2=24>>...\\n#### 72" is reduced to "72".

Only a *marked* final answer is scored (`final_answer`): the last `\\boxed{...}`, `#### ...` or
"the answer is ..." / "final answer: ...". A completion without one scores 0, like TRL's
`accuracy_reward`: parsing the whole text would credit an unfinished answer (one cut at the token
limit) whenever a number it mentions on the way happens to be the answer. `require_marker=False`
restores that loose parse for models that never mark their answers.

Recipe::

    rewards:
      - fn: rewards.maths:math_answer
        kwargs: {answer_column: answer}     # GSM8K rows keep the worked answer in `answer`
      - fn: rewards.maths:gsm8k_format      # 1 when the completion ends with "#### <number>"
        weight: 0.2
"""

from __future__ import annotations

import re
import threading
from typing import Any

import math_verify.grader
import math_verify.parser
from math_verify import parse, verify

from rewards.base import column, completion_text, reference_value

# math-verify's own timeouts use signal.alarm, which only works in the main thread; in the scorer's
# worker threads they are turned off and the scorer's per-call time limit bounds the work instead.
_MAIN_THREAD_TIMEOUT_S = 5
# Its one-time warning that timeouts are off would then mislead: the scorer's limit applies.
math_verify.parser.TIMEOUT_WARNING_SHOWN = True
math_verify.grader.TIMEOUT_WARNING_SHOWN = True

_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_IS = re.compile(
    r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*(.+?)\s*(?:\.\s|\.?$)", re.MULTILINE
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_FINAL_LINE = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*\Z")


def _timeout() -> int | None:
    return _MAIN_THREAD_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def gsm8k_final(text: str) -> str | None:
    """What follows the last `#### ` in a text (GSM8K's final-answer marker), or None."""
    found = _GSM8K_ANSWER.findall(text)
    return found[-1].replace(",", "").strip() if found else None


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, content) of every `\\boxed{...}`, braces matched (answers hold braces: \\frac{1}{2})."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found.append((match.start(), text[start:end]))
                break
    return found


def final_answer(text: str) -> str | None:
    """The completion's marked final answer (the last boxed, `####` or "the answer is" one), or None."""
    marked = _boxed(text)
    marked += [(m.start(), m.group(1)) for m in _GSM8K_ANSWER.finditer(text)]
    marked += [(m.start(), m.group(1)) for m in _ANSWER_IS.finditer(text)]
    if not marked:
        return None
    answer = max(marked)[1].strip()
    # "#### 1,000" and "\\boxed{1,000}": thousands separators, which math-verify reads as a tuple.
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)


def _parse(text: str) -> list[Any]:
    return parse(text, parsing_timeout=_timeout())


def is_equivalent(answer: str, reference: str, *, require_marker: bool = True) -> bool:
    """True when math-verify finds the completion's final answer equal to the reference.

    `require_marker`: only a marked final answer counts (see `final_answer`); False parses the
    whole completion when it has no marker.
    """
    gold = _parse(gsm8k_final(reference) or reference)
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {reference!r}")
    marked = final_answer(answer)
    if marked is None and require_marker:
        return False
    predicted = _parse(marked if marked is not None else answer)
    if not predicted and marked is not None:
        # A marker around plain text ("the answer is 12 apples"): math-verify's own extraction of it.
        predicted = _parse(f"${marked}$")
    return bool(predicted) and verify(gold, predicted, timeout_seconds=_timeout())


def math_answer(
    completions: list[Any],
    *,
    answer_column: str = "reference_answer",
    answer_key: str | None = None,
    require_marker: bool = True,
    **columns: Any,
) -> list[float | None]:
    """1.0 when the completion's marked final answer equals the reference (math-verify), else 0.0.

    `answer_column` names the reference column; when its values are objects (Bedrock's
    `reference_answer: {"final_answer": "72"}`), `answer_key` picks the field. Rows without a
    reference get None (not applicable). A completion without a final-answer marker scores 0
    unless `require_marker` is False (then its whole text is parsed).
    """
    references = column(columns, answer_column, len(completions), "math_answer")
    scores: list[float | None] = []
    for completion, reference in zip(completions, references, strict=True):
        if reference is None:
            scores.append(None)
            continue
        gold = reference_value(reference, answer_key)
        correct = is_equivalent(completion_text(completion), str(gold), require_marker=require_marker)
        scores.append(1.0 if correct else 0.0)
    return scores


math_answer.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]


def gsm8k_format(completions: list[Any], **columns: Any) -> list[float]:
    """1.0 when the completion ends with GSM8K's `#### <number>` line, else 0.0 (a format reward)."""
    return [1.0 if _GSM8K_FINAL_LINE.search(completion_text(c).strip()) else 0.0 for c in completions]


gsm8k_format.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]
