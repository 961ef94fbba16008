"""Prompts with a chat template already applied, turned back into messages.

Bedrock's `InvokeModel` takes Llama and Mistral prompts (and Claude 2's text completions) as one string
in the model's own chat format, and the invocation log keeps that string. The trainer renders prompts
with the policy's chat template, so a rendered prompt kept verbatim would be templated twice, control
tokens and all. `unrender` reads the formats Bedrock documents for those models, and ChatML:

- Llama 3: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>`; Llama 4 the
  same with `<|header_start|>`, `<|header_end|>`, `<|eot|>`; ChatML `<|im_start|>user\\n...<|im_end|>`
  (Qwen and other models brought in with Custom Model Import);
- Llama 2 and Mistral: `<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n... [/INST] reply </s><s>[INST] ... [/INST]`;
- Anthropic text completions (`\\n\\nHuman: ...\\n\\nAssistant:`), for Anthropic model ids only,
  since a plain prompt may quote such a dialogue.

A trailing empty assistant turn (the generation prompt) is dropped. Any other chat-template control
token (Gemma's `<start_of_turn>`, DeepSeek's `<｜User｜>`, Phi's `<|user|>`...) raises ValueError
rather than reaching training as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTROL_TOKEN = re.compile(
    r"<\|[A-Za-z][\w.-]*\|>|<｜[^｜\n]{1,40}｜>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>"
)


@dataclass(frozen=True)
class _HeaderFormat:
    """A format whose turns are `opener role close` content `end of turn`, after an optional `begin`."""

    name: str
    begin: str
    opener: str
    turn: re.Pattern[str]


_HEADER_FORMATS = (
    _HeaderFormat("Llama 3", "<|begin_of_text|>", "<|start_header_id|>", re.compile(
        r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n*(.*?)(?:<\|eot_id\|>|\Z)", re.S)),
    _HeaderFormat("Llama 4", "<|begin_of_text|>", "<|header_start|>", re.compile(
        r"<\|header_start\|>(\w+)<\|header_end\|>\n*(.*?)(?:<\|eot\|>|\Z)", re.S)),
    _HeaderFormat("ChatML", "", "<|im_start|>", re.compile(
        r"<\|im_start\|>(\w+)\n?(.*?)(?:<\|im_end\|>|\Z)", re.S)),
)
_INST = re.compile(r"\[INST\](.*?)\[/INST\]((?:(?!\[INST\]).)*)", re.S)
_SYS = re.compile(r"\s*<<SYS>>\n?(.*?)\n?<</SYS>>\s*", re.S)
_HUMAN_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):", re.S)


def _header_turns(prompt: str, spec: _HeaderFormat) -> list[dict[str, str]]:
    position = len(spec.begin) if prompt.startswith(spec.begin) else 0
    turns = []
    while position < len(prompt):
        match = spec.turn.match(prompt, position)
        if match is None:
            if prompt[position:].strip():
                raise ValueError(f"{spec.name} prompt: unexpected text at character {position}: "
                                 f"{prompt[position:position + 30]!r}")
            break
        turns.append({"role": match.group(1), "content": match.group(2).strip()})
        position = match.end()
        while position < len(prompt) and prompt[position].isspace():
            position += 1
    return turns


def _inst_turns(prompt: str) -> list[dict[str, str]]:
    text = re.sub(r"</?s>", "", prompt).strip()
    turns: list[dict[str, str]] = []
    position = 0
    for match in _INST.finditer(text):
        if text[position : match.start()].strip():
            raise ValueError(f"[INST] prompt: text outside [INST] ... [/INST] at character {position}")
        user = match.group(1)
        system = _SYS.match(user)
        if system and not turns:
            turns.append({"role": "system", "content": system.group(1).strip()})
            user = user[system.end() :]
        turns.append({"role": "user", "content": user.strip()})
        turns.append({"role": "assistant", "content": match.group(2).strip()})
        position = match.end()
    if not turns or text[position:].strip():
        raise ValueError("[INST] prompt: unbalanced [INST] / [/INST]")
    return turns


def _human_turns(prompt: str) -> list[dict[str, str]]:
    pieces = _HUMAN_TURN.split(prompt)  # [system, role, content, role, content, ...]
    turns = [{"role": "system", "content": pieces[0].strip()}] if pieces[0].strip() else []
    for role, content in zip(pieces[1::2], pieces[2::2], strict=True):
        turns.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return turns


def unrender(prompt: str, model_id: str | None = None) -> list[dict[str, str]] | None:
    """The messages of a rendered chat prompt (see the module docstring), or None for a plain prompt.
    Raises ValueError for control tokens of no known format or a broken known one."""
    stripped = prompt.lstrip()
    turns: list[dict[str, str]] | None = None
    spec = next((spec for spec in _HEADER_FORMATS if spec.opener in stripped), None)
    if spec is not None:
        turns = _header_turns(stripped, spec)
    if turns is None and "[INST]" in stripped:
        turns = _inst_turns(stripped)
    # "anthropic." also matches the cross-region profiles (us.anthropic.*).
    if turns is None and "anthropic." in (model_id or "") and "Human:" in stripped:
        turns = _human_turns(prompt)
    if turns is None:
        token = _CONTROL_TOKEN.search(prompt)
        if token:
            raise ValueError(f"prompt holds the chat-template token {token.group()!r} of no format rft "
                             "reads; give the conversation as messages instead")
        return None
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # the generation prompt
    for turn in turns:
        token = _CONTROL_TOKEN.search(turn["content"])
        if token:
            raise ValueError(f"rendered prompt: {token.group()!r} inside a {turn['role']} turn (a broken "
                             "template)")
    return turns
