"""Training and held-out rows: read, validate, turn into prompts, tokenize, check lengths.

Accepted rows (DESIGN.md section 4):
- Bedrock RFT: {"messages": [{"role": "system"|"user", "content": ...}, ...], "reference_answer": ..., ...}
- TRL: {"prompt": "text" | [messages], ...columns}
- verl / SageMaker RLVR: {"data_source", "prompt": [messages], "ability",
  "reward_model": {"ground_truth": ...}, "extra_info"}; `reward_model.ground_truth` also reaches
  rewards as `reference_answer` (unless the row has one)
- any of these as .jsonl, .json, or .parquet
- anything else through `data.column_map` and `data.prompt_template`.
Every other field is metadata: it reaches reward functions as a column and serves as an evaluation slice.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft.config import DataConfig
from rft.jsonl import JSONLError, read_objects

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]


class DataError(ValueError):
    """Bad input rows; the message names the file, the line and the field."""


@dataclass
class Example:
    """One prompt ready for sampling: what the model sees and what rewards see."""

    prompt: str | Messages
    prompt_ids: list[int]
    row: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        return [(line.where, line.value) for line in read_objects(path)]
    except JSONLError as exc:
        raise DataError(str(exc)) from None


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    # Imported here, as `datasets` below: heavy, and only these sources need them.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return [(f"{path}[{i}]", row) for i, row in enumerate(table.to_pylist())]


def read_rows(source: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows as (location, dict): a .jsonl/.json/.parquet file, a `save_to_disk` folder, or
    `hf:name[:config]`."""
    path = Path(source)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DataError(f"{source}: data file not found")
        return _read_parquet(path)
    if path.suffix == ".jsonl" or (path.is_file() and path.suffix != ".json"):
        if not path.is_file():
            raise DataError(f"{source}: data file not found")
        return _read_jsonl(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise DataError(f"{source}: data file not found")
        try:
            payload = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: not UTF-8 (at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{source}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(payload, list):
            raise DataError(f"{source}: a .json data file holds a list of objects")
        for i, row in enumerate(payload):
            if not isinstance(row, dict):
                raise DataError(f"{source}[{i}]: expected a JSON object, got {type(row).__name__}")
        return [(f"{source}[{i}]", row) for i, row in enumerate(payload)]
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    elif source.startswith("hf:"):
        name, _, config_name = source[3:].partition(":")
        dataset = datasets.load_dataset(name, config_name or None)
    else:
        raise DataError(f"{source}: not a .jsonl/.json/.parquet file, a saved dataset folder, or hf:<dataset "
                        "id>")
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{source}: no split {split!r} (has {sorted(dataset)})")
        dataset = dataset[split]
    return [(f"{source}[{i}]", dict(row)) for i, row in enumerate(dataset)]


def _check_messages(messages: Any, where: str, name: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of messages")
    messages = list(messages)  # normalised below; the row keeps what the file holds
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field '{name}[{i}]' needs 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: field '{name}[{i}].role' is {message['role']!r}; allowed: system, "
                            "user, assistant, tool")
        messages[i] = {**message, "content": _content_text(message["content"], where, f"{name}[{i}].content")}
    # Bedrock RFT rows may end with a reference assistant turn; the policy must write that turn itself.
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f"{where}: field '{name}' has no system or user message")
    return messages


def _content_text(content: Any, where: str, field_name: str) -> str:
    """A message's text: a string, or OpenAI-style content parts of type text (joined); anything else is an
    error."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        texts = [part.get("text") for part in content]
        if all(isinstance(text, str) for text in texts):
            return "".join(texts)
    if isinstance(content, list):
        kinds = sorted({str(part.get("type")) if isinstance(part, dict) else type(part).__name__
                        for part in content})
        raise DataError(f"{where}: field '{field_name}' holds parts {kinds}; only text parts ({{'type': "
                        "'text', 'text': ...}) can be trained on")
    raise DataError(f"{where}: field '{field_name}' is "
                    f"{type(content).__name__ if content is not None else 'null'}; "
                    "a message's content is text")


def build_prompt(row: dict[str, Any], config: DataConfig, where: str) -> str | Messages:
    """The prompt of a row: chat messages (rendered later with the chat template) or plain text."""
    if "messages" in row:
        prompt: str | Messages = _check_messages(row["messages"], where, "messages")
    elif row.get("prompt", "") is None:
        # A Parquet (or datasets) column holds every row's key: a missing prompt reads as null.
        raise DataError(f"{where}: field 'prompt' is empty (null); each row needs a prompt (text or "
                        "messages)")
    elif "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = _check_messages(prompt, where, "prompt")
        elif not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt' must be a string or a list of messages")
    elif config.prompt_template is not None:
        try:
            prompt = config.prompt_template.format(**row)
        except KeyError as exc:
            raise DataError(f"{where}: data.prompt_template needs field {exc.args[0]!r}; row has "
                            f"{sorted(row)}") from None
    else:
        raise DataError(
            f"{where}: no 'messages' or 'prompt' field (row has {sorted(row)}); "
            "map one with data.column_map or set data.prompt_template"
        )
    if isinstance(prompt, str) and config.use_chat_template:
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and config.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": config.system_prompt}, *prompt]
    return prompt


def tokenize_prompt(prompt: str | Messages, tokenizer: Any,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Prompt token ids; `template_kwargs` (data.chat_template_kwargs) are variables the chat template
    reads."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(
            prompt, tokenize=True, add_generation_prompt=True, return_dict=False, **(template_kwargs or {})
        ))
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _jinja_literal(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_jinja_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_jinja_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def template_with_defaults(template: str | dict[str, str] | None, template_kwargs: dict[str, Any]) -> Any:
    """The chat template with `template_kwargs` as defaults a request can still override.

    Servers that render the tokenizer's own template (vLLM and so SageMaker LMI, Bedrock Custom Model
    Import, transformers) then prompt the model as it was trained, with no serving flag to set.
    """
    if not template or not template_kwargs:
        return template
    if isinstance(template, dict):
        return {name: template_with_defaults(text, template_kwargs) for name, text in template.items()}
    header = "".join(
        f"{{%- if {name} is not defined %}}{{%- set {name} = {_jinja_literal(value)} %}}{{%- endif %}}"
        for name, value in template_kwargs.items()
    )
    return header + template


def _with_verl_fields(row: dict[str, Any]) -> dict[str, Any]:
    """verl / SageMaker RLVR rows: the ground truth also as `reference_answer`, which Bedrock rewards read."""
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and "ground_truth" in reward_model and "reference_answer" not in row:
        return {**row, "reference_answer": reward_model["ground_truth"]}
    return row


def prepare_examples(
    rows: list[tuple[str, dict[str, Any]]], config: DataConfig, tokenizer: Any | None, label: str
) -> list[Example]:
    """Validate every row first (cheap, all errors before heavy work), then tokenize and length-check."""
    prepared: list[tuple[str, dict[str, Any], str | Messages]] = []
    for where, raw_row in rows:
        row = _with_verl_fields({config.column_map.get(key, key): value for key, value in raw_row.items()})
        prepared.append((where, row, build_prompt(row, config, where)))
    if tokenizer is None:
        return [Example(prompt=prompt, prompt_ids=[], row=row, source=where)
                for where, row, prompt in prepared]
    examples = []
    dropped = 0
    for where, row, prompt in prepared:
        prompt_ids = tokenize_prompt(prompt, tokenizer, config.chat_template_kwargs)
        if len(prompt_ids) > config.max_prompt_length:
            dropped += 1
            continue
        examples.append(Example(prompt=prompt, prompt_ids=prompt_ids, row=row, source=where))
    if dropped:
        logger.warning(
            "%s: dropped %d of %d prompts longer than data.max_prompt_length=%d tokens",
            label, dropped, len(prepared), config.max_prompt_length,
        )
    if not examples:
        too_long = f"all {len(prepared)} longer than data.max_prompt_length={config.max_prompt_length} tokens"
        reason = too_long if prepared else "no rows"
        raise DataError(f"{label}: no usable prompts ({reason})")
    return examples


def count_train_rows(config: DataConfig) -> int:
    """Training rows before length checks (what Bedrock counts): the file's, less held-out rows, capped."""
    rows = len(read_rows(config.train, config.train_split))
    if not config.eval:
        rows = max(0, rows - config.eval_size)
    return min(rows, config.max_train_rows) if config.max_train_rows else rows


