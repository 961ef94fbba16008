"""SageMaker Training jobs: the launcher's request against botocore's own model, the upload and the call
(moto S3, botocore Stubber), and the entry point under a fake /opt/ml tree through a kill and a restart."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
import yaml
from botocore.exceptions import ParamValidationError
from botocore.stub import Stubber
from botocore.validate import validate_parameters
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from rft.config import load_config
from rft.sagemaker import entry, launcher, sourcedir, vllm_pins
from tests.conftest import REPO, tiny_recipe

REGION = "eu-west-1"


def _arguments(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    launcher.configure_parser(parser)
    return parser.parse_args(list(argv))


def _dry_run(*argv: str) -> dict[str, Any]:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert launcher.run(_arguments(*argv, "--dry-run", "--region", REGION)) == 0
    return json.loads(output.getvalue())


def _validate(request: dict[str, Any]) -> None:
    model = botocore.session.get_session().get_service_model("sagemaker")
    validate_parameters(request, model.operation_model("CreateTrainingJob").input_shape)


@pytest.fixture()
def tiny_recipe_file(tiny_model_dir: Path, tmp_path: Path) -> Path:
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "unused-run", training={"steps": 12, "threads": 1},
                         output={"save_every": 2, "log_completions": 0})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("recipe", "extra", "channels"),
    [
        ("quickstart.yaml", ["--spot", "--instance-count", "2"], ["eval", "model", "train"]),
        (
            "gsm8k_grpo_lora_qwen05b.yaml",
            ["--accelerate-config", str(REPO / "recipes/accelerate/fsdp2.yaml")], []
        ),
        ("json_extraction.yaml", ["--env", "HF_TOKEN=abc"], ["eval", "train"]),
    ],
)
def test_dry_run_request_is_a_valid_create_training_job(
    recipe: str, extra: list[str], channels: list[str]
) -> None:
    request = _dry_run(str(REPO / "recipes" / recipe), "--instance-type", "ml.g5.12xlarge", *extra)
    _validate(request)
    hyperparameters = {key: json.loads(value) for key, value in request["HyperParameters"].items()}
    assert hyperparameters["sagemaker_program"] == entry.ENTRY_SCRIPT
    assert hyperparameters["recipe"] == "recipe.yaml"
    assert request["CheckpointConfig"]["LocalPath"] == hyperparameters[
        "checkpoint_dir"
    ] == "/opt/ml/checkpoints"
    assert [c["ChannelName"] for c in request.get("InputDataConfig", [])] == channels
    assert REGION in request["AlgorithmSpecification"]["TrainingImage"]
    if "--spot" in extra:
        assert request["EnableManagedSpotTraining"] is True
        assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] >= request["StoppingCondition"][
            "MaxRuntimeInSeconds"
        ]
        assert request["ResourceConfig"]["InstanceCount"] == 2
    if "--accelerate-config" in extra:
        assert hyperparameters["launcher"] == "accelerate"
        assert hyperparameters["accelerate_config"] == "accelerate_config.yaml"
    if "--env" in extra:
        assert request["Environment"]["HF_TOKEN"] == "abc"
    # What botocore's model leaves to the service: the regex and list limits.
    model = botocore.session.get_session().get_service_model("sagemaker")
    limits = model.shape_for("MetricDefinition").members["Regex"].metadata
    definitions = request["AlgorithmSpecification"]["MetricDefinitions"]
    assert 0 < len(definitions) <= model.shape_for("MetricDefinitionList").metadata["max"]
    assert all(
        len(d["Regex"]) <= limits["max"] and re.fullmatch(limits["pattern"], d["Regex"]) for d in definitions
    )
    assert {"train:reward/mean", "train:loss", "held-out:greedy:reward"} <= {d["Name"] for d in definitions}
    # The validator is strict enough to notice a malformed request.
    broken = {**request, "ResourceConfig": {**request["ResourceConfig"], "InstanceCount": "2"}}
    with pytest.raises(ParamValidationError):
        _validate(broken)


def test_env_secrets_are_named_in_one_warning(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    arguments = _arguments(recipe, "--instance-type", "ml.g5.xlarge", "--dry-run", "--region", REGION,
                           "--env", "HF_TOKEN=hf_abc", "--env", "OPENAI_API_KEY=sk-1", "--env",
                           "LOG_LEVEL=debug")
    assert launcher.run(arguments) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "HF_TOKEN, OPENAI_API_KEY" in warnings[0] and "LOG_LEVEL" not in warnings[0]
    assert "Secrets Manager" in warnings[0]
    assert launcher.run(_arguments(recipe, "--instance-type", "ml.g5.xlarge", "--dry-run", "--region", REGION,
                                   "--env", "LOG_LEVEL=debug")) == 0
    assert "warning:" not in capsys.readouterr().err


def test_secrets_travel_as_ids_and_are_read_in_the_job(capsys: pytest.CaptureFixture[str]) -> None:
    from moto import mock_aws

    request = _dry_run(str(REPO / "recipes" / "quickstart.yaml"), "--instance-type", "ml.g5.xlarge",
                       "--secret", "HF_TOKEN=rft/hf-token")
    _validate(request)
    assert "warning:" not in capsys.readouterr().err
    assert "hf_secret_value" not in json.dumps(request)
    environment = request["Environment"]
    assert json.loads(environment[entry.SECRETS_VARIABLE]) == {"HF_TOKEN": "rft/hf-token"}
    with mock_aws():
        client = boto3.client("secretsmanager", region_name=environment["AWS_DEFAULT_REGION"],
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_secret(Name="rft/hf-token", SecretString="hf_secret_value")
        assert entry.read_secrets(environment, client) == {"HF_TOKEN": "hf_secret_value"}
        missing = {entry.SECRETS_VARIABLE: json.dumps({"OPENAI_API_KEY": "rft/not-there"})}
        with pytest.raises(entry.EntryError, match="OPENAI_API_KEY: cannot read secret 'rft/not-there'"):
            entry.read_secrets(missing, client)
    assert entry.read_secrets({}) == {}


def test_launch_refuses_bad_options_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    assert launcher.run(_arguments(recipe, "--instance-type", "ml.g5.xlarge")) == 2
    assert "--role and --s3-prefix are required" in capsys.readouterr().err
    assert launcher.run(_arguments(recipe, "--instance-type", "ml.g5.xlarge", "--dry-run", "--spot",
                                   "--max-run-hours", "5", "--max-wait-hours", "1")) == 2
    assert "--max-wait-hours" in capsys.readouterr().err


class _Session:
    """A boto3 session's `client` for `launcher.launch`: moto-backed S3, a stubbed SageMaker client."""

    def __init__(self, s3: Any, sagemaker: Any):
        self.clients = {"s3": s3, "sagemaker": sagemaker}

    def client(self, name: str) -> Any:
        return self.clients[name]


