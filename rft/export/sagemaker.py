"""`rft export sagemaker`: a SageMaker LMI (DJL Serving, vLLM backend) deployment folder.

Default: the LoRA adapter under `adapters/<name>/` beside a `serving.properties` that enables
LoRA with limits matching the adapter (`option.max_lora_rank` is the smallest rank vLLM accepts
that holds the adapter's rank, `option.max_loras` the number of adapters), and names the base
model for the container to fetch (`option.model_id`). `--merged` writes the merged model itself
instead (the transformers-4.x-readable layout of rft/export/transformers4.py, which 5.x reads
too). `--tar` adds `model.tar.gz` for `model_data`. docs/deploy.md has the deployment calls.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch
import yaml

from rft.export.merge import (
    ADAPTER_CONFIG_FILE,
    DTYPES,
    ExportError,
    PolicySource,
    ensure_empty_dir,
    load_tokenizer,
    locate_policy,
    merge_policy,
)
from rft.export.transformers4 import write_transformers4_checkpoint

# vLLM's accepted max_lora_rank values (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ExportError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}; use "
                      "--merged")


def check_adapter_servable(source: PolicySource) -> None:
    """Refuse adapters vLLM cannot serve as adapters (they can still be exported --merged)."""
    config = source.adapter_config or {}
    where = source.checkpoint_dir / ADAPTER_CONFIG_FILE
    if config.get("use_dora"):
        raise ExportError(f"{where}: use_dora: true; vLLM serves plain LoRA only; use --merged")
    if config.get("target_parameters"):
        raise ExportError(
            f"{where}: target_parameters: {config['target_parameters']}: LoRA on raw parameters (fused MoE "
            "experts) is not something vLLM loads as an adapter; use --merged"
        )
    if config.get("modules_to_save"):
        raise ExportError(
            f"{where}: modules_to_save: {config['modules_to_save']}: vLLM loads only LoRA weights, these "
            "full modules would be dropped; use --merged"
        )


def property_text(value: str | int | bool) -> str:
    """A value as serving.properties spells it (booleans in lower case)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def serving_properties(options: dict[str, str | int | bool]) -> str:
    """DJL Serving's properties file: `engine=Python` then `option.KEY=VALUE` lines."""
    lines = ["engine=Python"] + [f"option.{key}={property_text(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def read_serving_properties(path: Path) -> dict[str, str]:
    """`serving.properties` as {key: value} (keys with their `option.` prefix)."""
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "=" not in line:
            raise ExportError(f"{path}: line {number}: expected key=value, got {line!r}")
        key, value = line.split("=", 1)
        entries[key.strip()] = value.strip()
    return entries


def write_adapter(source: PolicySource, adapters_dir: Path, name: str, base_model_id: str) -> Path:
    """Copy the peft adapter to adapters/<name>/, its base_model_name_or_path set to what the endpoint
    loads."""
    target = adapters_dir / name
    target.mkdir(parents=True)
    weights = [source.checkpoint_dir / file for file in ADAPTER_WEIGHT_FILES
               if (source.checkpoint_dir / file).exists()]
    if not weights:
        raise ExportError(f"{source.checkpoint_dir}: no adapter weights "
                          f"({' or '.join(ADAPTER_WEIGHT_FILES)})")
    shutil.copyfile(weights[0], target / weights[0].name)
    adapter_config = dict(source.adapter_config or {})
    adapter_config["base_model_name_or_path"] = base_model_id
    (target / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return target


def write_model_tar(out_dir: Path) -> Path:
    """model.tar.gz with the folder's contents at the archive root, as SageMaker unpacks it into
    /opt/ml/model."""
    archive = out_dir / "model.tar.gz"
    members = sorted(path for path in out_dir.rglob("*") if path.is_file() and path != archive)
    with tarfile.open(archive, "w:gz") as tar:
        for path in members:
            tar.add(path, arcname=path.relative_to(out_dir).as_posix())
    return archive


def tar_members(archive: Path) -> list[str]:
    """The files packed in an archive, as the endpoint will find them under /opt/ml/model."""
    with tarfile.open(archive) as tar:
        return [member.name for member in tar.getmembers() if member.isfile()]


def export_sagemaker(
    source: PolicySource,
    out_dir: Path,
    *,
    adapter_name: str,
    merged: bool,
    dtype: torch.dtype,
    base_model_id: str | None,
    tensor_parallel_degree: str,
    max_model_len: int | None,
    make_tar: bool,
) -> dict[str, str]:
    """Write the deployment folder; returns the serving.properties options, as written in the file."""
    options: dict[str, str | int | bool] = {}
    if merged or not source.is_adapter:
        ensure_empty_dir(out_dir)
        tokenizer = load_tokenizer(source)
        model = merge_policy(source, dtype)
        write_transformers4_checkpoint(
            model, tokenizer, out_dir, dtype=dtype,
            tokenizer_source_dirs=[source.checkpoint_dir, Path(source.base_model)],
        )
        # No option.model_id: LMI serves the model files found in /opt/ml/model itself.
        options.update({"rolling_batch": "vllm", "tensor_parallel_degree": tensor_parallel_degree})
    else:
        check_adapter_servable(source)
        model_id = base_model_id or source.base_model_hub_id
        if model_id is None:
            raise ExportError(
                f"the base model {source.base_model_name} is a local folder the endpoint cannot see: pass "
                "--base-model-id (a hub id or the s3:// prefix where you uploaded it), or use --merged"
            )
        ensure_empty_dir(out_dir)
        write_adapter(source, out_dir / "adapters", adapter_name, model_id)
        options.update(
            {
                "model_id": model_id,
                "rolling_batch": "vllm",
                "tensor_parallel_degree": tensor_parallel_degree,
                "enable_lora": True,
                "max_loras": 1,
                "max_lora_rank": vllm_max_lora_rank(source.lora_rank or 1),
                "max_cpu_loras": 1,
            }
        )
    if max_model_len is not None:
        options["max_model_len"] = max_model_len
    (out_dir / "serving.properties").write_text(serving_properties(options))
    if make_tar:
        write_model_tar(out_dir)
    return {key: property_text(value) for key, value in options.items()}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rft export sagemaker`."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="Run directory written by `rft train`.")
    parser.add_argument("--out", type=Path, required=True, help="New (or empty) folder for the deployment.")
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="Export this checkpoint (RUN_DIR/checkpoints/step-NNNNNN or any adapter/model folder) instead "
             "of RUN_DIR/final.",
    )
    parser.add_argument(
        "--adapter-name", default=None,
        help="Adapter name in adapters/<name>/ and in requests (default: the run directory's name).",
    )
    parser.add_argument("--merged", action="store_true",
                        help="Write the merged model instead of base + adapter.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="Merged weights dtype (with --merged).")
    parser.add_argument(
        "--base-model-id", default=None,
        help="option.model_id: the base model the endpoint loads (hub id or s3:// prefix). Default: the "
             "recipe's hub id.",
    )
    parser.add_argument("--tensor-parallel-degree", default="max",
                        help="option.tensor_parallel_degree (default max: all GPUs).")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="option.max_model_len (default: the model's).")
    parser.add_argument("--tar", action="store_true",
                        help="Also write model.tar.gz (for model_data=s3://.../model.tar.gz).")


def _adapter_name(args: argparse.Namespace) -> str:
    name = args.adapter_name or Path(args.run_dir).resolve().name
    # The name is a folder name and the value of "adapters" in requests.
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name) is None:
        raise ExportError(f"--adapter-name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def _trained_template_kwargs(run_dir: Path) -> dict[str, Any]:
    """The run's `data.chat_template_kwargs` (empty when the folder has no config.yaml, as a checkpoint's)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    return (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("chat_template_kwargs") or {}


def run(args: argparse.Namespace) -> int:
    """Run `rft export sagemaker`."""
    try:
        adapter_name = _adapter_name(args)
        source = locate_policy(args.run_dir, args.checkpoint)
        options = export_sagemaker(
            source,
            args.out,
            adapter_name=adapter_name,
            merged=args.merged,
            dtype=DTYPES[args.dtype],
            base_model_id=args.base_model_id,
            tensor_parallel_degree=args.tensor_parallel_degree,
            max_model_len=args.max_model_len,
            make_tar=args.tar,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options.get("enable_lora") == "true":
        print(f"wrote adapter {adapter_name} (rank {source.lora_rank}) for base {options['model_id']} to "
              f"{args.out}; the endpoint loads the base model itself")
        print(f'requests select it with "adapters": "{adapter_name}"')
        template_kwargs = _trained_template_kwargs(Path(args.run_dir))
        if template_kwargs:
            # The merged export's template defaults to them (rft/data.py template_with_defaults); the base's
            # cannot.
            print(f"note: the policy was trained with data.chat_template_kwargs {template_kwargs}, but the "
                  "endpoint renders the base model's chat template without them: send them as "
                  "\"chat_template_kwargs\" in each request, or export --merged, whose template defaults to "
                  "them")
    else:
        print(f"wrote the merged model ({args.dtype}) to {args.out}")
    if args.tar:
        archive = args.out / "model.tar.gz"
        print(f"packed {archive}: " + ", ".join(sorted(tar_members(archive))))
    print(f"serving.properties: {args.out / 'serving.properties'}; deploy: docs/deploy.md")
    return 0
