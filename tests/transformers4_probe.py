"""Read exported checkpoints the way transformers 4.51.3 does, and report what it sees.

Runs inside the separate 4.51.3 virtual environment (see tests/transformers4_env.py), so it
imports nothing from rft. Usage: python transformers4_probe.py REQUEST.json OUT_DIR, where
REQUEST.json is {"exports": {name: folder}, "chats": [[{"role", "content"}, ...], ...],
"token_ids": [[int, ...], ...]} (the chats as the trained policy's tokenizer encodes them).
For each export it writes OUT_DIR/<name>.json (transformers version, the config as 4.51.3 reads
it, loading info, and what its tokenizer makes of the chats, or the error loading it) and
OUT_DIR/<name>.npy (next-token logits after each of `token_ids`, float32).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def probe_tokenizer(folder: str, chats: list[list[dict[str, str]]]) -> dict:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError) as exc:
        # Reported, not raised: the tests also probe a plain 5.x save to show what goes wrong.
        return {"tokenizer_error": f"{type(exc).__name__}: {exc}"}
    rendered = [
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats
    ]
    token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "special_tokens_map": tokenizer.special_tokens_map,
        "eos_token_id": tokenizer.eos_token_id,
        "rendered_chats": rendered,
        "token_ids": token_ids,
        "plain_token_ids": tokenizer("Hello world, 7 + 5 = 12.")["input_ids"],
        "decoded": tokenizer.decode(token_ids[0]),
    }


def probe(
    folder: str, chats: list[list[dict[str, str]]], token_ids: list[list[int]]
) -> tuple[dict, numpy.ndarray]:
    config = AutoConfig.from_pretrained(folder)
    model, loading_info = AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype="auto", output_loading_info=True
    )
    model.eval()
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy() for ids in token_ids]
    report = {
        "transformers_version": transformers.__version__,
        "config": config.to_dict(),
        "model_class": type(model).__name__,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "missing_keys": sorted(loading_info["missing_keys"]),
        "unexpected_keys": sorted(loading_info["unexpected_keys"]),
        "mismatched_keys": [list(map(str, item)) for item in loading_info["mismatched_keys"]],
        **probe_tokenizer(folder, chats),
    }
    return report, numpy.stack(logits)


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, folder in request["exports"].items():
        try:
            report, logits = probe(folder, request["chats"], request["token_ids"])
        except Exception as exc:  # reported per export: the tests also probe checkpoints expected to break
            report, logits = {"error": f"{type(exc).__name__}: {exc}"}, None
        (out_dir / f"{name}.json").write_text(json.dumps(report, default=str))
        if logits is not None:
            numpy.save(out_dir / f"{name}.npy", logits)


if __name__ == "__main__":
    main()
