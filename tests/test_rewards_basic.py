"""Rule rewards: maths (math-verify, GSM8K), text matching, JSON / JSON Schema, grounding."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from rewards.base import RewardValues, completion_text, reference_value
from rewards.grounding import citations, cited_sources
from rewards.maths import final_answer, gsm8k_final, gsm8k_format, math_answer
from rewards.structured import JsonSchemaReward, extract_json, json_valid
from rewards.text import count_units, exact_match, length_band, numeric_match, regex_format

GSM8K = Path(__file__).resolve().parent / "data" / "gsm8k" / "train.jsonl"


# -- maths ------------------------------------------------------------------------------------------


def test_math_answer_equivalent_forms():
    completions = [
        "So the total is \\boxed{\\frac{1}{2}}",
        "The answer is 0.5",
        "I think it is 0.25",
        "no number here",
    ]
    assert math_answer(completions, reference_answer=["1/2"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_math_answer_gsm8k_forms_and_bedrock_reference_objects():
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    completions = ["48 + 24 = 72\n#### 72", "She sold 24 in May.\n#### 24", "#### 1,000"]
    assert math_answer(completions, answer_column="answer", answer=[gold, gold, "#### 1000"]) == [
        1.0, 0.0, 1.0
    ]
    # Bedrock rows: reference_answer is an object; rows without one are not applicable.
    scores = math_answer(
        ["#### 12", "#### 12"], reference_answer=[{"final_answer": "12", "explanation": "7+5"}, None]
    )
    assert scores == [1.0, None]
    assert gsm8k_final("a\n#### 1,234") == "1234"


def test_math_answer_scores_only_a_marked_final_answer():
    # Cut at the token limit while still working: the reference's number is mentioned on the way.
    unfinished = ["Natalia sold 48 clips in April and 48 / 2 = 24 in May, so in total she sold 48 + 24",
                  "First, 72 is what we"]
    assert math_answer(unfinished, reference_answer=["72", "72"]) == [0.0, 0.0]
    assert math_answer(unfinished, reference_answer=["72", "72"], require_marker=False) == [1.0, 1.0]
    finished = ["48 + 24 = 72, so the answer is 72.", "Final answer: 72", "We get \\boxed{72}", "#### 72",
                "The answer is 24, no: \\boxed{72}", "\\boxed{24} was wrong. The final answer is 72."]
    assert math_answer(finished, reference_answer=["72"] * 6) == [1.0] * 6
    # The last marker decides: a corrected answer counts, a later wrong one does not.
    assert math_answer(["\\boxed{72} no wait, the answer is 70"], reference_answer=["72"]) == [0.0]


def test_final_answer_markers():
    assert final_answer("so \\boxed{\\frac{1}{2}} it is") == "\\frac{1}{2}"
    assert final_answer("a\n#### 1,234") == "1234"
    assert final_answer("The answer is 3.5.") == "3.5"
    assert final_answer("The answer is 12. Next question") == "12"
    assert final_answer("48 + 24 = 72") is None
    assert final_answer("\\boxed{unclosed") is None


def test_math_answer_runs_in_worker_threads():
    # math-verify's own timeouts need the main thread; the reward must still work from the scorer's threads.
    results = []
    thread = threading.Thread(
        target=lambda: results.append(math_answer(["\\boxed{3}"], reference_answer=["3"]))
    )
    thread.start()
    thread.join()
    assert results == [[1.0]]


def test_math_answer_on_real_gsm8k_rows():
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:20]]
    answers = [row["answer"] for row in rows]
    right = [f"Working...\n#### {gsm8k_final(a)}" for a in answers]
    wrong = [f"Working...\n#### {float(gsm8k_final(a)) + 1:g}" for a in answers]
    assert math_answer(right, answer_column="answer", answer=answers) == [1.0] * 20
    assert math_answer(wrong, answer_column="answer", answer=answers) == [0.0] * 20


def test_gsm8k_format_and_missing_column_message():
    assert gsm8k_format(["x\n#### 42", "#### 42 apples", "42"]) == [1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="needs a column 'reference_answer'; the rows have: question"):
        math_answer(["1"], question=["q"])


# -- text ---------------------------------------------------------------------------------------------


def test_exact_and_normalised_match_with_extraction():
    completions = [
        "ANSWER: The Eiffel Tower.", "answer: eiffel tower", "Paris",
        [{"role": "assistant", "content": "Eiffel Tower"}],
    ]
    refs = ["Eiffel Tower"] * 4
    assert exact_match(completions, reference_answer=refs) == [0.0, 0.0, 0.0, 1.0]
    assert exact_match(
        completions, reference_answer=refs, normalize=True, extract_pattern=r"(?i)answer:\s*(.+)"
    ) == [
        1.0, 1.0, 0.0, 0.0,
    ]
    assert exact_match(["blue"], reference_answer=[["red", "blue"]]) == [1.0]  # any accepted answer


def test_numeric_tolerance():
    completions = ["It costs $1,234.50 in total", "about 1240", "12.3%", "none"]
    assert numeric_match(completions, reference_answer=["1234.5"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert numeric_match(completions, reference_answer=[1234.5] * 4, rel_tol=0.01) == [1.0, 1.0, 0.0, 0.0]
    assert numeric_match(["12.3%"], reference_answer=[{"answer": 12.3}]) == [1.0]


def test_regex_format_modes_and_flags():
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    good = "<think>a\nb</think>\n<answer>4</answer>"
    assert regex_format([good, "<answer>4</answer>"], pattern=pattern, mode="fullmatch", flags="s") == [
        1.0, 0.0
    ]
    # '.' does not cross lines without s
    assert regex_format([good], pattern=pattern, mode="fullmatch") == [0.0]
    with pytest.raises(ValueError, match="flags"):
        regex_format([good], pattern=pattern, flags="q")


def test_length_bands_in_words_and_sentences():
    assert count_units("One. Two! Three? four", "sentences") == 4
    assert count_units("Dr. Who is here.", "sentences") == 2  # abbreviations over-count, as documented
    texts = ["one two three", "one two three four five six seven", "one"]
    assert length_band(texts, unit="words", min=2, max=5) == [1.0, 0.0, 0.0]
    assert length_band(texts, unit="words", min=2, max=5, falloff=4) == [1.0, 0.5, 0.75]
    assert length_band(["A. B. C.", "A."], unit="sentences", max=2) == [0.0, 1.0]


def test_helpers():
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    assert reference_value({"final_answer": "3", "steps": "..."}) == "3"
    with pytest.raises(KeyError, match="answer_key"):
        reference_value({"a": 1, "b": 2})
    with pytest.raises(ValueError, match="component 'x' has 1 values for 2"):
        RewardValues([1.0, 2.0], components={"x": [1.0]})


# -- structured ---------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "required": ["name", "amount"],
    "properties": {"name": {"type": "string"}, "amount": {"type": "number"},
                   "lines": {
                       "type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}
                   }},
}


def test_json_extraction_and_validity():
    assert extract_json('Here you go:\n```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Result: {"a": [1, 2]} done') == {"a": [1, 2]}
    assert json_valid(['{"a": 1}', "[1, 2]", "{'a': 1}", "42", "text"]) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert json_valid(['Sure: {"a": 1}'], extract="strict") == [0.0]


def test_json_schema_required_types_and_extra_keys():
    reward = JsonSchemaReward(schema=SCHEMA)
    completions = [
        '{"name": "Ann", "amount": 3.5}',
        '{"name": "Ann"}',  # missing required key
        '{"name": "Ann", "amount": "3.5"}',  # wrong type
        '{"name": "Ann", "amount": 3.5, "note": "x"}',  # extra key
        '{"name": "Ann", "amount": 1, "lines": [{"sku": "A", "qty": 2}]}',  # extra key, nested
        "not json",
    ]
    values = reward(completions)
    assert values == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert values.components["parsed"] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert values.counters["schema_errors"] == 4
    lenient = JsonSchemaReward(schema=SCHEMA, forbid_extra=False)
    assert lenient(completions[3:5]) == [1.0, 1.0]


def test_json_schema_per_row_and_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    assert JsonSchemaReward(schema_file=str(path))(['{"name": "a", "amount": 1}']) == [1.0]
    per_row = JsonSchemaReward(schema_column="schema")
    rows = [json.dumps({"type": "object", "required": ["x"]}), {"type": "array"}]
    assert per_row(['{"x": 1}', '{"x": 1}'], schema=rows) == [1.0, 0.0]
    with pytest.raises(ValueError, match="exactly one"):
        JsonSchemaReward()
    with pytest.raises(ValueError, match="invalid schema"):
        JsonSchemaReward(schema={"type": "no-such-type"})


# -- grounding ----------------------------------------------------------------------------------------

PASSAGES = [
    {"id": "doc-1", "url": "https://help.example.com/refunds/", "text": "Refunds take 5 days."},
    {"id": "doc-2", "text": "Shipping is free over $50."},
]


def test_citations_are_parsed_from_brackets_and_urls():
    text = "See [doc-1; doc-2] and https://Help.Example.com/refunds. Also [the guide](https://x.org/a)."
    assert citations(text) == ["help.example.com/refunds", "x.org/a", "doc-1", "doc-2"]


def test_grounding_rewards_real_and_penalises_invented_sources():
    completions = [
        "Refunds take 5 days [doc-1].",
        "Refunds take 5 days (https://www.help.example.com/refunds).",
        "Refunds take 5 days [doc-1] [doc-9].",
        "Refunds take 5 days.",
        "Refunds take 5 days [doc-7].",
    ]
    values = cited_sources(completions, passages=[PASSAGES] * 5)
    assert values == [1.0, 1.0, 0.0, 0.0, -1.0]
    assert values.components["invalid"] == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert cited_sources(["x [1]"], passages=[["1", "2"]]) == [1.0]  # plain id lists
    assert cited_sources(["x"], passages=[None]) == [None]


def test_grounding_id_pattern_ignores_non_citation_brackets():
    text = ["The set [1, 2] has two items [doc-2]."]
    assert cited_sources(text, passages=[PASSAGES]) == [0.0]  # "1" and "2" look like invented sources
    assert cited_sources(text, passages=[PASSAGES], id_pattern=r"doc-\d+") == [1.0]
