"""FSDP2 on CPU (gloo), by torch's `fully_shard` directly: `accelerate` turns FSDP off without a GPU.

`torchrun --nproc_per_node 2 tests/fsdp2_worker.py MODEL_DIR`. Checks what the trainer
relies on under FSDP2: `LogProbModel` as the sharded root gives the gradients of the unsharded
computation (the LM head, tied to the embeddings, runs inside the root's forward),
`fsdp2_full_weights` lets each process generate on its own, for different numbers of tokens,
and train again afterwards, and the vLLM weight sync's tensors (`checkpoint_tensors`) come out
whole, one gathered tensor at a time.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from rft.distributed import fsdp2_full_weights
from rft.models import LogProbModel
from rft.rollout.weight_sync import checkpoint_tensors

GRADIENT_RTOL = 1e-4


def main(model_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, processes = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    def build() -> LogProbModel:
        return LogProbModel(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), temperature=0.7,
            chunk_size=5,
        )

    whole, sharded = build(), build()
    mesh = init_device_mesh("cpu", (processes,))
    for layer in sharded.policy.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)

    rows = 2 * processes
    input_ids = torch.randint(0, 1000, (rows, 12))
    attention_mask = torch.ones_like(input_ids)
    starts = torch.arange(rows) % 4 + 3
    lengths = 12 - starts - torch.arange(rows) % 3
    logp, _ = whole(input_ids, attention_mask, starts, lengths)
    # FSDP2 averages gradients over processes: the reference is the global sum divided likewise.
    (logp.sum() / processes).backward()
    mine = slice(2 * rank, 2 * rank + 2)
    sharded_logp, _ = sharded(input_ids[mine], attention_mask[mine], starts[mine], lengths[mine])
    torch.testing.assert_close(
        sharded_logp, logp[mine, : sharded_logp.shape[1]].detach(), rtol=1e-5, atol=1e-5
    )
    sharded_logp.sum().backward()
    for (name, expected), (_, parameter) in zip(
        whole.named_parameters(), sharded.named_parameters(), strict=True
    ):
        gradient = parameter.grad.full_tensor() if isinstance(parameter.grad, DTensor) else parameter.grad
        # By norm, relative to the tensor's own: element by element, summation order (per-process
        # partial sums, other kernels on other CPUs) leaves no relative precision where terms cancel.
        # Measured up to 1.8e-6 (AMD EPYC, 1 and 2 threads);
        # a gradient missing a process's share is off by ~1.
        difference = ((gradient - expected.grad).norm() / expected.grad.norm()).item()
        assert difference < GRADIENT_RTOL, f"{name}: gradient differs by {difference:.3g} (relative)"

    prompt = input_ids[:1]
    with fsdp2_full_weights(sharded, reshard_after_forward=True), torch.no_grad():
        generated = sharded.policy.generate(input_ids=prompt, max_new_tokens=3 + 4 * rank, do_sample=False)
    expected_tokens = whole.policy.generate(input_ids=prompt, max_new_tokens=3 + 4 * rank, do_sample=False)
    assert torch.equal(generated, expected_tokens), (generated, expected_tokens)
    assert all(
        isinstance(p, DTensor) for p in sharded.parameters()
    ), "weights not sharded again after generation"
    sharded(input_ids[mine], attention_mask[mine], starts[mine], lengths[mine])[0].sum().backward()

    # Weight sync to a vLLM engine: each sharded tensor gathered on its own, whole, on every process.
    sources, changing = checkpoint_tensors(sharded.policy)
    expected = dict(whole.policy.named_parameters())
    assert set(sources) == set(changing) == set(expected)
    for name, tensor in sources.items():  # the same order everywhere: the gathers pair up
        assert torch.equal(tensor(), expected[name].detach()), f"{name}: gathered tensor differs"
    dist.destroy_process_group()
    print(f"process {rank}: fsdp2 ok")


if __name__ == "__main__":
    main(sys.argv[1])
