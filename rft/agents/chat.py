"""Token ids of a conversation's turns, from the policy's chat template, each rendered once.

A multi-turn rollout is token-in / token-out: the trajectory is the prompt's ids, then the ids the
model generated, then the ids of what the environment added, and so on. Nothing already in the
trajectory is ever re-tokenized from text (re-tokenizing a decoded turn can give other ids, and the
trainer would then score tokens that were never sampled). Only the environment's messages are
rendered, as the difference between two renderings of a fixed stand-in conversation: one ending
with an assistant turn, and the same with the new messages and the generation prompt appended.

The model ends its turn with an end-of-sequence token; whatever the template writes after that
token (ChatML's newline after `<|im_end|>`) belongs to the environment's ids, not the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rft.agents.tools import template_renders_tools, with_tools_block
from rft.config import ConfigError
from rft.environment import Message

_ANSWER = "rft-stand-in-answer"
# A stand-in conversation that ends with an assistant turn: the environment's messages follow it.
_STAND_IN: list[Message] = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": _ANSWER},
]


class ChatFormat:
    """The policy's chat template, for the prompt and the environment's turns of an episode."""

    def __init__(
        self, tokenizer: Any, template_kwargs: dict[str, Any], tool_schemas: Sequence[dict[str, Any]]
    ):
        self.tokenizer = tokenizer
        self.tool_schemas = list(tool_schemas)
        self.template_takes_tools = bool(self.tool_schemas) and template_renders_tools(tokenizer)
        self.template_kwargs = dict(template_kwargs)
        if self.template_takes_tools:
            self.template_kwargs["tools"] = self.tool_schemas
        before = self._render(_STAND_IN, generation_prompt=False)
        end_text = tokenizer.decode([tokenizer.eos_token_id])
        end = before.rfind(end_text, before.rfind(_ANSWER))
        if end < 0:
            raise ConfigError(
                f"the chat template does not end an assistant turn with the end-of-sequence token "
                f"{end_text!r}: multi-turn rollouts need it to know where the model's turn ends"
            )
        self._before = before
        # What the template writes after the model's end token (ChatML: "\n").
        self._after_end = before[end + len(end_text):]

    def _render(self, messages: list[Message], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
        )

    def prompt_messages(self, messages: list[Message]) -> list[Message]:
        """The first messages as the model sees them: with the tool instructions in the system message
        when the template does not render `tools=` itself."""
        if self.tool_schemas and not self.template_takes_tools:
            return with_tools_block(messages, self.tool_schemas)
        return messages

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The token ids of an episode's first messages, with the generation prompt."""
        text = self._render(self.prompt_messages(messages), generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def turn_ids(self, messages: list[Message]) -> list[int]:
        """The ids that follow a model turn ended by its end-of-sequence token: the template's rest of that
        turn, `messages` (the environment's), and the generation prompt of the model's next turn."""
        after = self._render([*_STAND_IN, *messages], generation_prompt=True)
        if not after.startswith(self._before):
            raise ValueError(
                "the chat template renders earlier turns differently once more messages follow; "
                "environment turns cannot be appended token by token"
            )
        text = self._after_end + after[len(self._before):]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
