"""`rft export bedrock`: a merged checkpoint for Amazon Bedrock Custom Model Import.

Writes what Bedrock reads from an S3 prefix: safetensors weights (sharded), `config.json`,
`tokenizer.json`, `tokenizer_config.json` with the chat template inside, and `tokenizer.model`
where the tokenizer has one, in the layout transformers 4.51.3 (the version Bedrock documents)
reads exactly as meant (see rft/export/transformers4.py). Architecture, context length and size
are checked against Bedrock's limits before any weights load. `--s3-uri` uploads the folder and
`--import` registers it with `bedrock.create_model_import_job`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from rft.export.merge import (
    DTYPES,
    ExportError,
    PolicySource,
    ensure_empty_dir,
    load_base_config,
    load_tokenizer,
    locate_policy,
    merge_policy,
)
from rft.export.transformers4 import (
    TRANSFORMERS4_ARCHITECTURES,
    TRANSFORMERS4_VERSION,
    write_transformers4_checkpoint,
)

# Architectures Bedrock Custom Model Import accepts (its documentation, by config.json `architectures`).
BEDROCK_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "Llama 2 / 3 / 3.1 / 3.2 / 3.3",
    "MistralForCausalLM": "Mistral",
    "MixtralForCausalLM": "Mixtral",
    "T5ForConditionalGeneration": "Flan-T5",
    "GPTBigCodeForCausalLM": "GPTBigCode",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "Qwen3MoeForCausalLM": "Qwen3 MoE",
    "GptOssForCausalLM": "GPT-OSS",
}
BEDROCK_MAX_CONTEXT_TOKENS = 128 * 1024
BEDROCK_MAX_MODEL_BYTES = 200 * 1000**3
BEDROCK_MAX_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/prefix` -> S3Location with the prefix ending in `/` (Bedrock reads a folder)."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(.+)", uri)
    if match is None:
        raise ExportError(f"--s3-uri {uri!r}: expected s3://BUCKET/PREFIX (a folder under a bucket)")
    prefix = match.group(2).rstrip("/") + "/"
    return S3Location(match.group(1), prefix)


def validate_import_request(job_name: str, model_name: str, role_arn: str) -> None:
    """Check the names against the constraints in botocore's own Bedrock service model.

    botocore validates types and lengths when sending, not the patterns; checking them here
    fails before the merge and the upload instead of after.
    """
    import botocore.session

    service = botocore.session.get_session().get_service_model("bedrock")
    shape = service.operation_model("CreateModelImportJob").input_shape
    named = (("--job-name", "jobName", job_name), ("--model-name", "importedModelName", model_name),
             ("--role-arn", "roleArn", role_arn))
    for flag, field, value in named:
        rules = shape.members[field].metadata
        if not rules.get("min", 0) <= len(value) <= rules.get("max", len(value)):
            raise ExportError(f"{flag} {value!r}: length must be {rules.get('min', 0)}..{rules.get('max')}")
        if "pattern" in rules and re.fullmatch(rules["pattern"], value) is None:
            raise ExportError(f"{flag} {value!r}: must match {rules['pattern']} (Bedrock's {field})")


def estimate_weight_bytes(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """Bytes of the exported weights: the model built on the meta device (no memory), tied weights once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(parameter.numel() for parameter in model.parameters()) * dtype.itemsize


def check_bedrock_limits(config: Any, dtype: torch.dtype, source: str,
                         trust_remote_code: bool = False) -> int:
    """Refuse, with the reason, what Bedrock would reject or rft cannot write correctly; returns the size."""
    architectures = list(getattr(config, "architectures", None) or [])
    if len(architectures) != 1:
        raise ExportError(f"{source}/config.json: architectures: expected exactly one, got {architectures}")
    architecture = architectures[0]
    if architecture not in BEDROCK_ARCHITECTURES:
        supported = ", ".join(f"{name} ({label})" for name, label in BEDROCK_ARCHITECTURES.items())
        raise ExportError(
            f"{source}/config.json: architecture {architecture} is not supported by Bedrock Custom Model "
            f"Import (supported: {supported})"
        )
    if architecture not in TRANSFORMERS4_ARCHITECTURES:
        raise ExportError(
            f"{source}/config.json: Bedrock accepts {architecture}, but rft has no checkpoint layout "
            f"verified to load correctly under transformers {TRANSFORMERS4_VERSION} for it (verified: "
            f"{', '.join(sorted(TRANSFORMERS4_ARCHITECTURES))})"
        )
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and context > BEDROCK_MAX_CONTEXT_TOKENS:
        raise ExportError(
            f"{source}/config.json: max_position_embeddings {context} exceeds Bedrock's context limit "
            f"of {BEDROCK_MAX_CONTEXT_TOKENS} tokens (128K)"
        )
    size = estimate_weight_bytes(config, dtype, trust_remote_code)
    if size >= BEDROCK_MAX_MODEL_BYTES:
        raise ExportError(
            f"{source}: the weights take {size / 1000**3:.1f} GB in {dtype}; Bedrock imports models under "
            f"{BEDROCK_MAX_MODEL_BYTES / 1000**3:.0f} GB (a smaller --dtype may fit)"
        )
    return size