def test_launch_uploads_the_package_and_creates_the_job(tiny_recipe_file: Path, tmp_path: Path) -> None:
    from moto import mock_aws

    arguments = [str(tiny_recipe_file), "--instance-type", "ml.m5.xlarge", "--job-name", "rft-test-job",
                 "--region", REGION,
                 "--s3-prefix", "s3://rft-bucket/jobs", "--role",
                 "arn:aws:iam::111122223333:role/SageMakerRole"]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert launcher.run(_arguments(*arguments, "--dry-run")) == 0
    expected = json.loads(output.getvalue())
    arn = f"arn:aws:sagemaker:{REGION}:111122223333:training-job/rft-test-job"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": REGION}
    with mock_aws():
        s3 = boto3.client("s3", **credentials)
        s3.create_bucket(Bucket="rft-bucket", CreateBucketConfiguration={"LocationConstraint": REGION})
        sagemaker = boto3.client("sagemaker", **credentials)
        with Stubber(sagemaker) as stub:
            stub.add_response("create_training_job", {"TrainingJobArn": arn}, expected_params=expected)
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                assert launcher.run(_arguments(*arguments), session=_Session(s3, sagemaker)) == 0
            stub.assert_no_pending_responses()
        assert arn in printed.getvalue()
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="rft-bucket")["Contents"])
        assert "jobs/rft-test-job/source/sourcedir.tar.gz" in keys
        assert "jobs/rft-test-job/data/train/addition_train.jsonl" in keys
        assert "jobs/rft-test-job/data/model/model.safetensors" in keys
        archive = tmp_path / "sourcedir.tar.gz"
        s3.download_file("rft-bucket", "jobs/rft-test-job/source/sourcedir.tar.gz", str(archive))
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        requirements = tar.extractfile("requirements.txt").read().decode().split()  # type: ignore[union-attr]
    assert {
        "rft/trainer.py", "rft/sagemaker/entry.py", "rewards/__init__.py", "recipe.yaml", entry.ENTRY_SCRIPT
    } <= names
    assert any(name.startswith("recipe_files/") and name.endswith("arithmetic.py") for name in names)
    assert not any("__pycache__" in name for name in names)
    assert any(line.startswith("transformers") for line in requirements)
    assert not any(line.startswith("torch") for line in requirements), "the container's CUDA torch must stay"
    assert not any(line.startswith("vllm") for line in requirements), "the recipe samples with transformers"


