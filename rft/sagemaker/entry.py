"""The SageMaker Training entry point: run a recipe inside the PyTorch / Hugging Face training containers.

The container's training toolkit downloads the source directory that `rft sagemaker launch` packed,
installs its `requirements.txt` and runs `python rft_sagemaker_entry.py --key value ...` on every
host. This module then:

1. reads the hyperparameters from `SM_HPS` (JSON) and the `--key value` arguments (these win):
   `recipe` (the recipe's path in the source directory), `launcher` (`torchrun` or `accelerate`),
   `accelerate_config`, `checkpoint_dir`; any key with a dot (`training.steps`) overrides that
   recipe field, as `rft train --set` would;
2. points `data.train` / `data.eval` / `model.name_or_path` at the `SM_CHANNEL_TRAIN` / `_EVAL` / `_MODEL`
   channels when the job has them;
3. keeps the run directory under /opt/ml/checkpoints, which SageMaker syncs to S3 and restores
   when a (spot) job restarts: a run that finds a checkpoint there resumes from it;
4. trains in this process on a single device, or launches `python -m rft train` under torchrun
   (or `accelerate launch` with an accelerate config) over `SM_NUM_GPUS` GPUs on each of `SM_HOSTS`;
5. on the first host, copies the final model to `SM_MODEL_DIR` and the run's records
   (metrics, evaluations, results, manifest, report, resolved config) to `SM_OUTPUT_DATA_DIR`;
6. on any failure writes the reason to /opt/ml/output/failure (SageMaker's FailureReason) and exits 1.

A SIGTERM (a spot interruption, a stopped job) is passed on to the launcher, whose processes finish
their step, checkpoint it into /opt/ml/checkpoints and stop (`rft.interrupt`); the entry point then
exits 143 with that reason, and the restarted job resumes from the checkpoint.

Before all that, the variables named in `RFT_SECRETS` (`rft sagemaker launch --secret NAME=ID`) are
read from AWS Secrets Manager into the environment, so secrets stay out of the job's description.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft.checkpoint import list_checkpoints
from rft.cli import configure_logging
from rft.config import load_config
from rft.interrupt import TrainingInterrupted, signal_name

logger = logging.getLogger(__name__)

ENTRY_SCRIPT = "rft_sagemaker_entry.py"
RUN_NAME = "run"
MASTER_PORT = 29500
# SageMaker keeps the first 1024 characters of the failure reason.
FAILURE_REASON_LIMIT = 1024
# Seconds torchrun gives its processes after passing on a SIGTERM before it kills them (its default: 30):
# time to finish the step and write its checkpoint.
SHUTDOWN_TIMEOUT_S = "100"

# {"NAME": "secret name or ARN"}: variables whose values the job reads from AWS Secrets Manager.
SECRETS_VARIABLE = "RFT_SECRETS"


class EntryError(RuntimeError):
    """The job's set-up cannot run (bad hyperparameters, channels or environment)."""


def parse_arguments(argv: Sequence[str]) -> dict[str, str]:
    """`--key value` pairs, as the training toolkit passes hyperparameters."""
    if len(argv) % 2:
        raise EntryError(f"hyperparameter arguments must be --key value pairs, got {list(argv)}")
    parsed: dict[str, str] = {}
    for key, value in zip(argv[::2], argv[1::2], strict=True):
        if not key.startswith("--"):
            raise EntryError(f"hyperparameter argument {key!r}: expected --key value")
        parsed[key[2:]] = value
    return parsed


@dataclass
class SageMakerEnvironment:
    """What the training container says about the job (DESIGN.md section 5)."""

    model_dir: Path
    output_dir: Path
    output_data_dir: Path
    channels: dict[str, Path]
    hosts: list[str]
    current_host: str
    num_gpus: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], argv: Sequence[str]) -> SageMakerEnvironment:
        hyperparameters: dict[str, Any] = json.loads(environ.get("SM_HPS", "{}") or "{}")
        hyperparameters.update(parse_arguments(argv))
        model_dir = Path(environ.get("SM_MODEL_DIR", "/opt/ml/model"))
        output_dir = Path(environ.get("SM_OUTPUT_DIR", model_dir.parent / "output"))
        hosts = json.loads(environ.get("SM_HOSTS", '["algo-1"]'))
        current_host = environ.get("SM_CURRENT_HOST", hosts[0])
        if current_host not in hosts:
            raise EntryError(f"SM_CURRENT_HOST {current_host!r} is not in SM_HOSTS {hosts}")
        channels = {
            key[len("SM_CHANNEL_") :].lower(): Path(value)
            for key, value in environ.items() if key.startswith("SM_CHANNEL_")
        }
        return cls(
            model_dir=model_dir,
            output_dir=output_dir,
            output_data_dir=Path(environ.get("SM_OUTPUT_DATA_DIR", output_dir / "data")),
            channels=channels,
            hosts=hosts,
            current_host=current_host,
            num_gpus=int(environ.get("SM_NUM_GPUS", "0")),
            hyperparameters={k: v for k, v in hyperparameters.items() if not k.startswith("sagemaker_")},
        )

    @property
    def is_first_host(self) -> bool:
        return self.current_host == self.hosts[0]

    @property
    def processes_per_host(self) -> int:
        return max(1, self.num_gpus)

    @property
    def checkpoint_dir(self) -> Path:
        """CheckpointConfig.LocalPath: /opt/ml/checkpoints unless the `checkpoint_dir` hyperparameter says
        otherwise."""
        return Path(self.hyperparameters.get("checkpoint_dir") or self.model_dir.parent / "checkpoints")


