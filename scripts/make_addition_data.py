"""Write the quickstart's data: single-digit additions, train and held-out pairs disjoint.

    python scripts/make_addition_data.py   # -> recipes/data/addition_{train,heldout}.jsonl
    python scripts/make_addition_data.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PHRASINGS = ["What is {a} + {b}?", "Compute {a} + {b}.", "What is the sum of {a} and {b}?"]
TAGS = ["what_is", "compute", "sum_of"]


OUT_DIR = Path(__file__).resolve().parent.parent / "recipes" / "data"


def main(out_dir: Path = OUT_DIR, held_out: int = 64) -> None:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "addition_heldout.jsonl").open("w") as handle:
        for i, (a, b) in enumerate(pairs[:held_out]):
            question = PHRASINGS[i % len(PHRASINGS)].format(a=a, b=b)
            handle.write(
                json.dumps({"prompt": question, "answer": a + b, "phrasing": TAGS[i % len(PHRASINGS)]}) + "\n"
            )
    with (out_dir / "addition_train.jsonl").open("w") as handle:
        for a, b in pairs[held_out:]:
            for phrasing in PHRASINGS:
                handle.write(
                    json.dumps({
                        "prompt": phrasing.format(a=a, b=b), "answer": a + b,
                        "phrasing": TAGS[PHRASINGS.index(phrasing)],
                    })
                    + "\n"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder to write to (default {OUT_DIR})")
    main(parser.parse_args().out)
