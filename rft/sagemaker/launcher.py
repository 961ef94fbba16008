"""`rft sagemaker launch RECIPE.yaml`: pack the project and the recipe, start a SageMaker Training job.

What goes where:
- the source directory (`sourcedir.tar.gz` on S3, unpacked to /opt/ml/code): the `rft` and
  `rewards` packages, the recipe with every setting resolved (`recipe.yaml`), the reward files and
  other files it names (`recipe_files/`), `requirements.txt` (installed by the container before
  the entry point runs) and `rft_sagemaker_entry.py` (the entry point, see `rft.sagemaker.entry`);
- local data files and a local model directory go up as input channels `train`, `eval`, `model`;
  hub data sets (`hf:`) and hub model ids are fetched inside the job;
- checkpoints live in /opt/ml/checkpoints, synced to `<s3 prefix>/<job>/checkpoints`, so a spot job
  that is interrupted resumes where it stopped;
- the job prints a metrics line every step (`output.log_every: 1` unless the recipe sets it) and the
  request's `MetricDefinitions` read reward, loss, KL and held-out curves from those lines into the
  SageMaker console and CloudWatch (`rft.log_lines`).

`--env` values are stored in plain text in the job's description (DescribeTrainingJob, the
console): the launcher warns about names that look like secrets. `--secret NAME=SECRET_ID` puts
only the id of an AWS Secrets Manager secret in the request; the entry point reads its value at
start (docs/sagemaker.md).

The job is created with boto3's `create_training_job`, from a request built here, not with the
SageMaker Python SDK: `sagemaker` 3.x would downgrade protobuf (7 -> 6) and pyarrow (26 -> 25) in
this environment and pull in mlflow and some thirty other packages, all for one API call that
boto3 makes directly. `--dry-run` prints the request and needs no credentials.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft.config import RecipeConfig
from rft.log_lines import EVAL_MODES, held_out_regex, line_metric_names, step_metric_regex
from rft.sagemaker.entry import ENTRY_SCRIPT, SECRETS_VARIABLE
from rft.sagemaker.sourcedir import LaunchError, SourcePackage, gpu_instance, pack, stage

# AWS's PyTorch training container for SageMaker (torch 2.13.0, CUDA 13.3, Python 3.12, Amazon Linux
# 2023, with the SageMaker training toolkit; aws/deep-learning-containers docs/pytorch): its torch is
# the one vLLM 0.32 pins, so recipes that sample with vLLM get vLLM 0.32.0 beside it
# (`rft.sagemaker.vllm_pins`). requirements.txt brings transformers and the rest up to this project's
# versions. Account 763104351884 serves most regions; elsewhere pass --image-uri.
DEFAULT_IMAGE = "763104351884.dkr.ecr.{region}.amazonaws.com/pytorch:2.13.0-cu133-amzn2023-sagemaker"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
DRY_RUN_ROLE = "arn:aws:iam::111122223333:role/REPLACE-WITH-YOUR-SAGEMAKER-EXECUTION-ROLE"
DRY_RUN_S3_PREFIX = "s3://REPLACE-WITH-YOUR-BUCKET/rft"
# CreateTrainingJob accepts at most 40 metric definitions.
MAX_METRIC_DEFINITIONS = 40
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL",
                         re.IGNORECASE)


@dataclass
class LaunchOptions:
    recipe: Path
    overrides: list[str]
    instance_type: str
    instance_count: int = 1
    spot: bool = False
    s3_prefix: str | None = None
    role: str | None = None
    region: str = "us-east-1"
    image_uri: str | None = None
    job_name: str | None = None
    max_run_hours: float = 24.0
    max_wait_hours: float | None = None
    volume_gb: int = 200
    accelerate_config: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # variable name -> Secrets Manager secret id


def stage_source(options: LaunchOptions, directory: Path) -> SourcePackage:
    """Validate the recipe and lay out the source directory (`rft.sagemaker.sourcedir`)."""
    return stage(
        options.recipe, options.overrides, directory, accelerate_config=options.accelerate_config,
        gpu=gpu_instance(options.instance_type), image=training_image(options),
    )


def training_image(options: LaunchOptions) -> str:
    return options.image_uri or DEFAULT_IMAGE.format(region=options.region)


def default_job_name(config: RecipeConfig) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", config.output.name).strip("-") or "run"
    return f"rft-{slug}"[:46].rstrip("-") + time.strftime("-%Y%m%d-%H%M%S", time.gmtime())


def split_s3(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if not match:
        raise LaunchError(f"--s3-prefix {uri!r}: expected s3://bucket[/prefix]")
    return match.group(1), match.group(2).strip("/")


def job_prefix(s3_prefix: str, job_name: str) -> str:
    bucket, prefix = split_s3(s3_prefix)
    return f"s3://{bucket}/{prefix + '/' if prefix else ''}{job_name}"


def metric_definitions(config: RecipeConfig) -> list[dict[str, str]]:
    """Regexes that read the step lines and held-out lines the job prints (`rft.log_lines`)."""
    reward_names = [reward.name or reward.fn.rpartition(":")[2] for reward in config.rewards]
    definitions = [{"Name": f"train:{name}", "Regex": step_metric_regex(name)}
                   for name in line_metric_names(reward_names)]
    definitions += [{"Name": f"held-out:{mode}:reward", "Regex": held_out_regex(mode)} for mode in EVAL_MODES]
    # Past the limit, the per-reward means go first (they sit after reward/std).
    excess = max(0, len(definitions) - MAX_METRIC_DEFINITIONS)
    return definitions[:2] + definitions[2 + excess :]


def secret_like(environment: dict[str, str]) -> list[str]:
    """The names among `--env` variables that look like they hold secrets."""
    return sorted(name for name in environment if SECRET_NAME.search(name))


def _secrets_environment(options: LaunchOptions) -> dict[str, str]:
    """What the entry point needs to read the `--secret` variables: their ids and the region."""
    if not options.secrets:
        return {}
    return {SECRETS_VARIABLE: json.dumps(options.secrets), "AWS_DEFAULT_REGION": options.region}


def build_request(options: LaunchOptions, package: SourcePackage, job_name: str) -> dict[str, Any]:
    """The CreateTrainingJob request (botocore's shape); S3 locations under <s3 prefix>/<job name>/."""
    base = job_prefix(options.s3_prefix or DRY_RUN_S3_PREFIX, job_name)
    request: dict[str, Any] = {
        "TrainingJobName": job_name,
        # The SDK's convention, which the toolkit decodes: every hyperparameter value JSON-encoded.
        "HyperParameters": {
            key: json.dumps(value) for key, value in _hyperparameters(options, base, job_name).items()
        },
        "AlgorithmSpecification": {
            "TrainingImage": training_image(options),
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(package.config),
        },
        "RoleArn": options.role or DRY_RUN_ROLE,
        "InputDataConfig": _input_channels(package.channels, base),
        "OutputDataConfig": {"S3OutputPath": f"{base}/output"},
        "ResourceConfig": {
            "InstanceType": options.instance_type, "InstanceCount": options.instance_count,
            "VolumeSizeInGB": options.volume_gb,
        },
        "StoppingCondition": _stopping_condition(options),
        "EnableManagedSpotTraining": options.spot,
        "CheckpointConfig": {"S3Uri": f"{base}/checkpoints", "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Environment": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **options.environment,
                        **_secrets_environment(options)},
        "Tags": [{"Key": "rft-recipe", "Value": options.recipe.stem[:256]}],
    }
    if not request["InputDataConfig"]:
        del request["InputDataConfig"]
    return request


def _hyperparameters(options: LaunchOptions, base: str, job_name: str) -> dict[str, Any]:
    launcher = "accelerate" if options.accelerate_config is not None else "torchrun"
    hyperparameters = {
        # The training toolkit's own settings: what to download and run.
        "sagemaker_program": ENTRY_SCRIPT,
        "sagemaker_submit_directory": f"{base}/source/sourcedir.tar.gz",
        "sagemaker_region": options.region,
        "sagemaker_job_name": job_name,
        "sagemaker_container_log_level": 20,
        "recipe": "recipe.yaml",
        "launcher": launcher,
        "checkpoint_dir": CHECKPOINT_LOCAL_PATH,
    }
    if options.accelerate_config is not None:
        hyperparameters["accelerate_config"] = "accelerate_config.yaml"
    return hyperparameters


def _stopping_condition(options: LaunchOptions) -> dict[str, int]:
    max_run = int(options.max_run_hours * 3600)
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": max_run}
    if options.spot:
        max_wait = int((options.max_wait_hours or 2 * options.max_run_hours) * 3600)
        if max_wait < max_run:
            raise LaunchError(f"--max-wait-hours ({options.max_wait_hours}) must be at least --max-run-hours "
                              f"({options.max_run_hours})")
        stopping["MaxWaitTimeInSeconds"] = max_wait
    return stopping


def _input_channels(channels: dict[str, Path], base: str) -> list[dict[str, Any]]:
    return [
        {
            "ChannelName": channel,
            "DataSource": {
                "S3DataSource": {
                    "S3DataType": "S3Prefix", "S3Uri": f"{base}/data/{channel}/",
                    "S3DataDistributionType": "FullyReplicated",
                }
            },
        }
        for channel in sorted(channels)
    ]


def uploads(package: SourcePackage, archive: Path, request: dict[str, Any]) -> list[tuple[Path, str]]:
    """(local file, s3 uri) for the source archive and every file of every channel."""
    pairs = [(archive, json.loads(request["HyperParameters"]["sagemaker_submit_directory"]))]
    channel_uris = {channel["ChannelName"]: channel["DataSource"]["S3DataSource"]["S3Uri"]
                    for channel in request.get("InputDataConfig", [])}
    for channel, source in sorted(package.channels.items()):
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in files:
            relative = path.name if source.is_file() else str(path.relative_to(source))
            pairs.append((path, channel_uris[channel] + relative))
    return pairs


def launch(request: dict[str, Any], files: list[tuple[Path, str]], session: Any) -> str:
    """Upload, then create the job; the job's ARN."""
    s3 = session.client("s3")
    for path, uri in files:
        bucket, key = split_s3(uri)
        s3.upload_file(str(path), bucket, key)
    return session.client("sagemaker").create_training_job(**request)["TrainingJobArn"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (repeatable), as in rft train")
    parser.add_argument("--instance-type", required=True, help="e.g. ml.g5.2xlarge, ml.p4d.24xlarge")
    parser.add_argument("--instance-count", type=int, default=1, help="hosts; all their GPUs train together")
    parser.add_argument("--spot", action="store_true",
                        help="managed spot training (resumes from checkpoints)")
    parser.add_argument("--max-run-hours", type=float, default=24.0, help="stop the job after this long")
    parser.add_argument("--max-wait-hours", type=float, default=None,
                        help="spot: give up waiting for capacity after this long (default twice "
                             "--max-run-hours)")
    parser.add_argument("--s3-prefix", help="s3://bucket/prefix for code, data, checkpoints and output")
    parser.add_argument("--role", help="the SageMaker execution role ARN")
    parser.add_argument("--region", help="AWS region (default: your AWS configuration, else us-east-1)")
    parser.add_argument("--image-uri", help=f"training container (default: {DEFAULT_IMAGE})")
    parser.add_argument("--job-name", help="default: rft-<output.name>-<UTC time>")
    parser.add_argument("--volume-gb", type=int, default=200, help="EBS volume per host")
    parser.add_argument("--accelerate-config", type=Path,
                        help="launch with accelerate and this config (e.g. recipes/accelerate/fsdp2.yaml); "
                             "default torchrun")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable); stored in plain text in the "
                             "job's "
                        "description: pass secrets with --secret")
    parser.add_argument("--secret", action="append", default=[], metavar="NAME=SECRET_ID",
                        help="environment variable the job reads from AWS Secrets Manager at start "
                             "(repeatable), "
                        "e.g. HF_TOKEN=rft/hf-token; the role needs secretsmanager:GetSecretValue on it")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the CreateTrainingJob request; upload and start nothing")


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise LaunchError("launching needs boto3: pip install 'rft-trainer[aws]'") from None
    return boto3


