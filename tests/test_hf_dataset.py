"""--data HF through the real `datasets` library, offline: a save_to_disk directory and a parquet file give exactly
the samples (hence the same training run, same seed) that the equivalent JSON file gives; missing columns and
splits are one DataError each."""
from __future__ import annotations

import json

import pytest
import torch

datasets = pytest.importorskip("datasets")

from litft.data import HF, JSON, Conversations, DataError  # noqa: E402
from litft.tokenizer import Tokenizer  # noqa: E402
from tests.chat_fixtures import CONVERSATIONS, SYSTEM, write_chat_tokenizer  # noqa: E402
from tests.helpers import make_task  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    # load_dataset writes its arrow cache; keep it out of ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _same(a, b) -> None:
    for x, y in ((a.train_dataset, b.train_dataset), (a.val_dataset, b.val_dataset)):
        assert len(x) == len(y) > 0
        for s, t in zip(x.samples, y.samples):
            assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)


def test_alpaca_rows_equal_json(ckpt, tmp_path):
    path = make_task(tmp_path / "task.json", n=24)
    records = json.loads(path.read_text())
    tok = Tokenizer(ckpt)
    want = JSON(path, val_split_fraction=0.25)
    want.setup(tok, 256, seed=3)
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "task.parquet"))
    for source in (tmp_path / "single", tmp_path / "dict", tmp_path / "task.parquet"):
        got = HF(str(source), val_split_fraction=0.25)
        got.setup(tok, 256, seed=3)
        _same(want, got)
    # a named validation split
    val = HF(str(tmp_path / "dict"), val_split="test")
    val.setup(tok, 256)
    assert len(val.train_dataset) == 24 and len(val.val_dataset) == 4


def test_conversation_rows_equal_json(tmp_path):
    tok = Tokenizer(write_chat_tokenizer(tmp_path / "tok", "smollm2"))
    convs = [CONVERSATIONS["multi"], [SYSTEM] + CONVERSATIONS["single"]] * 4
    (tmp_path / "c.json").write_text(json.dumps([{"messages": c} for c in convs]))
    want = Conversations(tmp_path / "c.json", val_split_fraction=0.25)
    want.setup(tok, 512)
    datasets.Dataset.from_list([{"messages": c} for c in convs]).save_to_disk(str(tmp_path / "conv"))
    got = HF(str(tmp_path / "conv"), val_split_fraction=0.25)
    got.setup(tok, 512)
    _same(want, got)


def test_missing_column_and_split_are_one_error(ckpt, tmp_path):
    ds = datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 4)
    ds.save_to_disk(str(tmp_path / "qa"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "qa_dict"))
    tok = Tokenizer(ckpt)
    with pytest.raises(DataError, match=r"no column 'instruction'; its columns are question, answer.*instruction_key"):
        HF(str(tmp_path / "qa")).setup(tok, 256)
    with pytest.raises(DataError, match="no split 'validation'; its splits are train"):
        HF(str(tmp_path / "qa_dict"), val_split="validation").setup(tok, 256)
    with pytest.raises(DataError, match="cannot load dataset"):
        HF(str(tmp_path / "no_such_dir")).setup(tok, 256)
    mapped = HF(str(tmp_path / "qa"), instruction_key="question", output_key="answer", val_split_fraction=0.5)
    mapped.setup(tok, 256)
    assert len(mapped.train_dataset) == 2


def test_without_datasets_the_error_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    with pytest.raises(DataError, match=r"pip install 'litft\[data\]'"):
        HF(str(tmp_path)).setup(None, 64)
