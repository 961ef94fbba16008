"""The one noise rule and its wording (rft/stats.py), per-prompt summaries, the report's rows: no model."""

from __future__ import annotations

import math

import pytest

from rft.data import Example
from rft.eval_plans import EvalPlan
from rft.eval_results import EvalResult, summarise
from rft.evaluation import exact_match, normalize_answer
from rft.report_page import ComparisonRow, num
from rft.reward_context import completion_text, conversation_text
from rft.sampling import SamplingSettings
from rft.stats import Stat, compare, compare_stats, format_comparison, overall, reward_change


def test_compare_stats_is_the_two_sample_rule_by_hand() -> None:
    row = compare_stats(Stat(0.5, 0.03, 50), Stat(0.6, 0.04, 50), sigmas=1.5)
    assert row.change == pytest.approx(0.1)
    assert row.stderr == pytest.approx(0.05)  # sqrt(0.03^2 + 0.04^2)
    assert row.z == pytest.approx(2.0)
    assert row.significant and row.better and not row.worse
    assert row.verdict == "better (+2.0 s.e. > 1.5)"
    within = compare_stats(Stat(0.5, 0.03, 50), Stat(0.6, 0.04, 50), sigmas=2.5)
    assert within.verdict == "within noise (+2.0 s.e. ≤ 2.5)"
    falling = compare_stats(Stat(0.6, 0.0, 9), Stat(0.5, 0.0, 9), sigmas=2.0)
    assert falling.z == -math.inf and falling.worse and falling.verdict == "worse (-inf s.e. > 2)"
    lonely = compare_stats(Stat(0.0, 0.0, 1), Stat(1.0, 0.0, 9), sigmas=2.0)
    assert lonely.z is None and not lonely.significant and lonely.verdict == "too few prompts to tell"


def test_comparison_rows_serialise_as_before() -> None:
    before = {"stats": {"reward": {"mean": 0.2, "stderr": 0.1, "count": 4},
                        "pass@1": {"mean": 0.5, "stderr": 0.1, "count": 4}}}
    after = {"stats": {"reward": {"mean": 0.4, "stderr": 0.1, "count": 4}}}
    rows = compare(before, after, 2.0)
    assert [row.metric for row in rows] == ["reward"]  # a metric on one side only is not compared
    assert rows[0].to_dict() == {
        "metric": "reward", "tag": None, "value": None, "before": before["stats"]["reward"],
        "after": after["stats"]["reward"], "change": pytest.approx(0.2),
        "stderr": pytest.approx(math.sqrt(0.02)),
        "z": pytest.approx(0.2 / math.sqrt(0.02)), "significant": False,
    }
    assert overall(rows) == reward_change(before, after, 2.0)
    assert format_comparison(rows).splitlines()[1].startswith("reward (all)")


def _example(prompt: str, **row) -> Example:
    return Example(prompt=prompt, prompt_ids=[1], row={"prompt": prompt, **row})


def test_summarise_counts_prompts_and_slices_by_tag() -> None:
    plan = EvalPlan(mode="greedy", sampling=SamplingSettings(max_new_tokens=4, greedy=True),
                    samples_per_prompt=1, pass_k=(), pass_threshold=1.0, exact_match=None, seed=0,
                    batch_size=2, keep_samples=0)
    examples = [_example("a", level=1), _example("b", level=1), _example("c", level=2), _example("d")]
    per_prompt = [{"reward": 1.0, "metric/judge": 0.5}, {"reward": 0.0}, {"reward": 0.5}, {"reward": 0.25}]
    result = summarise("base", plan, examples, per_prompt, ["level"], [])
    assert list(result.stats) == ["reward", "metric/judge"]  # the reward first
    assert (result.mean, result.count) == (pytest.approx(0.4375), 4)
    assert result.stats["metric/judge"] == Stat(0.5, 0.0, 1)
    assert set(result.slices["level"]) == {"1", "2"}  # the untagged prompt is in no slice
    assert result.slices["level"]["1"]["reward"] == Stat(0.5, 0.5, 2)
    assert "metric/judge" not in result.slices["level"]["2"]
    assert EvalResult.from_dict(result.to_dict()) == result


def test_exact_match_and_the_one_completion_text() -> None:
    assert normalize_answer("  The   Answer. ") == "the answer"
    assert exact_match(4, ["4", [{"role": "assistant", "content": "4."}], "5", "four"]) == 0.5
    chat = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    assert completion_text(chat) == "yo"  # the assistant's words only
    assert conversation_text(chat) == "user: hi\nassistant: yo"
    assert conversation_text("plain") == "plain"


def test_report_rows_format_numbers_and_carry_the_verdict() -> None:
    assert (num(None), num(math.nan), num(math.inf), num(-math.inf)) == ("–", "–", "+∞", "−∞")
    assert num(0.25, signed=True) == "+0.250"
    row = ComparisonRow.of(
        compare_stats(Stat(0.5, 0.1, 8), Stat(0.9, 0.1, 8), 2.0, tag="domain", value="math")
    )
    cells = (row.css, row.where, row.count, row.before, row.change)
    assert cells == ("better", "domain = math", 8, "0.500 ± 0.100", "+0.400")
    assert row.verdict == "better (+2.8 s.e. > 2)"