def upload_folder(s3_client: Any, folder: Path, location: S3Location) -> list[str]:
    """Upload every file under `folder` to the S3 prefix (boto3's managed, multipart-capable transfer)."""
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = location.prefix + path.relative_to(folder).as_posix()
        s3_client.upload_file(str(path), location.bucket, key)
        keys.append(key)
    return keys


def create_import_job(bedrock_client: Any, *, job_name: str, model_name: str, role_arn: str,
                      s3_uri: str) -> str:
    """Register the uploaded folder with Bedrock; returns the import job's ARN."""
    response = bedrock_client.create_model_import_job(
        jobName=job_name,
        importedModelName=model_name,
        roleArn=role_arn,
        modelDataSource={"s3DataSource": {"s3Uri": s3_uri}},
    )
    return response["jobArn"]


def export_bedrock(source: PolicySource, out_dir: Path, dtype: torch.dtype,
                   max_shard_size: str = BEDROCK_MAX_SHARD_SIZE) -> list[Path]:
    """Check, merge and write; returns the files written."""
    config = load_base_config(source)
    check_bedrock_limits(config, dtype, str(source.base_model), source.trust_remote_code)
    ensure_empty_dir(out_dir)
    tokenizer = load_tokenizer(source)
    if not tokenizer.chat_template:
        print(f"note: the tokenizer in {source.tokenizer_dir} has no chat template; Bedrock will see raw "
              "prompts", file=sys.stderr)
    model = merge_policy(source, dtype)
    return write_transformers4_checkpoint(
        model,
        tokenizer,
        out_dir,
        dtype=dtype,
        tokenizer_source_dirs=[source.checkpoint_dir, Path(source.base_model)],
        max_shard_size=max_shard_size,
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rft export bedrock`."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="Run directory written by `rft train`.")
    parser.add_argument("--out", type=Path, required=True, help="New (or empty) folder for the merged model.")
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="Export this checkpoint (RUN_DIR/checkpoints/step-NNNNNN or any adapter/model folder) instead "
             "of RUN_DIR/final.",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="Weights dtype (default bfloat16).")
    parser.add_argument("--max-shard-size", default=BEDROCK_MAX_SHARD_SIZE,
                        help="Largest safetensors shard (default 5GB).")
    parser.add_argument("--s3-uri", default=None,
                        help="Upload the folder to this S3 prefix (s3://BUCKET/PREFIX/).")
    parser.add_argument(
        "--import", dest="do_import", action="store_true",
        help="Start a Bedrock Custom Model Import job from --s3-uri (needs --role-arn and --model-name).",
    )
    parser.add_argument("--role-arn", default=None, help="IAM role Bedrock assumes to read the S3 prefix.")
    parser.add_argument("--model-name", default=None, help="Name of the imported model in Bedrock.")
    parser.add_argument("--job-name", default=None,
                        help="Import job name (default: MODEL_NAME-YYYYMMDD-HHMMSS).")
    parser.add_argument("--region", default=None, help="AWS region (default: the AWS configuration's).")


ClientFactory = Callable[[str, "str | None"], Any]


def _boto3_client(service: str, region: str | None) -> Any:
    import boto3

    return boto3.client(service, region_name=region)


def run(args: argparse.Namespace, client_factory: ClientFactory = _boto3_client) -> int:
    """Run `rft export bedrock`; `client_factory(service, region)` makes the AWS clients (stubs in tests)."""
    try:
        location = parse_s3_uri(args.s3_uri) if args.s3_uri else None
        job_name = None
        if args.do_import:
            if location is None or not args.role_arn or not args.model_name:
                raise ExportError("--import needs --s3-uri, --role-arn and --model-name")
            job_name = args.job_name or f"{args.model_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
            validate_import_request(job_name, args.model_name, args.role_arn)
        # Clients are made before the merge so a missing region fails in a second, not after it.
        s3_client = client_factory("s3", args.region) if location else None
        bedrock_client = client_factory("bedrock", args.region) if args.do_import else None
        source = locate_policy(args.run_dir, args.checkpoint)
        files = export_bedrock(source, args.out, DTYPES[args.dtype], args.max_shard_size)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(path.stat().st_size for path in files)
    print(f"wrote {len(files)} files ({total / 1e6:.1f} MB, {args.dtype}) to {args.out}")
    if location is not None:
        keys = upload_folder(s3_client, args.out, location)
        print(f"uploaded {len(keys)} files to {location.uri}")
    if args.do_import:
        job_arn = create_import_job(
            bedrock_client, job_name=job_name, model_name=args.model_name, role_arn=args.role_arn,
            s3_uri=location.uri,
        )
        region = f" --region {args.region}" if args.region else ""
        print(f"import job started: {job_arn}")
        print(f"poll it until status is Completed (or Failed, with failureMessage):\n"
              f"  aws bedrock get-model-import-job --job-identifier {job_arn}{region}\n"
              f"  # or: boto3.client('bedrock').get_model_import_job(jobIdentifier='{job_arn}')['status']\n"
              f"then invoke its importedModelArn with bedrock-runtime invoke_model.")
    return 0