def test_requirements_follow_the_engine() -> None:
    config = load_config(REPO / "recipes" / "gsm8k_grpo_lora_qwen05b.yaml")
    lines = sourcedir.requirements(config, launcher.DEFAULT_IMAGE.format(region=REGION))
    assert [line for line in lines if line.startswith(("vllm", "torch"))] == ["vllm==0.32.0", "torch==2.13.0"]
    config.rollout.engine = "transformers"
    lines = sourcedir.requirements(config, "my-registry/custom:latest")
    assert not any(line.startswith(("vllm", "torch")) for line in lines)


def test_vllm_recipes_get_the_vllm_built_for_the_container_torch(tmp_path: Path) -> None:
    quickstart = REPO / "recipes" / "quickstart.yaml"  # rollout.engine: auto
    gpu_options = launcher.LaunchOptions(recipe=quickstart, overrides=[], instance_type="ml.g5.2xlarge")
    package = launcher.stage_source(gpu_options, tmp_path / "gpu")
    lines = (package.directory / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines]  # each a valid pip requirement
    pins = {r.name: r.specifier for r in requirements if r.name in ("vllm", "torch")}
    assert {name: str(pin) for name, pin in pins.items()} == {"vllm": "==0.32.0", "torch": "==2.13.0"}
    # The pinned vLLM's own torch pin (the sourced table) is the container's torch: pip keeps its CUDA build.
    assert pins["torch"].contains(vllm_pins.VLLM_TORCH["0.32.0"])
    assert vllm_pins.image_torch(launcher.DEFAULT_IMAGE) == "2.13.0"
    # The project's other dependencies go as they are declared, torch left to the container.
    assert {"transformers", "peft", "trl"} <= {r.name for r in requirements}

    cpu_options = launcher.LaunchOptions(recipe=quickstart, overrides=[], instance_type="ml.m5.xlarge")
    cpu_package = launcher.stage_source(cpu_options, tmp_path / "cpu")
    lines = (cpu_package.directory / "requirements.txt").read_text().split()
    assert not any(line.startswith(("vllm", "torch")) for line in lines), "auto on CPU: transformers"
    vllm_on_cpu = launcher.LaunchOptions(recipe=quickstart, overrides=["rollout.engine=vllm"],
                                         instance_type="ml.m5.xlarge")
    with pytest.raises(sourcedir.LaunchError, match=r"rollout\.engine: vllm needs a GPU instance"):
        launcher.stage_source(vllm_on_cpu, tmp_path / "vllm-cpu")


def test_the_vllm_torch_table_agrees_with_the_project_and_the_installed_vllm() -> None:
    extra = next(Requirement(line) for line in metadata.requires(sourcedir.PROJECT) or []
                 if line.startswith("vllm") and "extra == \"vllm\"" in line)
    assert extra.name == "vllm" and str(extra.specifier) == ">=0.32"
    # Every release in the table is one this project supports, and the floor does filter.
    assert vllm_pins.supported_releases(extra.specifier) == vllm_pins.VLLM_TORCH
    assert "0.32.0" not in vllm_pins.supported_releases(SpecifierSet(">=0.33"))
    # The same release's CPU build, installed here, pins the torch the table gives for the CUDA build.
    installed = Version(metadata.version("vllm-cpu"))
    torch_pins = [Requirement(line) for line in metadata.requires("vllm-cpu") or []
                  if line.startswith("torch==") and Requirement(line).marker.evaluate()]
    assert len(torch_pins) == 1
    pinned = Version(next(iter(torch_pins[0].specifier)).version)
    assert pinned.public == vllm_pins.VLLM_TORCH[str(installed)]
    # A torch 2.14 image gets the newest release built for it.
    assert vllm_pins.vllm_for_image("1.dkr.ecr.x.amazonaws.com/pytorch:2.14.0-cu133-amzn2023-sagemaker",
                                    extra.specifier) == ("0.34.0", "2.14.0")


@pytest.mark.parametrize(
    ("image", "torch_version"),
    [
        ("763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch:2.13.0-cu133-amzn2023-sagemaker", "2.13.0"),
        ("763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.9.0-gpu-py312-cu130-ubuntu22.04-sagemaker",
         "2.9.0"),
        ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
         "2.11.0-transformers5.13.1-cu130-amzn2023", "2.11.0"),
        ("763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch:2.13-cu133-amzn2023-sagemaker", None),
        ("my-registry:5000/team/custom:1.2.3-gpu", None),
    ],
)
def test_the_torch_version_comes_from_the_image_tag(image: str, torch_version: str | None) -> None:
    assert vllm_pins.image_torch(image) == torch_version