def load_splits(config: DataConfig, tokenizer: Any | None, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples. Without `data.eval`, `eval_size` rows are held out from train (seeded).

    Held-out rows are empty only when none are configured (no `data.eval`, `eval_size` 0). A
    `data.eval` without rows, or whose prompts are all too long, is an error naming the file.
    """
    train_rows = read_rows(config.train, config.train_split)
    if not train_rows:
        raise DataError(f"{config.train}: data.train holds no rows")
    if config.eval:
        eval_rows = read_rows(config.eval, config.eval_split)
        if not eval_rows:
            # A mistake, not a choice: the run would go on and silently report no held-out scores.
            raise DataError(f"{config.eval}: data.eval holds no rows (leave data.eval out to run without "
                            "evaluation)")
    else:
        shuffled = list(train_rows)
        random.Random(seed).shuffle(shuffled)
        eval_rows, train_rows = shuffled[: config.eval_size], shuffled[config.eval_size :]
    if config.max_train_rows:
        train_rows = train_rows[: config.max_train_rows]
    if config.max_eval_rows:
        eval_rows = eval_rows[: config.max_eval_rows]
    train = prepare_examples(train_rows, config, tokenizer, f"train ({config.train})")
    held_out_label = f"held-out ({config.eval or config.train})"
    held_out = prepare_examples(eval_rows, config, tokenizer, held_out_label) if eval_rows else []
    return train, held_out


class PromptSampler:
    """Endless, seeded stream of training examples; its position is part of a checkpoint."""

    def __init__(self, examples: list[Example], seed: int, shuffle: bool):
        self.examples = examples
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._epoch = -1
        self._order: list[int] = []

    def take(self, count: int) -> list[Example]:
        batch = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.examples))
            if epoch != self._epoch:
                self._epoch, self._order = epoch, list(range(len(self.examples)))
                if self.shuffle:
                    random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            batch.append(self.examples[self._order[index]])
            self.position += 1
        return batch
