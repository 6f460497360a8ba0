"""The conversational demo (config_hub/finetune/chat-demo/lora.yaml): the demo task as 2-3-turn conversations in the
ChatML style on the demo base. Its data files are generated here from the demo's own train/test split (so the
held-out words stay held out), and the test checks the committed files are exactly that."""
from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "litft" / "demo" / "data"


def make_chat_data(records: list[dict], seed: int) -> list[dict]:
    """Group the demo's question/answer records into conversations of 2-3 user/assistant turns, in order."""
    r = random.Random(seed)
    conversations, i = [], 0
    while i < len(records):
        n = r.choice((2, 3))
        if len(records) - i - n == 1:  # never leave a 1-turn conversation at the end
            n += 1
        turns = records[i : i + n]
        i += n
        messages = []
        for rec in turns:
            messages += [{"role": "user", "content": rec["instruction"]}, {"role": "assistant", "content": rec["output"]}]
        conversations.append({"messages": messages})
    return conversations


def chat_files() -> dict[str, str]:
    train = json.loads((DATA / "train.json").read_text(encoding="utf-8"))
    test = json.loads((DATA / "test.json").read_text(encoding="utf-8"))
    return {"chat_train.json": json.dumps(make_chat_data(train, 0), indent=1) + "\n",
            "chat_test.json": json.dumps(make_chat_data(test, 1), indent=1) + "\n"}


def test_committed_chat_data_is_generated_from_the_demo_split():
    for name, text in chat_files().items():
        assert (DATA / name).read_text(encoding="utf-8") == text, "regenerate: python -m tests.test_chat_demo"
    test_words = {json.dumps(m) for c in json.loads(chat_files()["chat_test.json"]) for m in c["messages"]}
    train_words = {json.dumps(m) for c in json.loads(chat_files()["chat_train.json"]) for m in c["messages"]
                   if m["role"] == "user"}
    assert not (test_words & train_words)  # no held-out question appears in training


if __name__ == "__main__":
    for name, text in chat_files().items():
        (DATA / name).write_text(text, encoding="utf-8")
