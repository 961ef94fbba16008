"""An agent's tools: their JSON schemas, the model's calls parsed from its text, the calls run bounded.

1. Schemas: a tool is a module-level function with type hints and a Google-style docstring;
   `tool_schema` reads it with transformers' `get_json_schema` (the OpenAI / Hugging Face form
   `{"type": "function", "function": {name, description, parameters}}`), the form a chat
   template's `tools=` takes.
2. Offering them: `with_tools` leaves the messages alone when the tokenizer's chat template renders
   `tools=` itself, and otherwise writes Qwen2.5's tool instructions (`tools_system_prompt`) into the
   system message: the embedded SmolLM2's template ignores `tools=`.
3. Calls: `parse_tool_calls` reads the Hermes / Qwen convention, `<tool_call>{"name": ...,
   "arguments": {...}}</tool_call>`, several per turn; a malformed call is an entry in `errors`,
   answered to the model as an error message, never an exception.
4. Running them: `ToolRunner` calls each tool in a worker process (`rft.reward_workers`, the
   machinery that runs rewards), so a call past its time limit is killed and a runaway allocation
   stops at the memory cap. Every outcome, failures included, is a `{"role": "tool"}` message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

from rft.config import ConfigError
from rft.environment import Message
from rft.reward_context import content_text
from rft.reward_loading import RewardError, load_function
from rft.reward_workers import FunctionPool, WorkerCrashed, WorkerStartError, WorkerTimeout

Schema = dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}

# Qwen2.5's chat template, word for word: the block it writes after the system message's text.
_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
# A call runs to its closing tag, or to the end of the text: a model stopped at its stop token (or its
# token budget) may not have written `</tool_call>`.
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_EXCERPT_CHARS = 60
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
_PROBE_MESSAGES = [{"role": "user", "content": "2 + 2?"}]
_PROBE_TOOL: Schema = {
    "type": "function",
    "function": {"name": "rft_probe_tool", "description": "A probe.", "parameters": {"type": "object",
                                                                                       "properties": {}}},
}


class ToolError(ConfigError):
    """A tool that cannot be offered: no schema to read from it, or no spec a worker can load it by."""


# ---------------------------------------------------------------------------------------- schemas
def tool_schema(function: Callable[..., Any]) -> Schema:
    """The tool's JSON schema, read from its type hints and docstring by transformers' `get_json_schema`."""
    try:
        return get_json_schema(function)
    except (TypeHintParsingException, DocstringParsingException) as exc:
        name = getattr(function, "__qualname__", repr(function))
        raise ToolError(
            f"tool {name}: {exc}. A tool needs a type hint on every argument and a Google-style docstring "
            "with a description and an `Args:` line for each argument"
        ) from exc


def tool_spec(function: Callable[..., Any]) -> str:
    """The spec a worker process loads `function` by: `/path/to/its/file.py:name`."""
    name = getattr(function, "__qualname__", "")
    module = sys.modules.get(getattr(function, "__module__", None) or "")
    # Only what its module holds under its own name can be loaded again in another process: not a
    # lambda, a nested function or a method.
    if not inspect.isfunction(function) or getattr(module, name, None) is not function:
        raise ToolError(
            f"tool {name or function!r}: not a module-level function; tools run in worker processes, which "
            "load them as `file.py:function`"
        )
    try:
        source = inspect.getsourcefile(function)
    except TypeError:
        source = None
    if source is None:
        raise ToolError(f"tool {name}: its source file is unknown, so no worker process can load it")
    return f"{Path(source).resolve()}:{name}"


# ------------------------------------------------------------------------------ offering the tools
def tools_system_prompt(schemas: Sequence[Schema]) -> str:
    """Qwen2.5's tool instructions for `schemas`, one JSON per line, as its chat template writes them."""
    # ensure_ascii=False: the template's `tojson` filter (transformers' chat templates) writes this.
    lines = "".join("\n" + json.dumps(schema, ensure_ascii=False) for schema in schemas)
    return _TOOLS_HEAD + lines + _TOOLS_TAIL


def template_renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template writes `tools=` into the prompt (it renders differently)."""
    without = tokenizer.apply_chat_template(_PROBE_MESSAGES, tokenize=False)
    offered = tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=[_PROBE_TOOL], tokenize=False)
    return offered != without


def with_tools(
    messages: Sequence[Message], schemas: Sequence[Schema], tokenizer: PreTrainedTokenizerBase
) -> list[Message]:
    """The messages to render with the tools offered.

    Unchanged when the chat template renders `tools=` (the caller passes `tools=schemas`); otherwise
    with `tools_system_prompt` after the system message's text, or in a system message put first.
    """
    if not schemas or template_renders_tools(tokenizer):
        return list(messages)
    return with_tools_block(messages, schemas)


def with_tools_block(messages: Sequence[Message], schemas: Sequence[Schema]) -> list[Message]:
    """The messages with `tools_system_prompt` after the system message's text, or in a system message
    put first (for a template known to ignore `tools=`: `with_tools` checks that first)."""
    block = tools_system_prompt(schemas)
    if messages and messages[0].get("role") == "system":
        system = messages[0]
        return [{**system, "content": f"{content_text(system.get('content'))}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


# ----------------------------------------------------------------------------------------- calls
@dataclass(frozen=True)
class ToolCall:
    """One call the model made."""

    name: str
    arguments: dict[str, Any]

    def as_message_call(self) -> dict[str, Any]:
        """The entry for an assistant message's `tool_calls` (the form chat templates render)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedTurn:
    """An assistant turn's text split into what it says and the calls it makes."""

    content: str  # the text outside the calls, stripped
    calls: list[ToolCall]
    errors: list[str]  # one line per malformed call, quoting it


