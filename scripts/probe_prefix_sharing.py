"""The update's shared-prompt forward against one forward per sequence: time, log-probs, LoRA gradients.

The G completions of a group share their prompt; with the quickstart's shapes (41 prompt tokens, 16
completion tokens) about 70% of the positions a forward over prompt + completion computes are
prompt. `rft.models.completion_logprobs` computes each distinct prompt once when given `prompt_rows`
(the update's default, `training.share_prompts`). This probe runs it both ways on the embedded
SmolLM2 with a LoRA adapter:

- full:   every sequence is prompt + completion (`prompt_rows=None`);
- shared: each prompt once, the completions on its keys and values;

and prints the seconds of a forward + backward for each, and how far apart the log-probs and the
LoRA gradients are (they should agree to float32 rounding).

    RFT_CACHE=/work/cache PYTHONPATH=. python scripts/probe_prefix_sharing.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=41)
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("prompts", "group_size", "prompt_tokens", "completion_tokens", "threads", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rft.config import EMBEDDED_MODEL
    from rft.models import completion_logprobs, resolve_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(EMBEDDED_MODEL), dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    # A trained-looking adapter: B = 0 at initialisation would leave half the gradients trivially zero.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    prompts_n, group, prompt_len, completion_len = (
        args.prompts, args.group_size, args.prompt_tokens, args.completion_tokens
    )
    rows = prompts_n * group
    prompts = torch.randint(100, 40000, (prompts_n, prompt_len)).repeat_interleave(group, dim=0)
    input_ids = torch.cat([prompts, torch.randint(100, 40000, (rows, completion_len))], dim=1)
    arguments = (
        model, input_ids, torch.ones_like(input_ids), torch.full((rows,), prompt_len),
        torch.full((rows,), completion_len),
    )
    first_rows = torch.arange(rows) // group * group

    def full() -> torch.Tensor:
        return completion_logprobs(*arguments, temperature=1.0, chunk_size=1024)[0]

    def shared() -> torch.Tensor:
        return completion_logprobs(*arguments, temperature=1.0, chunk_size=1024, prompt_rows=first_rows)[0]

    trainable = [p for p in model.parameters() if p.requires_grad]
    results: dict[str, tuple[torch.Tensor, list[torch.Tensor], float]] = {}
    ways: list[tuple[str, Callable[[], torch.Tensor]]] = [("full", full), ("shared", shared)]
    for _ in range(args.repeats):
        for name, forward in ways:
            model.zero_grad()
            start = time.perf_counter()
            logprobs = forward()
            logprobs.sum().backward()
            seconds = time.perf_counter() - start
            results[name] = (logprobs.detach(), [p.grad.clone() for p in trainable], seconds)
    (full_logp, full_grads, full_s), (shared_logp, shared_grads, shared_s) = (
        results["full"], results["shared"]
    )
    gradient_gap = max(
        ((a - b).norm() / a.norm().clamp(min=1e-12)).item()
        for a, b in zip(full_grads, shared_grads, strict=True)
    )
    print(
        f"forward + backward, last of {args.repeats}: full {full_s:.2f} "
        f"s, shared prompt {shared_s:.2f} s ({full_s / shared_s:.2f}x)"
    )
    print(
        f"max |log-prob difference| {(full_logp - shared_logp).abs().max().item():.2e}; "
        f"max relative LoRA gradient difference {gradient_gap:.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
