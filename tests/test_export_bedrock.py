"""`rft export bedrock`: the files Bedrock needs, the merge
is right, refusals come first, AWS calls are well-formed.

Tiny random models keep these fast; tests/test_export_transformers4.py checks the same exports
under transformers 4.51.3 itself (slow).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import boto3
import pytest
import torch
from botocore.stub import Stubber
from moto import mock_aws
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rft.export import bedrock
from rft.export.merge import load_policy, locate_policy
from tests.export_fixtures import (
    bf16_tolerance,
    build_base_model,
    build_full_run,
    build_lora_run,
    chat_prompt_ids,
    next_token_logits,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bedrock.configure_parser(parser)
    return parser.parse_args(argv)


def export(run_dir: Path, out: Path, *extra: str) -> Path:
    assert bedrock.run(parse([str(run_dir), "--out", str(out), *extra])) == 0
    return out


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    return build_lora_run(build_base_model("LlamaForCausalLM", root / "base"), root / "run")


@pytest.fixture(scope="module")
def llama_export(llama_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(llama_run, tmp_path_factory.mktemp("llama-export") / "out")


@pytest.fixture(scope="module")
def prompts(llama_run: Path) -> list[list[int]]:
    return chat_prompt_ids(AutoTokenizer.from_pretrained(str(llama_run / "final")))


def logits_of(folder: Path | str, prompts: list[list[int]]) -> torch.Tensor:
    return next_token_logits(AutoModelForCausalLM.from_pretrained(str(folder)).eval(), prompts)


def test_export_has_the_files_bedrock_reads_in_the_4x_layout(llama_export: Path) -> None:
    names = {path.name for path in llama_export.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= names
    assert "chat_template.jinja" not in names  # 4.51.3 would not read it: the template goes inside
    config = json.loads((llama_export / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"] is None
    assert config["torch_dtype"] == "bfloat16" and config["transformers_version"] == "4.51.3"
    assert "rope_parameters" not in config and "dtype" not in config
    tokenizer_config = json.loads((llama_export / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    with safe_open(str(llama_export / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        assert {weights.get_slice(name).get_dtype() for name in names} == {"BF16"}
        assert not any("lora" in name for name in names)


def test_merged_export_gives_the_trained_policys_logits(
    llama_run: Path, llama_export: Path, prompts: list[list[int]]
) -> None:
    source = locate_policy(llama_run)
    policy = next_token_logits(load_policy(source), prompts)
    tolerance = bf16_tolerance(policy, next_token_logits(load_policy(source, torch.bfloat16), prompts))
    base = logits_of(source.base_model, prompts)
    # The adapter moves the logits far beyond bf16 rounding, so a merge that dropped it would fail here.
    assert (base - policy).abs().max() > 10 * tolerance
    assert (logits_of(llama_export, prompts) - policy).abs().max() < tolerance


def test_float32_export_is_the_exact_merge(llama_run: Path, tmp_path: Path, prompts: list[list[int]]) -> None:
    policy = next_token_logits(load_policy(locate_policy(llama_run)), prompts)
    out = export(llama_run, tmp_path / "fp32", "--dtype", "float32")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert (logits_of(out, prompts) - policy).abs().max() < 1e-4


def test_large_models_are_sharded_with_an_index(
    llama_run: Path, llama_export: Path, tmp_path: Path, prompts: list[list[int]]
) -> None:
    out = export(llama_run, tmp_path / "sharded", "--max-shard-size", "2MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / shard).exists() for shard in shards)
    assert torch.equal(logits_of(out, prompts), logits_of(llama_export, prompts))


def test_intermediate_checkpoint_and_full_finetune_runs_export(
    llama_run: Path, tmp_path: Path, prompts: list[list[int]]
) -> None:
    step = tmp_path / "run" / "checkpoints" / "step-000004"
    shutil.copytree(llama_run, tmp_path / "run", ignore=shutil.ignore_patterns("final"))
    shutil.copytree(llama_run / "final", step / "policy")
    out = export(tmp_path / "run", tmp_path / "from-step", "--checkpoint", str(step), "--dtype", "float32")
    policy = next_token_logits(load_policy(locate_policy(llama_run)), prompts)
    assert (logits_of(out, prompts) - policy).abs().max() < 1e-4

    base = json.loads((llama_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    full_run = build_full_run(Path(base), tmp_path / "full-run")
    out = export(full_run, tmp_path / "from-full", "--dtype", "float32")
    assert (logits_of(out, prompts) - logits_of(full_run / "final", prompts)).abs().max() < 1e-5


def test_sentencepiece_model_is_shipped_when_the_tokenizer_has_one(llama_run: Path, tmp_path: Path) -> None:
    run_dir = shutil.copytree(llama_run, tmp_path / "run")
    # The exporter copies the file as is; its content is the tokenizer's business, not the export's.
    (run_dir / "final" / "tokenizer.model").write_bytes(b"\x0a\x05sentencepiece-model")
    out = export(run_dir, tmp_path / "out")
    assert (out / "tokenizer.model").read_bytes() == (run_dir / "final" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize(
    ("config_class", "architecture", "overrides", "message"),
    [
        (
            "GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4},
            "not supported by Bedrock Custom Model Import"
        ),
        (
            "GPTBigCodeConfig", "GPTBigCodeForCausalLM", {"n_embd": 64, "n_layer": 2, "n_head": 4},
            "no checkpoint layout verified"
        ),
        (
            "LlamaConfig", "LlamaForCausalLM",
            {"max_position_embeddings": 262144, "hidden_size": 64, "num_attention_heads": 4}, "context limit"
        ),
        # About 150B parameters: 300 GB in bf16. Sized on the meta device, nothing is allocated.
        (
            "LlamaConfig",
            "LlamaForCausalLM",
            {
                "hidden_size": 12288, "intermediate_size": 49152, "num_hidden_layers": 80,
                "num_attention_heads": 96,
            },
            "under 200 GB",
        ),
    ],
)
def test_limits_refuse_with_the_reason(
    config_class: str, architecture: str, overrides: dict, message: str
) -> None:
    import transformers

    config = getattr(transformers, config_class)(**overrides)
    config.architectures = [architecture]
    with pytest.raises(bedrock.ExportError, match=message):
        bedrock.check_bedrock_limits(config, torch.bfloat16, "base")


def test_size_estimate_counts_every_parameter_once() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000
    )
    config.architectures = ["LlamaForCausalLM"]
    size = bedrock.check_bedrock_limits(config, torch.bfloat16, "base")
    model = AutoModelForCausalLM.from_config(config)
    assert size == sum(p.numel() for p in model.parameters()) * 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--s3-uri", "bucket/prefix"], "expected s3://BUCKET/PREFIX"),
        (["--s3-uri", "s3://my-bucket/models/x", "--import", "--model-name", "m"], "--import needs"),
        (
            [
                "--s3-uri", "s3://my-bucket/x", "--import", "--model-name", "m", "--role-arn",
                "arn:aws:iam::123456789012:role/r", "--job-name", "bad name!",
            ],
            "--job-name 'bad name!': must match",
        ),
        (
            ["--s3-uri", "s3://my-bucket/x", "--import", "--model-name", "m", "--role-arn", "not-an-arn"],
            "--role-arn 'not-an-arn': must match",
        ),
    ],
)
def test_bad_flags_fail_before_any_work(
    llama_run: Path, tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_clients(service: str, region: str | None) -> None:
        raise AssertionError("no AWS client may be made for a bad request")

    out = tmp_path / "out"
    assert bedrock.run(parse([str(llama_run), "--out", str(out), *argv]), client_factory=no_clients) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_run_pieces_are_named(
    llama_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    assert bedrock.run(parse([str(run_dir), "--out", str(tmp_path / "out")])) == 2
    assert f"{run_dir / 'final'}: not found (has the run finished?)" in capsys.readouterr().err

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "old.safetensors").write_text("stale")
    assert bedrock.run(parse([str(llama_run), "--out", str(occupied)])) == 2
    assert "exists and is not empty" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(llama_run, broken)
    (broken / "final" / "adapter_config.json").write_text('{"r": 8,\n "peft_type": LORA}')
    assert bedrock.run(parse([str(broken), "--out", str(tmp_path / "out2")])) == 2
    assert "adapter_config.json: line 2: not valid JSON" in capsys.readouterr().err


def test_upload_and_import_job_request_match_the_service_models(
    llama_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"
    }.items():
        monkeypatch.setenv(name, value)
    job_arn = "arn:aws:bedrock:us-east-1:123456789012:model-import-job/abcd1234efgh"
    role_arn = "arn:aws:iam::123456789012:role/BedrockImport"
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="rft-models")
        # The bedrock call goes through botocore's Stubber, which checks the request (and our
        # canned response) against botocore's service model and sends nothing.
        bedrock_client = boto3.client("bedrock", region_name="us-east-1")
        stubber = Stubber(bedrock_client)
        stubber.add_response(
            "create_model_import_job",
            {"jobArn": job_arn},
            expected_params={
                "jobName": "math-policy-import-1",
                "importedModelName": "math-policy",
                "roleArn": role_arn,
                "modelDataSource": {"s3DataSource": {"s3Uri": "s3://rft-models/exports/math/"}},
            },
        )
        clients = {"s3": s3, "bedrock": bedrock_client}
        argv = [
            str(llama_run), "--out", str(tmp_path / "out"), "--s3-uri", "s3://rft-models/exports/math",
            "--import", "--model-name", "math-policy", "--job-name", "math-policy-import-1",
            "--role-arn", role_arn, "--region", "us-east-1",
        ]
        with stubber:
            assert bedrock.run(parse(argv), client_factory=lambda service, region: clients[service]) == 0
            stubber.assert_no_pending_responses()
        listed = s3.list_objects_v2(Bucket="rft-models", Prefix="exports/math/")["Contents"]
        uploaded = {item["Key"].removeprefix("exports/math/"): item["Size"] for item in listed}
    written = {path.name: path.stat().st_size for path in (tmp_path / "out").iterdir()}
    assert uploaded == written
    printed = capsys.readouterr().out
    assert job_arn in printed and f"get-model-import-job --job-identifier {job_arn}" in printed
