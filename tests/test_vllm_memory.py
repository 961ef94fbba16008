"""The vLLM engine's memory, sized to the run from the recipe and the model's config (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from rft.config import load_config
from rft.rollout.vllm_memory import (
    GIB,
    KV_BLOCK_TOKENS,
    MAX_NUM_SEQS,
    EngineMemory,
    concurrent_sequences,
    context_length,
    engine_memory,
    kv_bytes_per_token,
    kv_cache_bytes,
    startup_share,
)
from tests.conftest import tiny_recipe

# The embedded SmolLM2-135M: 30 layers, 3 KV heads of 64.
SMOLLM2 = SimpleNamespace(
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576
)


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer() -> None:
    assert kv_bytes_per_token(SMOLLM2, dtype_bytes=4) == 2 * 30 * 3 * 64 * 4 == 46_080
    # Without num_key_value_heads (multi-head attention) or head_dim (hidden size / heads).
    plain = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=256)
    assert kv_bytes_per_token(plain, dtype_bytes=2) == 2 * 2 * 4 * 64 * 2


def test_kv_cache_holds_every_sequence_at_full_context_in_whole_blocks() -> None:
    # 520 tokens take 3 blocks of 256; 8 sequences, plus vLLM's null block: 25 blocks.
    assert kv_cache_bytes(max_num_seqs=8, max_model_len=520, bytes_per_token=10) == 25 * KV_BLOCK_TOKENS * 10
    assert kv_cache_bytes(max_num_seqs=1, max_model_len=256, bytes_per_token=1) == 2 * KV_BLOCK_TOKENS


def test_the_run_sets_context_and_concurrent_sequences(tmp_path: Path) -> None:
    raw = tiny_recipe(
        tmp_path, tmp_path / "run", rollout={"group_size": 4, "max_new_tokens": 8},
        training={"prompts_per_step": 3}, data={"max_prompt_length": 100, "max_eval_rows": 5},
        eval={"max_new_tokens": 20, "batch_size": 64, "samples_per_prompt": 2},
    )
    config = load_config(raw=raw)
    assert context_length(config) == 100 + 20
    # Evaluation: min(batch 64, 5 rows) x 2 samples = 10, under a step's 3 x 4 = 12.
    assert concurrent_sequences(config) == 12
    # On 2 engines (processes, or tensor-parallel groups) each samples its share: 2 prompts x 4 > 10.
    assert concurrent_sequences(config, samplers=2) == 10
    config = load_config(raw={**raw, "training": {**raw["training"], "prompts_per_step": 5}})
    assert concurrent_sequences(config, samplers=2) == 3 * 4
    config = load_config(raw={**raw, "training": {**raw["training"], "prompts_per_step": 2}})
    assert concurrent_sequences(config) == 10
    # An engine that never evaluates holds only a step's sequences: 2 prompts x 4.
    assert concurrent_sequences(config, evaluates=False) == 8
    # The run's prompts known: its longest, not the cap, up to the end of its KV block (256 tokens).
    assert context_length(config, longest_prompt=31) == 100 + 20  # the cap is below a block
    long_prompts = load_config(raw={**raw, "data": {**raw["data"], "max_prompt_length": 2000}})
    assert context_length(long_prompts, longest_prompt=31) == KV_BLOCK_TOKENS
    assert context_length(long_prompts, longest_prompt=300) == 2 * KV_BLOCK_TOKENS
    config = load_config(raw={**raw, "rollout": {**raw["rollout"], "vllm_max_model_len": 64}})
    assert context_length(config) == context_length(config, longest_prompt=31) == 64


def test_kv_cache_is_sized_unless_the_recipe_sets_a_share(tmp_path: Path) -> None:
    raw = tiny_recipe(tmp_path, tmp_path / "run", data={"max_prompt_length": 512, "max_eval_rows": 8})
    sized = engine_memory(load_config(raw=raw), SMOLLM2, dtype_bytes=4)
    # 2 prompts x 4 completions < 8 held-out rows; 512 + 6 tokens take 3 blocks.
    assert (sized.max_num_seqs, sized.max_model_len, sized.share) == (8, 518, None)
    assert sized.kv_cache_bytes == (8 * 3 + 1) * KV_BLOCK_TOKENS * 46_080
    assert sized.describe() == "KV cache 0.27 GiB for 8 sequences x 518 tokens"

    shared = engine_memory(
        load_config(raw={**raw, "rollout": {**raw["rollout"], "vllm_gpu_memory_utilization": 0.3}}),
        SMOLLM2, dtype_bytes=4,
    )
    assert (shared.share, shared.kv_cache_bytes) == (0.3, None)
    assert shared.describe() == "memory share 0.30, up to 8 sequences"

    # A larger batch than vLLM runs at once waits its turn: the cache holds MAX_NUM_SEQS sequences.
    large = load_config(raw={**raw, "rollout": {**raw["rollout"], "group_size": 2 * MAX_NUM_SEQS}})
    assert engine_memory(large, SMOLLM2, dtype_bytes=4).max_num_seqs == MAX_NUM_SEQS


@pytest.mark.parametrize(
    ("memory", "share"),
    [
        (EngineMemory(max_num_seqs=1, max_model_len=8, share=0.3), 0.3),
        # Weights and KV cache: 3 of 10 GiB, rounded up to a thousandth.
        (EngineMemory(max_num_seqs=1, max_model_len=8, kv_cache_bytes=2 * GIB), 0.3),
        (EngineMemory(max_num_seqs=1, max_model_len=8, kv_cache_bytes=GIB // 1000), 0.101),
        (EngineMemory(max_num_seqs=1, max_model_len=8, kv_cache_bytes=20 * GIB), 1.0),
    ],
)
def test_startup_share_asks_for_weights_and_kv_cache(memory: EngineMemory, share: float) -> None:
    assert startup_share(memory, weight_bytes=GIB, device_bytes=10 * GIB) == share
