"""How much memory the colocated vLLM engine takes: a KV cache sized to the run, or vLLM's own share.

Pure arithmetic over the recipe and the model's config (no vLLM, no torch), so it is tested without
either. Why an explicit size: vLLM sizes its KV cache from `gpu_memory_utilization`, and on CPU
that share is of the NUMA node's RAM *less the whole process's resident memory*. The training
process already holds the policy (and its reference, optimizer, data) when the engine starts, so on
a 13 GiB node a 0.3 share left -0.4 GiB for the KV cache and vLLM refused to start. The run knows
what it needs: at most `max_num_seqs` sequences of at most `max_model_len` tokens at a time.

Precedence: a recipe that sets `rollout.vllm_gpu_memory_utilization` gets vLLM's own sizing from
that share (the behaviour before); otherwise the KV cache is sized to the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rft.config import RecipeConfig, RolloutConfig

GIB = 1024**3
# Tokens per KV block when sizing: a multiple of every block size vLLM picks for these models (16 on
# CUDA, 128 on CPU, up to 256), so each sequence's last, partly used block is paid for in full.
KV_BLOCK_TOKENS = 256
# Sequences vLLM runs at once, at most (its largest default, on 70+ GiB GPUs); a larger batch
# waits its turn. vLLM also needs max_num_batched_tokens (4096 on CPU, 8192+ on CUDA) >= this.
MAX_NUM_SEQS = 1024


@dataclass(frozen=True)
class EngineMemory:
    """The vLLM engine's memory: `kv_cache_bytes` sized to the run, or vLLM's sizing from `share`.

    Exactly one of `kv_cache_bytes` and `share` is set; `max_num_seqs` caps the sequences vLLM
    schedules at once (more wait their turn), so a KV cache sized for them never runs short.
    """

    max_num_seqs: int
    max_model_len: int
    kv_cache_bytes: int | None = None
    share: float | None = None

    def remedy(self) -> str:
        """What a recipe changes when the engine does not fit."""
        if self.kv_cache_bytes is None:
            return "change rollout.vllm_gpu_memory_utilization, or leave it unset to size the KV cache"
        return (
            "the KV cache holds training.prompts_per_step x rollout.group_size sequences (or an evaluation "
            "batch) at full context: lower them or the context (rollout.vllm_max_model_len)"
        )

    def describe(self) -> str:
        """One phrase for the start log and start errors."""
        if self.kv_cache_bytes is None:
            return f"memory share {self.share:.2f}, up to {self.max_num_seqs} sequences"
        return (
            f"KV cache {self.kv_cache_bytes / GIB:.2f} GiB for {self.max_num_seqs} sequences "
            f"x {self.max_model_len} tokens"
        )


def kv_bytes_per_token(text_config: Any, dtype_bytes: int) -> int:
    """Keys and values of one token over all layers: 2 x layers x KV heads x head size x dtype bytes.

    `text_config` is a transformers config (a multimodal model's text part). An upper bound for
    models whose layers keep less (sliding-window layers, latent attention).
    """
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def kv_cache_bytes(*, max_num_seqs: int, max_model_len: int, bytes_per_token: int) -> int:
    """A KV cache that holds `max_num_seqs` sequences of `max_model_len` tokens at once."""
    blocks_per_sequence = math.ceil(max_model_len / KV_BLOCK_TOKENS)
    # One block more: vLLM's block pool holds one back as its null block.
    blocks = max_num_seqs * blocks_per_sequence + 1
    return blocks * KV_BLOCK_TOKENS * bytes_per_token


def context_length(config: RecipeConfig, longest_prompt: int | None = None) -> int:
    """vLLM's context: `rollout.vllm_max_model_len`, else the longest prompt plus the longest completion.

    `longest_prompt`: the run's longest prompt in tokens, when its prompts are known (they are fixed,
    and `data.max_prompt_length` is only a cap: 512 against the quickstart's 40 made the KV cache 10x
    what the run uses); else the cap."""
    longest_completion = max(config.rollout.max_new_tokens, config.eval.max_new_tokens or 0)
    if config.is_agent:  # an episode's last turn starts at most a budget after the prompt
        longest_completion += config.rollout.trajectory_tokens
    capped = config.data.max_prompt_length + longest_completion
    if config.rollout.vllm_max_model_len:
        return config.rollout.vllm_max_model_len
    if not longest_prompt:
        return capped
    # Whole KV blocks cost the same as part of one: the room up to the block's end is free, and it
    # lets a whole sequence be scored (teacher-forced, one more token asked for) as well as sampled.
    blocks = math.ceil((longest_prompt + longest_completion + 1) / KV_BLOCK_TOKENS)
    return min(blocks * KV_BLOCK_TOKENS, capped)


def concurrent_sequences(config: RecipeConfig, samplers: int = 1, evaluates: bool = True) -> int:
    """The most sequences one engine's `generate` call asks for: a training step's share or, when the
    engine `evaluates`, an evaluation batch.

    A step samples `group_size` completions for each of `prompts_per_step` prompts, split over
    `samplers` engines (one per process, or per tensor-parallel group: the largest share is rounded
    up; dynamic sampling's extra rounds come one after another); every process evaluates on its own,
    so evaluation is not split: it samples up to `samples_per_prompt` completions
    (an upper bound: a greedy pass takes one) for each prompt of a batch of at most `max_eval_rows`.
    """
    training = math.ceil(config.training.prompts_per_step / samplers) * config.rollout.group_size
    if not evaluates:
        return training
    eval_prompts = [config.eval.batch_size]
    if config.data.max_eval_rows is not None:
        eval_prompts.append(config.data.max_eval_rows)
    if config.data.eval is None:
        eval_prompts.append(config.data.eval_size)
    return max(training, min(eval_prompts) * config.eval.samples_per_prompt)


def memory_share(rollout: RolloutConfig) -> float | None:
    """The share the recipe sets, or None when it leaves the field alone (then the KV cache is sized)."""
    return rollout.vllm_gpu_memory_utilization


def startup_share(memory: EngineMemory, weight_bytes: int, device_bytes: int) -> float:
    """The `gpu_memory_utilization` handed to vLLM: the recipe's share, else weights + KV cache of the device.

    With an explicit KV size vLLM-CPU reads no share; vLLM on CUDA still checks at start that the
    device's free memory covers the share, so the share asks for what the engine will hold.
    """
    if memory.share is not None:
        return memory.share
    needed = weight_bytes + (memory.kv_cache_bytes or 0)
    # Rounded up, so the check asks for no less than `needed`; vLLM takes shares in (0, 1].
    return min(1.0, max(0.01, math.ceil(needed / device_bytes * 1000) / 1000))


def engine_memory(
    config: RecipeConfig, text_config: Any, dtype_bytes: int, samplers: int = 1,
    longest_prompt: int | None = None, evaluates: bool = True,
) -> EngineMemory:
    """The recipe's vLLM memory for a model with this transformers config and dtype size, for one of
    `samplers` engines that share a step's prompts (`longest_prompt`: see `context_length`; `evaluates`:
    see `concurrent_sequences`)."""
    max_num_seqs = min(concurrent_sequences(config, samplers, evaluates), MAX_NUM_SEQS)
    max_model_len = context_length(config, longest_prompt)
    share = memory_share(config.rollout)
    if share is not None:
        return EngineMemory(max_num_seqs=max_num_seqs, max_model_len=max_model_len, share=share)
    size = kv_cache_bytes(
        max_num_seqs=max_num_seqs, max_model_len=max_model_len,
        bytes_per_token=kv_bytes_per_token(text_config, dtype_bytes),
    )
    return EngineMemory(max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_cache_bytes=size)
