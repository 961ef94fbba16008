"""`rft export sagemaker`: the LMI folder (adapter + serving.properties, or the merged model), and
the adapter served by vLLM with LoRA enabled generating what the merged model generates."""

from __future__ import annotations

import argparse
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rft.config import EMBEDDED_MODEL
from rft.export import sagemaker
from rft.export.merge import EMBEDDED_MODEL_HUB_ID, load_policy, locate_policy
from tests.export_fixtures import (
    build_base_model,
    build_lora_run,
    chat_prompt_ids,
    embedded_model_dir,
    next_token_logits,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sagemaker.configure_parser(parser)
    return parser.parse_args(argv)


def export(run_dir: Path, out: Path, *extra: str) -> Path:
    assert sagemaker.run(parse([str(run_dir), "--out", str(out), *extra])) == 0
    return out


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sm-llama")
    return build_lora_run(build_base_model("LlamaForCausalLM", root / "base"), root / "run", rank=12)


def test_adapter_deployment_layout_and_limits(llama_run: Path, tmp_path: Path) -> None:
    out = export(
        llama_run, tmp_path / "lmi", "--adapter-name", "math-v1", "--base-model-id",
        "s3://models/llama-base/", "--tar",
    )
    adapter = out / "adapters" / "math-v1"
    assert sorted(path.name for path in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]
    trained = load_file(llama_run / "final" / "adapter_model.safetensors")
    exported = load_file(adapter / "adapter_model.safetensors")
    assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)
    assert json.loads(
        (adapter / "adapter_config.json").read_text()
    )["base_model_name_or_path"] == "s3://models/llama-base/"

    properties = sagemaker.read_serving_properties(out / "serving.properties")
    assert properties == {
        "engine": "Python",
        "option.model_id": "s3://models/llama-base/",
        "option.rolling_batch": "vllm",
        "option.tensor_parallel_degree": "max",
        "option.enable_lora": "true",
        "option.max_loras": "1",
        # Rank 12 is not a rank vLLM accepts as a limit: the next one up is.
        "option.max_lora_rank": "16",
        "option.max_cpu_loras": "1",
    }
    with tarfile.open(out / "model.tar.gz") as archive:
        members = {
            member.name: archive.extractfile(member).read() for member in archive.getmembers()
            if member.isfile()
        }
    on_disk = {
        path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*")
        if path.is_file() and path.name != "model.tar.gz"
    }
    assert members == on_disk


def test_the_message_says_what_was_written(
    llama_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export(llama_run, tmp_path / "lmi", "--adapter-name", "math-v1", "--base-model-id", "org/base", "--tar")
    printed = capsys.readouterr().out
    assert "merged" not in printed
    assert f"wrote adapter math-v1 (rank 12) for base org/base to {tmp_path / 'lmi'}" in printed
    assert f"packed {tmp_path / 'lmi' / 'model.tar.gz'}: adapters/math-v1/adapter_config.json, " in printed
    assert "serving.properties" in printed.splitlines()[-2]


def test_vllm_rank_limits() -> None:
    assert [sagemaker.vllm_max_lora_rank(rank) for rank in (1, 2, 8, 9, 64, 512)] == [1, 8, 8, 16, 64, 512]
    with pytest.raises(sagemaker.ExportError, match="exceeds vLLM's largest"):
        sagemaker.vllm_max_lora_rank(1024)


def test_merged_deployment_serves_the_policy(
    llama_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = export(
        llama_run, tmp_path / "lmi-merged", "--merged", "--dtype", "float32", "--max-model-len", "2048"
    )
    assert f"wrote the merged model (float32) to {out}" in capsys.readouterr().out
    properties = sagemaker.read_serving_properties(out / "serving.properties")
    assert "option.enable_lora" not in properties and "option.model_id" not in properties
    assert properties["option.max_model_len"] == "2048"
    assert not (out / "adapters").exists()
    prompts = chat_prompt_ids(AutoTokenizer.from_pretrained(str(out)))
    policy = next_token_logits(load_policy(locate_policy(llama_run)), prompts)
    merged = next_token_logits(AutoModelForCausalLM.from_pretrained(str(out)).eval(), prompts)
    assert (merged - policy).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("adapter_edit", "argv", "message"),
    [
        ({}, [], "is a local folder the endpoint cannot see: pass --base-model-id"),
        ({"use_dora": True}, ["--base-model-id", "org/base"], "use_dora: true"),
        ({"modules_to_save": ["lm_head"]}, ["--base-model-id", "org/base"], "modules_to_save"),
        ({"target_parameters": ["gate_up_proj"]}, ["--base-model-id", "org/base"], "target_parameters"),
        ({}, ["--adapter-name", "../escape"], "--adapter-name '../escape'"),
    ],
)
def test_unservable_adapters_are_refused_before_writing(
    llama_run: Path, tmp_path: Path, adapter_edit: dict, argv: list[str], message: str,
    capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run_dir = shutil.copytree(llama_run, tmp_path / "run")
    config_path = run_dir / "final" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **adapter_edit}))
    assert sagemaker.run(parse([str(run_dir), "--out", str(tmp_path / "out"), *argv])) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_the_adapter_as_the_merged_model_generates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("vllm")
    base_dir = embedded_model_dir()
    # Small random lora_B: the answers change but stay fluent, so greedy decoding has clear winners.
    run_dir = build_lora_run(base_dir, tmp_path / "run", base_model_name=EMBEDDED_MODEL, lora_b_std=0.02)
    deployment = export(run_dir, tmp_path / "lmi", "--adapter-name", "math")
    properties = sagemaker.read_serving_properties(deployment / "serving.properties")
    assert properties["option.model_id"] == EMBEDDED_MODEL_HUB_ID
    merged_dir = export(run_dir, tmp_path / "lmi-merged", "--merged", "--dtype", "float32")

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    prompts = chat_prompt_ids(tokenizer)
    new_tokens = 24
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        merged_greedy = [
            merged.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False
            )[0, len(ids):].tolist()
            for ids in prompts
        ]

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    # The container's vLLM gets the same limits from serving.properties; the base is the local copy
    # of the model option.model_id names (no hub here).
    llm = LLM(
        model=str(base_dir),
        enable_lora=True,
        max_lora_rank=int(properties["option.max_lora_rank"]),
        max_loras=int(properties["option.max_loras"]),
        max_model_len=512,
        enforce_eager=True,
        gpu_memory_utilization=0.25,
        dtype="float32",
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=False)
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    adapter = LoRARequest("math", 1, str(deployment / "adapters" / "math"))
    try:
        with_adapter = [
            list(o.outputs[0].token_ids) for o in llm.generate(requests, greedy, lora_request=adapter)
        ]
        without_adapter = [list(o.outputs[0].token_ids) for o in llm.generate(requests, greedy)]
    finally:
        # Shut the engine down (and its in-process torch.distributed state) so later tests start clean.
        llm.llm_engine.engine_core.shutdown()

    def trim(ids: list[int]) -> list[int]:
        # transformers stops at EOS and keeps it; vLLM's output keeps it too: compare up to it.
        return ids[: ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids

    assert [trim(ids) for ids in with_adapter] == [trim(ids) for ids in merged_greedy]
    assert with_adapter != without_adapter