def failure_file(environ: Mapping[str, str]) -> Path:
    model_dir = Path(environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    return Path(environ.get("SM_OUTPUT_DIR", model_dir.parent / "output")) / "failure"


def channel_source(channel: Path, name: str) -> str:
    """The data file (or `save_to_disk` folder) a channel directory holds."""
    if not channel.is_dir():
        raise EntryError(f"channel {name}: {channel} is not a directory")
    if (channel / "dataset_info.json").exists() or (channel / "dataset_dict.json").exists():
        return str(channel)
    files = sorted(p for p in channel.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json"))
    if len(files) != 1:
        found = sorted(str(p.relative_to(channel)) for p in channel.rglob("*") if p.is_file())
        raise EntryError(f"channel {name}: expected one .jsonl/.json file or a saved dataset in {channel}, "
                         f"found {found}")
    return str(files[0])


@dataclass
class RunPlan:
    recipe: Path
    overrides: list[str]
    run_dir: Path
    found_checkpoint: bool
    launcher: str
    accelerate_config: Path | None


def plan_run(environment: SageMakerEnvironment, code_dir: Path) -> RunPlan:
    """Recipe, overrides (channels, run directory, hyperparameters), resume or not; the recipe is validated
    here."""
    hyperparameters = environment.hyperparameters
    if "recipe" not in hyperparameters:
        raise EntryError("hyperparameter 'recipe' (the recipe's path in the source directory) is missing")
    recipe = code_dir / str(hyperparameters["recipe"])
    launcher = str(hyperparameters.get("launcher", "torchrun"))
    if launcher not in ("torchrun", "accelerate"):
        raise EntryError(f"hyperparameter launcher={launcher!r}: expected torchrun or accelerate")
    accelerate_config = hyperparameters.get("accelerate_config")
    if launcher == "accelerate" and not accelerate_config:
        raise EntryError("launcher=accelerate needs the accelerate_config hyperparameter")
    run_dir = environment.checkpoint_dir / RUN_NAME
    # SM_HPS holds decoded JSON values; JSON is YAML, which is how overrides are parsed.
    overrides = [
        f"{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in hyperparameters.items() if "." in key
    ]
    for channel, field_name in (("train", "data.train"), ("eval", "data.eval")):
        if channel in environment.channels:
            overrides.append(f"{field_name}={channel_source(environment.channels[channel], channel)}")
    if "model" in environment.channels:
        overrides.append(f"model.name_or_path={environment.channels['model']}")
    overrides.append(f"output.run_dir={run_dir}")
    load_config(recipe, overrides)
    return RunPlan(
        recipe=recipe,
        overrides=overrides,
        run_dir=run_dir,
        found_checkpoint=bool(list_checkpoints(run_dir)),
        launcher=launcher,
        accelerate_config=code_dir / str(accelerate_config) if accelerate_config else None,
    )


def launch_command(plan: RunPlan, environment: SageMakerEnvironment) -> list[str]:
    """torchrun (or `accelerate launch`) of `python -m rft train` over this host's GPUs, joined to the other
    hosts."""
    nodes = len(environment.hosts)
    node_rank = environment.hosts.index(environment.current_host)
    # One host: the loopback interface, so the job does not depend on resolving its own host name.
    master = environment.hosts[0] if nodes > 1 else "127.0.0.1"
    per_host = environment.processes_per_host
    # Always --resume: every process then checks that it sees the checkpoint the others see (or none).
    overrides = [arg for override in plan.overrides for arg in ("--set", override)]
    train = ["rft", "train", str(plan.recipe), *overrides, "--resume"]
    if plan.launcher == "accelerate":
        return [
            "accelerate", "launch", "--config_file", str(plan.accelerate_config),
            "--num_machines", str(nodes), "--machine_rank", str(node_rank),
            "--num_processes", str(nodes * per_host),
            "--main_process_ip", master, "--main_process_port", str(MASTER_PORT), "-m", *train,
        ]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
        "--nproc_per_node", str(per_host), "--master_addr", master, "--master_port", str(MASTER_PORT),
        "-m", *train,
    ]


def run_processes(command: list[str], code_dir: Path) -> None:
    """Run the launcher, passing its output through (and a SIGTERM on), keeping the tail for the failure
    reason."""
    environment = {
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": SHUTDOWN_TIMEOUT_S, **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(code_dir), os.environ.get("PYTHONPATH")])),
    }
    logger.info("launching: %s", " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=20)
    received: list[int] = []
    with subprocess.Popen(
        command, cwd=code_dir, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        bufsize=1,
    ) as process:
        def forward(signum: int, _frame: object) -> None:
            received.append(signum)
            process.send_signal(signum)

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, forward) if main_thread else None
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stdout.write(line)
                if line.strip():
                    tail.append(line.rstrip())
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    if received:
        raise TrainingInterrupted(received[0], f"{signal_name(received[0])}: passed on to the training "
                                               f"processes, which exited with code {process.returncode}")
    if process.returncode != 0:
        errors = [line for line in tail if "Error" in line or "error" in line] or list(tail)
        raise RuntimeError(f"{command[0]} exited with code {process.returncode}: "
                           f"{errors[-1] if errors else ''}")


def train_here(plan: RunPlan) -> None:
    from rft.trainer import Trainer  # heavy import (torch): several-process jobs never need it here

    Trainer(load_config(plan.recipe, plan.overrides), resume=True).train()


def export_outputs(plan: RunPlan, environment: SageMakerEnvironment) -> None:
    """The final model to SM_MODEL_DIR (SageMaker uploads it as model.tar.gz), the records to
    SM_OUTPUT_DATA_DIR."""
    final = plan.run_dir / "final"
    if not final.is_dir():
        raise EntryError(f"training ended without a final model in {final}")
    shutil.copytree(final, environment.model_dir, dirs_exist_ok=True)
    environment.output_data_dir.mkdir(parents=True, exist_ok=True)
    # The run's records (metrics, evaluations, manifest, report, ...) are its top-level files.
    for path in plan.run_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, environment.output_data_dir / path.name)