def _region(requested: str | None, dry_run: bool) -> str:
    if requested:
        return requested
    try:
        return _boto3().session.Session().region_name or "us-east-1"
    except LaunchError:
        if dry_run:
            return "us-east-1"
        raise


def _pairs(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise LaunchError(f"{option} {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    environment, secrets = _pairs(args.env, "--env"), _pairs(args.secret, "--secret")
    if args.instance_count < 1:
        raise LaunchError(f"--instance-count {args.instance_count}: must be at least 1")
    if not args.dry_run and (not args.role or not args.s3_prefix):
        raise LaunchError("--role and --s3-prefix are required to launch (or use --dry-run)")
    return LaunchOptions(
        recipe=args.recipe, overrides=args.overrides, instance_type=args.instance_type,
        instance_count=args.instance_count, spot=args.spot, s3_prefix=args.s3_prefix, role=args.role,
        region=_region(args.region, args.dry_run), image_uri=args.image_uri, job_name=args.job_name,
        max_run_hours=args.max_run_hours, max_wait_hours=args.max_wait_hours, volume_gb=args.volume_gb,
        accelerate_config=args.accelerate_config, environment=environment, secrets=secrets,
    )


def _print_dry_run(options: LaunchOptions, package: SourcePackage, request: dict[str, Any],
                   files: list[tuple[Path, str]]) -> None:
    print(json.dumps(request, indent=2))
    names = sorted(str(p.relative_to(package.directory)) for p in package.directory.iterdir())
    print(f"would upload the source directory ({', '.join(names)}) -> {files[0][1]}", file=sys.stderr)
    for path, uri in files[1:]:
        print(f"would upload {path} -> {uri}", file=sys.stderr)
    if not options.role or not options.s3_prefix:
        print("placeholders stand in for --role / --s3-prefix", file=sys.stderr)


def run(args: argparse.Namespace, session: Any = None) -> int:
    """`rft sagemaker launch`; `session` (a boto3 Session) is for tests."""
    try:
        options = options_from_args(args)
        if secrets := secret_like(options.environment):
            print(f"warning: --env {', '.join(secrets)}: stored in plain text in the job's description "
                  "(console, DescribeTrainingJob); keep secrets in AWS Secrets Manager and pass --secret "
                  "NAME=SECRET_ID (docs/sagemaker.md)", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="rft-sagemaker-") as staging:
            package = stage_source(options, Path(staging) / "source")
            job_name = options.job_name or default_job_name(package.config)
            request = build_request(options, package, job_name)
            archive = pack(package.directory, Path(staging) / "sourcedir.tar.gz")
            files = uploads(package, archive, request)
            if args.dry_run:
                _print_dry_run(options, package, request, files)
                return 0
            if session is None:
                session = _boto3().session.Session(region_name=options.region)
            arn = launch(request, files, session)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    console = f"https://{options.region}.console.aws.amazon.com/sagemaker/home?region={options.region}"
    print(f"started {arn}")
    print(f"{console}#/jobs/{job_name}")
    return 0