class _NoUploads:
    def client(self, name: str) -> Any:
        raise AssertionError(f"{name} client asked for: the launch should have stopped before any upload")


@pytest.mark.parametrize(
    ("image", "named"),
    [
        ("763104351884.dkr.ecr.eu-west-1.amazonaws.com/huggingface-pytorch-training:"
         "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04", "torch 2.9.0"),
        ("my-registry/custom:latest", "no torch version in its tag"),
    ],
)
def test_an_image_without_a_supported_vllm_is_refused_before_uploading(
    image: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    arguments = [recipe, "--instance-type", "ml.g5.2xlarge", "--region", REGION, "--image-uri", image,
                 "--s3-prefix", "s3://rft-bucket/jobs",
                 "--role", "arn:aws:iam::111122223333:role/SageMakerRole"]
    assert launcher.run(_arguments(*arguments), session=_NoUploads()) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("error: rollout.engine: auto on a GPU instance samples with vLLM")
    assert f"image {image} ({named})" in error
    assert "vllm>=0.32" in error and "torch 2.13.0 (vLLM 0.32.0); torch 2.14.0 (vLLM 0.33.0, 0.34.0)" in error
    assert "--set rollout.engine=transformers" in error
    # Sampling with transformers needs no vLLM: the same image launches.
    with contextlib.redirect_stdout(io.StringIO()):
        assert launcher.run(_arguments(recipe, "--instance-type", "ml.g5.2xlarge", "--region", REGION,
                                       "--image-uri", image, "--set", "rollout.engine=transformers",
                                       "--dry-run")) == 0


# -------------------------------------------------------------------------------------------- the entry point
def _fake_opt_ml(
    tiny_recipe_file: Path, tmp_path: Path, *hyperparameter_arguments: str
) -> tuple[Path, dict[str, str], list[str]]:
    """What a training container holds: the unpacked source
    in /opt/ml/code, channels in /opt/ml/input/data."""
    opt_ml = tmp_path / "opt" / "ml"
    options = launcher.LaunchOptions(recipe=tiny_recipe_file, overrides=[], instance_type="ml.m5.xlarge")
    package = launcher.stage_source(options, opt_ml / "code")
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("SM_")
    } | {
        "SM_MODEL_DIR": str(opt_ml / "model"), "SM_OUTPUT_DIR": str(opt_ml / "output"),
        "SM_OUTPUT_DATA_DIR": str(opt_ml / "output" / "data"), "SM_HOSTS": '["algo-1"]',
        "SM_CURRENT_HOST": "algo-1",
        "SM_NUM_GPUS": "0",
        "SM_HPS": json.dumps({"recipe": "recipe.yaml", "launcher": "torchrun", "checkpoint_dir": "/nowhere"}),
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    for channel, source in package.channels.items():
        target = opt_ml / "input" / "data" / channel
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.mkdir(parents=True)
            shutil.copy2(source, target / source.name)
        environment[f"SM_CHANNEL_{channel.upper()}"] = str(target)
    # `--key value` arguments win over SM_HPS, as the toolkit passes both.
    argv = [
        sys.executable, entry.ENTRY_SCRIPT, "--checkpoint_dir", str(opt_ml / "checkpoints"),
        *hyperparameter_arguments,
    ]
    return opt_ml, environment, argv


def _metrics_steps(opt_ml: Path) -> list[int]:
    lines = (opt_ml / "checkpoints" / entry.RUN_NAME / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_entry_point_resumes_after_being_killed(tiny_recipe_file: Path, tmp_path: Path) -> None:
    opt_ml, environment, argv = _fake_opt_ml(tiny_recipe_file, tmp_path, "--training.steps", "12")
    checkpoints = opt_ml / "checkpoints" / entry.RUN_NAME / "checkpoints"
    # Its own session, so the whole process tree goes down at once, as when a spot instance is reclaimed.
    first = subprocess.Popen(argv, cwd=opt_ml / "code", env=environment, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (checkpoints / "step-000002").is_dir():
            assert first.poll() is None, "the first run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (opt_ml / "model" / "adapter_model.safetensors").exists()
    interrupted_at = len(_metrics_steps(opt_ml))
    assert interrupted_at < 12

    second = subprocess.run(
        argv, cwd=opt_ml / "code", env=environment, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    log = second.stdout + second.stderr
    assert "(resuming)" in log and "resumed from" in log
    assert _metrics_steps(opt_ml) == list(range(1, 13)), "steps lost or repeated across the restart"
    assert (opt_ml / "model" / "adapter_model.safetensors").exists()
    assert (opt_ml / "model" / "tokenizer.json").exists()
    assert {"metrics.jsonl", "config.yaml", "results.json"} <= {
        p.name for p in (opt_ml / "output" / "data").iterdir()
    }
    assert not (opt_ml / "output" / "failure").exists()


def test_entry_point_trains_on_several_processes(tiny_recipe_file: Path, tmp_path: Path) -> None:
    """SM_NUM_GPUS=2 on this CPU: torchrun starts two gloo processes, as it would two GPUs."""
    opt_ml, environment, argv = _fake_opt_ml(tiny_recipe_file, tmp_path, "--training.steps", "2")
    environment["SM_NUM_GPUS"] = "2"
    result = subprocess.run(
        argv, cwd=opt_ml / "code", env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch.distributed.run" in result.stdout + result.stderr
    assert _metrics_steps(opt_ml) == [1, 2]
    assert (opt_ml / "model" / "adapter_model.safetensors").exists()


def test_metric_definitions_read_the_jobs_log_lines(tiny_recipe_file: Path, tmp_path: Path) -> None:
    """The request's regexes, applied line by line (as CloudWatch holds them) to what a job prints, give
    the values in metrics.jsonl and evaluations.jsonl."""
    opt_ml, environment, argv = _fake_opt_ml(
        tiny_recipe_file, tmp_path, "--training.steps", "3", "--eval.every", "2"
    )
    job = subprocess.run(
        argv, cwd=opt_ml / "code", env=environment, capture_output=True, text=True, timeout=300
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-4000:]
    log_lines = (job.stdout + job.stderr).split("\n")
    run_dir = opt_ml / "checkpoints" / entry.RUN_NAME
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    config = load_config(tiny_recipe_file)
    definitions = {d["Name"]: d["Regex"] for d in launcher.metric_definitions(config)}
    read = {name: [float(m.group(1)) for line in log_lines if (m := re.search(regex, line))]
            for name, regex in definitions.items()}
    for name in ("reward/mean", "reward/length_mod_three/mean", "reward/final_number_correct/mean", "loss",
                 "kl/old", "grad_norm", "completion/length/mean", "learning_rate"):
        assert read[f"train:{name}"] == pytest.approx(
            [step[name] for step in steps], rel=1e-5, abs=1e-12
        ), name
    assert read["held-out:greedy:reward"] == pytest.approx([e["mean"] for e in evaluations], abs=5e-4)
    assert len(read["held-out:greedy:reward"]) == 1 and read["held-out:sampled:reward"] == []


def test_entry_point_writes_the_failure_reason(tiny_recipe_file: Path, tmp_path: Path) -> None:
    opt_ml, environment, _ = _fake_opt_ml(tiny_recipe_file, tmp_path)
    code_dir = opt_ml / "code"
    assert entry.main(["--training.steps", "0"], environment, code_dir) == 1
    assert "training.steps" in (opt_ml / "output" / "failure").read_text()
    assert entry.main([], {**environment, "SM_HPS": "{}"}, code_dir) == 1
    assert "hyperparameter 'recipe'" in (opt_ml / "output" / "failure").read_text()
    assert entry.main(["--launcher"], environment, code_dir) == 1
    assert "--key value" in (opt_ml / "output" / "failure").read_text()


def test_launch_commands_for_several_hosts() -> None:
    environment = entry.SageMakerEnvironment(
        model_dir=Path("/opt/ml/model"), output_dir=Path("/opt/ml/output"),
        output_data_dir=Path("/opt/ml/output/data"),
        channels={}, hosts=["algo-1", "algo-2"], current_host="algo-2", num_gpus=8,
    )
    plan = entry.RunPlan(recipe=Path("/opt/ml/code/recipe.yaml"), overrides=["output.run_dir=/x"],
                         run_dir=Path("/x"),
                         found_checkpoint=False, launcher="torchrun", accelerate_config=None)
    command = entry.launch_command(plan, environment)
    joined = " ".join(command)
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr algo-1" in joined
    assert command[-6:] == [
        "rft", "train", "/opt/ml/code/recipe.yaml", "--set", "output.run_dir=/x", "--resume"
    ]
    plan.launcher, plan.accelerate_config = "accelerate", Path("/opt/ml/code/accelerate_config.yaml")
    joined = " ".join(entry.launch_command(plan, environment))
    assert joined.startswith("accelerate launch --config_file /opt/ml/code/accelerate_config.yaml")
    assert "--num_machines 2 --machine_rank 1 --num_processes 16 --main_process_ip algo-1" in joined
    assert " -m rft train " in joined
