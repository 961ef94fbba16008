"""Agent tools: schemas, the model's calls parsed, tools offered in the prompt, calls run in workers.

Real components: the embedded SmolLM2 tokenizer and real worker processes running the functions of
tests/agent_tools_fixture.py by spec.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rft.agents.tools import (
    ParsedTurn,
    ToolCall,
    ToolError,
    ToolRunner,
    parse_tool_calls,
    template_renders_tools,
    tool_schema,
    tool_spec,
    tools_system_prompt,
    with_tools,
)
from rft.config import ConfigError
from rft.reward_loading import load_function
from tests import agent_tools_fixture as fixture

FIXTURE = Path(__file__).resolve().parent / "agent_tools_fixture.py"
ADD_SCHEMA = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two whole numbers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "description": "The first number."},
                "b": {"type": "integer", "description": "The second number."},
            },
            "required": ["a", "b"],
        },
        "return": {"type": "integer"},
    },
}
# A template that renders `tools=` the way Qwen's does: one `tojson` per line inside <tools>. (Newlines
# as expressions: chat templates trim the one after a block tag.)
TOOLS_TEMPLATE = (
    '{% if tools %}<tools>{% for tool in tools %}{{ "\\n" }}{{ tool | tojson }}{% endfor %}'
    '{{ "\\n</tools>\\n" }}{% endif %}'
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
)
TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------------------- schemas
def test_schema_of_a_typed_function() -> None:
    assert tool_schema(fixture.add) == ADD_SCHEMA


def test_an_untyped_function_is_one_clear_error() -> None:
    with pytest.raises(ToolError, match=r"tool untyped: .*missing a type hint.*Google-style docstring"):
        tool_schema(fixture.untyped)
    assert issubclass(ToolError, ConfigError)


def test_spec_of_a_module_level_function_loads_it_again() -> None:
    spec = tool_spec(fixture.add)
    assert spec == f"{FIXTURE}:add"
    assert load_function(spec)(a=2, b=3) == 5


def test_a_lambda_or_nested_function_has_no_spec() -> None:
    def nested(a: int) -> int:
        return a

    for function in (lambda a: a, nested):
        with pytest.raises(ToolError, match="not a module-level function"):
            tool_spec(function)


# ---------------------------------------------------------------------------------------- parsing
def test_one_valid_call() -> None:
    turn = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert turn == ParsedTurn(content="", calls=[ToolCall("add", {"a": 1, "b": 2})], errors=[])


def test_several_calls_and_the_text_around_them() -> None:
    text = (
        'Let me compute both.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "lookup", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    turn = parse_tool_calls(text)
    assert turn.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("lookup", {"city": "Paris"})]
    assert turn.content == "Let me compute both."
    assert turn.errors == []


def test_a_missing_closing_tag_at_the_end_is_tolerated() -> None:
    turn = parse_tool_calls('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 5}}\n')
    assert turn == ParsedTurn(content="Sure.", calls=[ToolCall("add", {"a": 4, "b": 5})], errors=[])


def test_malformed_json_is_an_error_line_not_an_exception() -> None:
    turn = parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call>'
    )
    assert turn.calls == [ToolCall("add", {"a": 1, "b": 1})]
    assert turn.errors == [
        "tool call '{\"name\": \"add\", \"arguments\": {\"a\": 1,}}': invalid JSON "
        "(Expecting property name enclosed in double quotes, character 37)"
    ]


def test_arguments_as_a_json_string_or_under_parameters() -> None:
    turn = parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
        '<tool_call>{"name": "lookup", "parameters": {"city": "Oslo"}}</tool_call>'
    )
    assert turn.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("lookup", {"city": "Oslo"})]
    assert turn.errors == []


def test_a_missing_name_or_arguments_not_an_object_are_errors() -> None:
    turn = parse_tool_calls(
        '<tool_call>{"arguments": {"a": 1}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>'
        "<tool_call>[1, 2]</tool_call>"
    )
    assert turn.calls == []
    assert turn.errors == [
        "tool call '{\"arguments\": {\"a\": 1}}': \"name\" must be the tool's name as a string, got null",
        'tool call \'{"name": "add", "arguments": [1, 2]}\': "arguments" must be an object, got an array',
        "tool call '[1, 2]': expected an object with \"name\" and \"arguments\", got an array",
    ]


def test_a_long_bad_call_is_quoted_short_on_one_line() -> None:
    (error,) = parse_tool_calls("<tool_call>\n" + "x" * 500 + "\n</tool_call>").errors
    assert error.startswith("tool call '" + "x" * 57 + "...': invalid JSON")
    assert "\n" not in error


def test_text_without_calls() -> None:
    turn = parse_tool_calls("  The answer is 4.\n")
    assert turn == ParsedTurn(content="The answer is 4.", calls=[], errors=[])


# ---------------------------------------------------------------------------- offering the tools
@pytest.fixture(scope="module")
def smollm2(embedded_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture(scope="module")
def renders_tools(embedded_model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def test_the_tools_block_is_qwen25s() -> None:
    lookup = {"type": "function", "function": {"name": "lookup", "description": "Café facts."}}
    assert tools_system_prompt([ADD_SCHEMA, lookup]) == (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{json.dumps(ADD_SCHEMA)}\n"
        '{"type": "function", "function": {"name": "lookup", "description": "Café facts."}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call>"
    )


def test_the_tools_block_writes_json_as_chat_templates_do(renders_tools: PreTrainedTokenizerBase) -> None:
    schemas = [ADD_SCHEMA, {"type": "function", "function": {"name": "lookup", "description": "Café facts."}}]
    rendered = renders_tools.apply_chat_template([{"role": "user", "content": "hi"}], tools=schemas,
                                                 tokenize=False)
    block = tools_system_prompt(schemas)
    lines = block[block.index("<tools>\n"): block.index("\n</tools>") + len("\n</tools>")]
    assert rendered.startswith(lines + "\n")


def test_smollm2_ignores_tools_so_the_block_goes_into_the_system_message(
    smollm2: PreTrainedTokenizerBase,
) -> None:
    assert not template_renders_tools(smollm2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2?"}]
    offered = with_tools(messages, [ADD_SCHEMA], smollm2)
    assert offered == [
        {"role": "system", "content": "Be brief.\n\n" + tools_system_prompt([ADD_SCHEMA])},
        {"role": "user", "content": "1 + 2?"},
    ]
    assert messages[0]["content"] == "Be brief."  # the caller's messages are not changed
    rendered = smollm2.apply_chat_template(offered, tokenize=False)
    assert f"<tools>\n{json.dumps(ADD_SCHEMA)}\n</tools>" in rendered


def test_without_a_system_message_one_is_put_first(smollm2: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "1 + 2?"}]
    assert with_tools(messages, [ADD_SCHEMA], smollm2) == [
        {"role": "system", "content": tools_system_prompt([ADD_SCHEMA])}, *messages
    ]
    assert with_tools(messages, [], smollm2) == messages


def test_a_template_that_renders_tools_gets_the_messages_unchanged(
    renders_tools: PreTrainedTokenizerBase,
) -> None:
    assert template_renders_tools(renders_tools)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2?"}]
    assert with_tools(messages, [ADD_SCHEMA], renders_tools) == messages


# ---------------------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def runner() -> Iterator[ToolRunner]:
    names = ["add", "lookup", "divide", "nap", "hoard"]
    with ToolRunner({name: f"{FIXTURE}:{name}" for name in names}, timeout_s=TIMEOUT_S, memory_mb=512,
                    concurrency=2) as tools:
        yield tools


def test_a_good_call_returns_its_value(runner: ToolRunner) -> None:
    add, lookup = runner.run([ToolCall("add", {"a": 2, "b": 40}), ToolCall("lookup", {"city": "Paris"})])
    assert add.message == {"role": "tool", "name": "add", "content": "42"}
    assert not add.failed and not add.timed_out
    assert json.loads(lookup.message["content"]) == {
        "city": "Paris", "population": 2_100_000, "tags": ["capital", "Seine"]
    }


def test_the_schemas_use_the_names_the_mapping_gives(runner: ToolRunner) -> None:
    assert runner.schemas[0] == ADD_SCHEMA
    assert [schema["function"]["name"] for schema in runner.schemas] == ["add", "lookup", "divide", "nap",
                                                                          "hoard"]


def test_a_raising_tool_unknown_tool_and_bad_arguments_are_error_messages(runner: ToolRunner) -> None:
    results = runner.run([
        ToolCall("divide", {"a": 1, "b": 0}),
        ToolCall("multiply", {"a": 1}),
        ToolCall("add", {"a": 1}),
        ToolCall("add", {"a": 1, "b": 2, "c": 3}),
    ])
    assert [result.message["content"] for result in results] == [
        "error: ZeroDivisionError: division by zero",
        "error: unknown tool 'multiply'; the tools are: add, lookup, divide, nap, hoard",
        "error: bad arguments for add: missing a required argument: 'b'",
        "error: bad arguments for add: got an unexpected keyword argument 'c'",
    ]
    assert all(result.failed and not result.timed_out for result in results)


def test_a_call_past_its_time_limit_is_stopped_and_the_next_call_works(runner: ToolRunner) -> None:
    before = runner.counts
    started = time.monotonic()
    (slow,) = runner.run([ToolCall("nap", {"seconds": 60})])
    elapsed = time.monotonic() - started
    assert slow.message["content"] == f"error: nap timed out after {TIMEOUT_S:g} s and was stopped"
    assert slow.failed and slow.timed_out
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 5
    (quick,) = runner.run([ToolCall("nap", {"seconds": 0.01})])
    assert quick.message["content"] == "rested" and not quick.failed
    after = runner.counts
    assert after.calls - before.calls == 2
    assert (after.failures - before.failures, after.timeouts - before.timeouts) == (1, 1)


def test_a_call_past_the_memory_cap_fails_and_the_next_call_works(runner: ToolRunner) -> None:
    (greedy,) = runner.run([ToolCall("hoard", {"megabytes": 2048})])
    assert greedy.failed and not greedy.timed_out
    assert greedy.message["content"].startswith("error: MemoryError")
    (modest,) = runner.run([ToolCall("hoard", {"megabytes": 8})])
    assert modest.message["content"] == str(8 * 2**20)


def test_async_calls_keep_their_order(runner: ToolRunner) -> None:
    calls = [ToolCall("add", {"a": n, "b": 1}) for n in range(4)]
    results = asyncio.run(runner.arun(calls))
    assert [result.message["content"] for result in results] == ["1", "2", "3", "4"]


def test_a_tool_that_cannot_be_offered_fails_at_start() -> None:
    with pytest.raises(ToolError, match=r"tool untyped: .*missing a type hint"):
        ToolRunner({"untyped": f"{FIXTURE}:untyped"}, timeout_s=1, memory_mb=None, concurrency=1)
    with pytest.raises(ToolError, match=r"tool 'gone': .*not found"):
        ToolRunner({"gone": "no/such/file.py:gone"}, timeout_s=1, memory_mb=None, concurrency=1)
