"""The demo's preference task (prompt / chosen / rejected), generated from the SFT demo task, seeded.

Each SFT question gives one pair: chosen = the right category, rejected = another category picked at random (a
plausible wrong answer: the same kind of one-word reply). Same split by word as the SFT task, so the held-out
pairs ask about words the training pairs never mention. Run `python -m litft.demo.preference` to rewrite
`data/dpo_train.json` and `data/dpo_test.json`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from litft.demo.task import make_task_data
from litft.demo.words import CATEGORIES

DATA_DIR = Path(__file__).parent / "data"


def make_preference_data(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) pairs from the SFT demo task's (train, test) records."""
    r = random.Random(seed + 1)
    kinds = sorted(CATEGORIES)

    def pair(rec: dict[str, str]) -> dict[str, str]:
        wrong = r.choice([k for k in kinds if k != rec["output"]])
        return {"prompt": rec["instruction"], "chosen": rec["output"], "rejected": wrong}

    train, test = make_task_data(seed)
    return [pair(x) for x in train], [pair(x) for x in test]


def main() -> None:
    train, test = make_preference_data()
    for name, records in (("dpo_train.json", train), ("dpo_test.json", test)):
        (DATA_DIR / name).write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {DATA_DIR / name}: {len(records)} pairs")


if __name__ == "__main__":
    main()
