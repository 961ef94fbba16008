"""How completions are sampled: the settings every engine takes (torch-free, so the config can build them)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamplingSettings:
    """`seed`: the call's own random stream, request i sampling with `seed + i` (vLLM), so that the same
    call on the same weights gives the same samples: after a resume, or before and after training in an
    evaluation. None: the engine's running stream. The transformers engine samples from torch's global
    generator, which checkpoints save and restore, and ignores it."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    greedy: bool = False
    seed: int | None = None

    def seeded(self, *parts: int) -> SamplingSettings:
        """These settings with the seed `derived_seed(*parts)` (greedy decoding draws nothing: unchanged)."""
        return self if self.greedy else replace(self, seed=derived_seed(*parts))


def derived_seed(*parts: int) -> int:
    """A seed that depends on `parts` alone (the run's seed, a step's data position, a turn...), the same in
    every process and every run; below 2**31, so that `seed + i` for a call's requests stays a valid seed."""
    digest = hashlib.sha256(",".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1
