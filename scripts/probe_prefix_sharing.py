"""The update's shared-prompt forward against one forward per sequence: time, log-probs, LoRA gradients.

The G completions of a group share their prompt; with the quickstart's shapes (41 prompt tokens, 16
completion tokens) about 70% of the positions a forward over prompt + completion computes are
prompt. `rft.models.completion_logprobs` computes each distinct prompt once when given `prompt_rows`
(the update's default, `training.share_prompts`). This probe runs it both ways on the embedded
SmolLM2 with a LoRA adapter:

- full:   every sequence is prompt + completion (`prompt_rows=None`);
- shared: each prompt once, the completions on its keys and values;

and prints the seconds of a forward + backward for each, and how far apart the log-probs and the
LoRA gradients are (they should agree to float32 rounding). With `--packed`, a third way:

- packed: every sequence prompt + completion, without padding, all in one row with position ids
  restarting per sequence (transformers then masks attention block-diagonally);

and with `--min-completion-tokens` the completion lengths spread evenly from that to
`--completion-tokens`, so that the padded ways carry padding.

    RFT_CACHE=/work/cache PYTHONPATH=. python scripts/probe_prefix_sharing.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _gradient_gap(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """The largest per-tensor gradient difference, relative to the reference tensor's norm."""
    return max(
        ((a - b).norm() / a.norm().clamp(min=1e-12)).item() for a, b in zip(reference, other, strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=41)
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-completion-tokens", type=int, help="default: --completion-tokens")
    parser.add_argument("--packed", action="store_true", help="also time padding-free packing")
    args = parser.parse_args(argv)
    names = ("prompts", "group_size", "prompt_tokens", "completion_tokens", "threads", "repeats",
             "min_completion_tokens")
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rft.config import EMBEDDED_MODEL
    from rft.models import causal_lm, completion_logprobs, resolve_model_path

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
    shortest = min(args.min_completion_tokens or completion_len, completion_len)
    lengths = torch.linspace(shortest, completion_len, rows).round().long()
    attention_mask = (torch.arange(input_ids.shape[1]) < prompt_len + lengths[:, None]).long()
    arguments = (model, input_ids, attention_mask, torch.full((rows,), prompt_len), lengths)
    first_rows = torch.arange(rows) // group * group
    lm = causal_lm(model)

    def full() -> torch.Tensor:
        return completion_logprobs(*arguments, temperature=1.0, chunk_size=1024)[0]

    def shared() -> torch.Tensor:
        return completion_logprobs(*arguments, temperature=1.0, chunk_size=1024, prompt_rows=first_rows)[0]

    def head_logprobs(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = lm.get_output_embeddings()(hidden).float()
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)

    def packed() -> torch.Tensor:
        sequences = [input_ids[i, : prompt_len + lengths[i]] for i in range(rows)]
        packed_ids = torch.cat(sequences)[None]
        positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
        # No cache: with one, transformers does not read packed sequences from the position ids.
        outputs = lm.base_model(input_ids=packed_ids, position_ids=positions, use_cache=False)
        hidden = outputs.last_hidden_state[0]
        starts = torch.cumsum(torch.tensor([0] + [len(s) for s in sequences[:-1]]), 0) + prompt_len
        valid = torch.arange(completion_len)[None] < lengths[:, None]
        row, offset = valid.nonzero(as_tuple=True)
        source = starts[row] + offset - 1
        chunks = [
            checkpoint(head_logprobs, hidden[source[i : i + 1024]], packed_ids[0, source[i : i + 1024] + 1],
                       use_reentrant=False)
            for i in range(0, len(source), 1024)
        ]
        return torch.zeros(rows, completion_len).index_put((row, offset), torch.cat(chunks))

    trainable = [p for p in model.parameters() if p.requires_grad]
    results: dict[str, tuple[torch.Tensor, list[torch.Tensor], float]] = {}
    ways: list[tuple[str, Callable[[], torch.Tensor]]] = [("full", full), ("shared", shared)]
    if args.packed:
        ways.append(("packed", packed))
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
    gradient_gap = _gradient_gap(full_grads, shared_grads)
    print(
        f"forward + backward, last of {args.repeats}: full {full_s:.2f} "
        f"s, shared prompt {shared_s:.2f} s ({full_s / shared_s:.2f}x)"
    )
    print(
        f"max |log-prob difference| {(full_logp - shared_logp).abs().max().item():.2e}; "
        f"max relative LoRA gradient difference {gradient_gap:.2e}"
    )
    if args.packed:
        packed_logp, packed_grads, packed_s = results["packed"]
        packed_gap = _gradient_gap(full_grads, packed_grads)
        print(
            f"packed (padding-free, one row) {packed_s:.2f} s ({full_s / packed_s:.2f}x full); max |log-prob "
            f"difference| {(full_logp - packed_logp).abs().max().item():.2e}, gradient {packed_gap:.2e}"
        )
    padded = rows * (prompt_len + completion_len)
    print(f"positions: padded {padded}, packed {int(rows * prompt_len + lengths.sum())}, "
          f"shared {prompts_n * prompt_len + rows * (completion_len - 1)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
