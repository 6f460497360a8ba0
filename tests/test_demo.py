"""The shipped demo assets (litft/demo/base, litft/demo/data) are complete, consistent and reproducible.

Fast: loads the 2M-parameter checkpoint and regenerates only the task data (never re-runs pretraining).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from litft.checkpoint import expected_shapes, load_model, load_state_dict
from litft.cli import run
from litft.demo.build import build
from litft.demo.task import word_of, words_of_hard
from litft.demo.words import CATEGORIES
from litft.models.config import Config
from litft.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "litft" / "demo"
BASE, DATA = DEMO / "base", DEMO / "data"


def _records(name: str) -> list[dict[str, str]]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def test_base_checkpoint_files_are_small_and_complete():
    names = {"model.safetensors", "model_config.yaml", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert names <= {p.name for p in BASE.iterdir()}
    total = sum(p.stat().st_size for p in BASE.iterdir())
    assert total < 10 * 2**20, f"demo base is {total / 2**20:.1f} MiB; keep it under 10 MiB"


def test_base_checkpoint_matches_named_config():
    config = Config.from_checkpoint(BASE)
    assert config.to_dict() == Config.from_name("litft-demo").to_dict()
    sd = load_state_dict(BASE)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v) for k, v in expected_shapes(config).items()}
    assert all(v.dtype == torch.float32 for v in sd.values())

    model = load_model(BASE)
    assert model.lm_head.weight is model.embed.weight  # tied, as the config says
    logits = model(torch.tensor([[0, 5, 9, 300]]))
    assert logits.shape == (1, 4, config.vocab_size) and torch.isfinite(logits).all()


def test_tokenizer_round_trips_and_special_tokens():
    tok = Tokenizer(BASE)
    assert tok.vocab_size == Config.from_name("litft-demo").vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2) and tok.eos_ids == {1} and tok.use_bos
    for text in ["the red fox eats a small apple", "Anna counted: 17 18 19.", "cat\nlamp  river",
                 "Below is an instruction that describes a task.\n\n### Response:\n", "naïve café ✓ 日本"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.eos_id not in ids.tolist()
        # byte-level BPE with a prefix space: decoding gives the text back behind one leading space
        assert tok.decode(ids, skip_special_tokens=True) == " " + text
    # everyday words are single tokens: the model learned them, the task needs no new vocabulary
    assert len(tok.encode("egg", bos=False)) == 1


def test_task_data_is_nonempty_wellformed_and_disjoint():
    train, test = _records("train.json"), _records("test.json")
    assert len(train) >= 500 and 100 <= len(test) <= 500
    category_of = {w: c for c, words in CATEGORIES.items() for w in words}
    for rec in train + test:
        assert set(rec) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in rec.values())
        assert rec["output"] == category_of[word_of(rec)]  # the answer is right
    assert len({json.dumps(r, sort_keys=True) for r in train}) == len(train)
    # held out by *word*: no test word is ever asked about in training
    assert not {word_of(r) for r in train} & {word_of(r) for r in test}
    assert {r["output"] for r in test} == set(CATEGORIES)


def test_hard_task_data_is_right_and_held_out_by_word():
    train, test = _records("hard_train.json"), _records("hard_test.json")
    assert len(train) == 160 and len(test) == 200
    category_of = {w: c for c, words in CATEGORIES.items() for w in words}
    easy_train_words = {word_of(r) for r in _records("train.json")}
    for rec in train + test:
        words = words_of_hard(rec)
        kinds = [category_of[w] for w in words]
        assert len(words) in (2, 3) and len(set(words)) == len(words)
        assert rec["output"] == ", ".join(kinds[:-1]) + " and " + kinds[-1]  # the kinds, in order
    test_words = {w for r in test for w in words_of_hard(r)}
    # every word of a test question is unseen in the training data of both tasks
    assert not test_words & {w for r in train for w in words_of_hard(r)} and not test_words & easy_train_words
    assert len({r["instruction"] for r in train}) == len(train)


def test_build_regenerates_identical_task_data(tmp_path):
    build(tmp_path, model=False)  # the default seed is the shipped one; data only, no pretraining
    for name in ("train.json", "test.json", "hard_train.json", "hard_test.json"):
        assert (tmp_path / "data" / name).read_bytes() == (DATA / name).read_bytes()
    build(tmp_path / "other", seed=1, model=False)
    assert (tmp_path / "other" / "data" / "test.json").read_bytes() != (DATA / "test.json").read_bytes()


def test_demo_config_learns_the_task(tmp_path, monkeypatch):
    """The README's first command, for real: the untuned base gets the held-out questions wrong, LoRA
    fine-tuning through the CLI gets them (almost) all right, and the validation loss collapses."""
    monkeypatch.chdir(DEMO.parents[1])  # the config's paths are relative to the repository root
    out = tmp_path / "out"
    metrics = run(["finetune", "lora", "--config", "config_hub/finetune/demo/lora.yaml", "--out_dir", str(out)])
    assert metrics["exact_match_before"] <= 0.05
    assert metrics["exact_match_after"] >= 0.8
    assert metrics["val_loss"] < metrics["val_loss_before"] / 10
    assert (out / "final" / "adapter.safetensors").is_file()
    assert list((out / "logs" / "tensorboard").glob("version_0/events.out.tfevents.*"))
