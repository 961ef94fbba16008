"""One input record as (messages, trailing reply, other fields): chat records and Bedrock invocation logs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rft.rendered_chat import unrender

# (messages, the trailing reply or None, every other field) of one record.
Parsed = tuple[list[dict[str, str]], str | None, dict[str, Any]]


class Malformed(ValueError):
    """A record that cannot become a training row; the message says why."""


class FailedInvocation(Exception):
    """A logged call that failed (throttled, invalid, timed out): no reply, nothing to learn from."""

    def __init__(self, error_code: str):
        super().__init__(error_code)
        self.error_code = error_code


@dataclass
class Row:
    messages: list[dict[str, str]]
    reply: str | None
    fields: dict[str, Any]
    source: str  # file:line



def _text(content: Any) -> str:
    """Text of a content value: a string, or parts `{"text"}` / `{"type": "text", "text"}`; other
    parts (images, documents, tool use) make the record unsupported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise Malformed(f"unsupported non-text content part ({_part_kind(part)})")
        return "".join(texts)
    raise Malformed(f"message content is {type(content).__name__}, expected text")


def _part_kind(part: Any) -> str:
    if isinstance(part, Mapping) and part:
        return str(part.get("type") or next(iter(part), "?"))
    return type(part).__name__


def _messages(raw: Any, system: Any = None) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise Malformed("messages: expected a non-empty list")
    messages = []
    if system:
        system_text = system if isinstance(system, str) else _text(system)
        if system_text.strip():
            messages.append({"role": "system", "content": system_text})
    for index, message in enumerate(raw):
        if not isinstance(message, Mapping) or "role" not in message:
            raise Malformed(f"messages[{index}]: expected an object with role and content")
        role = str(message["role"])
        if role not in ("system", "user", "assistant"):
            raise Malformed(f"messages[{index}].role: {role!r} (tool turns are not supported)")
        messages.append({"role": role, "content": _text(message.get("content", ""))})
    return messages


def _prompt_messages(prompt: str, model_id: Any = None) -> list[dict[str, str]]:
    """A text prompt as messages: a rendered chat prompt unwrapped, plain text as one user turn."""
    try:
        turns = unrender(prompt, model_id if isinstance(model_id, str) else None)
    except ValueError as exc:
        raise Malformed(str(exc)) from None
    return [{"role": "user", "content": prompt}] if turns is None else _messages(turns)


def _invocation_output(body: Any) -> str | None:
    """The model's reply text in an invocation-log output body, for the body shapes Bedrock logs."""
    if not isinstance(body, Mapping):
        return None
    message = body.get("output", {}).get("message") if isinstance(body.get("output"), Mapping) else None
    if isinstance(message, Mapping):  # Converse, Nova
        return _text(message.get("content", []))
    if isinstance(body.get("content"), list):  # Anthropic messages
        return _text([part for part in body["content"]
                      if isinstance(part, Mapping) and part.get("type", "text") == "text"])
    if isinstance(body.get("generation"), str):  # Llama
        return body["generation"]
    if isinstance(body.get("completion"), str):  # Anthropic text completions (Claude 2)
        return body["completion"].strip()
    if isinstance(body.get("outputs"), list) and body["outputs"]:  # Mistral
        return str(body["outputs"][0].get("text", ""))
    if isinstance(body.get("results"), list) and body["results"]:  # Titan
        return str(body["results"][0].get("outputText", ""))
    if isinstance(body.get("choices"), list) and body["choices"]:  # OpenAI-compatible
        return _text(body["choices"][0].get("message", {}).get("content", ""))
    return None


def _from_invocation_log(record: Mapping[str, Any]) -> Parsed:
    if record.get("errorCode"):
        raise FailedInvocation(str(record["errorCode"]))
    model_input = record.get("input") or {}
    body = model_input.get("inputBodyJson")
    if body is None:
        if model_input.get("inputBodyS3Path"):
            raise Malformed("input body stored in S3 (inputBodyS3Path): download it next to the log first")
        raise Malformed("invocation log without input.inputBodyJson")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as exc:
            raise Malformed(f"input.inputBodyJson is not JSON: {exc.msg}") from None
    if "messages" in body:
        messages = _messages(body["messages"], body.get("system"))
    elif isinstance(body.get("prompt"), str):
        messages = _prompt_messages(body["prompt"], record.get("modelId"))
    elif isinstance(body.get("inputText"), str):
        messages = [{"role": "user", "content": body["inputText"]}]
    else:
        raise Malformed(f"unsupported input body for {record.get('modelId', 'an unknown model')} (keys "
                        f"{sorted(body)[:6]})")
    output = (record.get("output") or {}).get("outputBodyJson")
    reply = _invocation_output(output) if output is not None else None
    fields = {
        "id": record.get("requestId"),
        "source_model": record.get("modelId"),
        "timestamp": record.get("timestamp"),
    }
    metadata = record.get("requestMetadata")
    if isinstance(metadata, Mapping):
        fields["_tags"] = dict(metadata)
    return messages, reply, fields


def parse_record(record: Any) -> Parsed:
    """(messages, trailing reply or None, other fields) of one input record; raises Malformed."""
    if not isinstance(record, Mapping):
        raise Malformed(f"expected a JSON object, got {type(record).__name__}")
    if record.get("schemaType") == "ModelInvocationLog" or ("modelId" in record and "input" in record):
        messages, reply, fields = _from_invocation_log(record)
    elif "messages" in record:
        messages = _messages(record["messages"], record.get("system"))
        reply = None
        fields = {k: v for k, v in record.items() if k not in ("messages", "system")}
    elif "prompt" in record:
        prompt = record["prompt"]
        messages = _prompt_messages(prompt) if isinstance(prompt, str) else _messages(prompt)
        reply = record.get("completion") if isinstance(record.get("completion"), str) else None
        fields = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    else:
        raise Malformed("no `messages`, `prompt` or invocation-log fields")
    while messages and messages[-1]["role"] == "assistant":
        trailing = messages.pop()
        reply = trailing["content"] if reply is None else reply
    if not any(message["role"] == "user" for message in messages):
        raise Malformed("no user message")
    return messages, reply, fields