def parse_tool_calls(text: str) -> ParsedTurn:
    """The calls in `text` by the Hermes / Qwen convention; malformed ones become `errors`, never raise."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    for match in _TOOL_CALL.finditer(text):
        parsed = _parsed_call(match.group(1))
        if isinstance(parsed, ToolCall):
            calls.append(parsed)
        else:
            errors.append(parsed)
    return ParsedTurn(content=_TOOL_CALL.sub("", text).strip(), calls=calls, errors=errors)


def _parsed_call(body: str) -> ToolCall | str:
    """The call one `<tool_call>` holds, or the line that says why it is none."""
    quoted = _excerpt(body)
    try:
        call = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"tool call {quoted}: invalid JSON ({exc.msg}, character {exc.pos})"
    if not isinstance(call, dict):
        return f'tool call {quoted}: expected an object with "name" and "arguments", got {_json_type(call)}'
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return f'tool call {quoted}: "name" must be the tool\'s name as a string, got {_json_type(name)}'
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        # OpenAI's form: the arguments object written as a JSON string.
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return f'tool call {quoted}: "arguments" is a string but not JSON ({exc.msg})'
    if not isinstance(arguments, dict):
        return f'tool call {quoted}: "arguments" must be an object, got {_json_type(arguments)}'
    return ToolCall(name=name, arguments=arguments)


def _excerpt(body: str) -> str:
    """A short one-line quote of a call's text."""
    line = " ".join(body.split())
    return repr(line if len(line) <= _EXCERPT_CHARS else line[: _EXCERPT_CHARS - 3] + "...")


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------ running them
@dataclass(frozen=True)
class ToolResult:
    """What a call gives the conversation: a `{"role": "tool", "name", "content"}` message."""

    message: Message
    failed: bool = False
    timed_out: bool = False


@dataclass
class ToolCounts:
    """Calls run since the runner started, for the step's metrics."""

    calls: int = 0
    failures: int = 0  # timeouts included
    timeouts: int = 0


class ToolRunner:
    """Runs tool calls in worker processes: at most `concurrency` at once, each bounded by `timeout_s`
    and `memory_mb` (None: no cap). `tools` maps each tool's name to its spec (`file.py:function` or
    `package.module:function`); every tool is loaded here once, for its schema and arguments check."""

    def __init__(
        self, tools: Mapping[str, str], *, timeout_s: float, memory_mb: int | None, concurrency: int
    ):
        self.timeout_s = timeout_s
        self.functions = {name: _loaded(name, spec) for name, spec in tools.items()}
        # Named as the mapping names them: that is the name a call must use.
        self.schemas: list[Schema] = [
            _renamed(tool_schema(function), name) for name, function in self.functions.items()
        ]
        self._pools = {name: FunctionPool(spec, memory_mb, concurrency) for name, spec in tools.items()}
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rft-tool")
        self._lock = threading.Lock()
        self._counts = ToolCounts()

    @property
    def counts(self) -> ToolCounts:
        with self._lock:
            return dataclasses.replace(self._counts)

    def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """One result per call, in order; the calls run in parallel."""
        return list(self._executor.map(self._run_one, calls))

    async def arun(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """`run` for an event loop: awaits the calls without blocking it."""
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._executor, self._run_one, call)
                                           for call in calls)))

    def close(self) -> None:
        """Wait for calls in flight (each ends within its limit), then stop every worker."""
        self._executor.shutdown(wait=True)
        for pool in self._pools.values():
            pool.close()

    def __enter__(self) -> ToolRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run_one(self, call: ToolCall) -> ToolResult:
        result = self._result(call)
        with self._lock:
            self._counts.calls += 1
            self._counts.failures += result.failed
            self._counts.timeouts += result.timed_out
        return result

    def _result(self, call: ToolCall) -> ToolResult:
        function = self.functions.get(call.name)
        if function is None:
            available = ", ".join(self.functions)
            return _failure(call.name, f"unknown tool {call.name!r}; the tools are: {available}")
        # Checked here, not in the worker: a call that cannot bind is the model's mistake, not the tool's.
        try:
            inspect.signature(function).bind(**call.arguments)
        except TypeError as exc:
            return _failure(call.name, f"bad arguments for {call.name}: {exc}")
        try:
            value = self._pools[call.name].run(call.arguments, self.timeout_s)
        except WorkerTimeout:
            return dataclasses.replace(
                _failure(call.name, f"{call.name} timed out after {self.timeout_s:g} s and was stopped"),
                timed_out=True,
            )
        except (WorkerCrashed, WorkerStartError) as exc:
            return _failure(call.name, f"{call.name}: {exc}")
        except Exception as exc:
            return _failure(call.name, f"{type(exc).__name__}: {exc}")
        return ToolResult(message=_tool_message(call.name, _content(value)))


def _loaded(name: str, spec: str) -> Callable[..., Any]:
    try:
        function = load_function(spec)
    except RewardError as exc:
        raise ToolError(f"tool {name!r}: {exc}") from exc
    if not callable(function):
        raise ToolError(f"tool {name!r}: {spec} is a {type(function).__name__}, not a function")
    return function


def _renamed(schema: Schema, name: str) -> Schema:
    return {**schema, "function": {**schema["function"], "name": name}}


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _tool_message(name: str, content: str) -> Message:
    return {"role": "tool", "name": name, "content": content}


def _failure(name: str, text: str) -> ToolResult:
    return ToolResult(message=_tool_message(name, f"error: {text}"), failed=True)