def write_failure(path: Path, reason: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason[:FAILURE_REASON_LIMIT])


def read_secrets(environ: Mapping[str, str], client: Any = None) -> dict[str, str]:
    """The variables named in RFT_SECRETS with their values from AWS Secrets Manager (`client`: a boto3
    secretsmanager client; default one from the job's role). The job's request holds only the ids."""
    wanted = environ.get(SECRETS_VARIABLE)
    if not wanted:
        return {}
    try:
        names = json.loads(wanted)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise EntryError(f"{SECRETS_VARIABLE}={wanted!r}: expected a JSON object of NAME: secret id")
    # Imported here: boto3 is the optional `aws` extra, needed only when --secret was given.
    if client is None:
        import boto3

        client = boto3.client("secretsmanager")
    from botocore.exceptions import BotoCoreError, ClientError

    values = {}
    for name, secret_id in names.items():
        try:
            values[name] = client.get_secret_value(SecretId=secret_id)["SecretString"]
        except (BotoCoreError, ClientError, KeyError) as exc:
            raise EntryError(f"{SECRETS_VARIABLE}: {name}: cannot read secret {secret_id!r}: {exc}") from exc
    return values


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         code_dir: Path | None = None) -> int:
    environ = os.environ if environ is None else environ
    code_dir = code_dir or Path.cwd()
    configure_logging()
    try:
        # Into this process's environment, which the trainer and torchrun's processes read.
        secrets = read_secrets(environ)
        os.environ.update(secrets)
        if secrets:
            logger.info("read %s from AWS Secrets Manager", ", ".join(sorted(secrets)))
        environment = SageMakerEnvironment.from_environ(environ, sys.argv[1:] if argv is None else argv)
        plan = plan_run(environment, code_dir)
        logger.info(
            "host %s of %s, %d process(es) each; run directory %s%s", environment.current_host,
            environment.hosts, environment.processes_per_host, plan.run_dir,
            " (resuming)" if plan.found_checkpoint else "",
        )
        if len(environment.hosts) * environment.processes_per_host == 1:
            train_here(plan)
        else:
            run_processes(launch_command(plan, environment), code_dir)
        if environment.is_first_host:
            export_outputs(plan, environment)
    except TrainingInterrupted as exc:
        # A restarted job resumes from the checkpoint the processes saved on their way out.
        logger.warning("training stopped: %s", exc)
        write_failure(failure_file(environ), f"rft: {exc}")
        return exc.exit_code
    except Exception as exc:
        logger.exception("training failed")
        write_failure(failure_file(environ), f"rft: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
