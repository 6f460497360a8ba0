"""Tests for litft.data: prompt styles, JSON/JSONL loading, masking, truncation, split, packing, collate.

Uses a real (tiny) byte-level BPE tokenizer trained here with the `tokenizers` library and loaded
through litft.tokenizer.Tokenizer.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from torch.utils.data import DataLoader

from litft.data import (
    JSON,
    Alpaca,
    DataError,
    DataModule,
    PromptStyle,
    collate,
    pack_samples,
    prompt_styles,
    tokenize_example,
    train_test_split,
)
from litft.tokenizer import Tokenizer
from litft.utils import LitftError

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


# ----------------------------------------------------------------------------------------------
# Tokenizer fixture
# ----------------------------------------------------------------------------------------------


def _train_tiny_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction:\n### Input:\n### Response:\n",
        "The quick brown fox jumps over the lazy dog. Tell me a fact about cats and numbers 0123456789.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    # A HF-style checkpoint directory, loaded by litft's own Tokenizer (bos prepended, pad token set).
    hf = _train_tiny_bpe()
    d = tmp_path_factory.mktemp("tok")
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True})
    )
    tok = Tokenizer(d)
    assert tok.bos_id == hf.token_to_id("<s>") and tok.eos_id == hf.token_to_id("</s>")
    assert tok.pad_id == 2  # non-zero, so padding tests can tell pad_id from the 0 fallback
    assert tok.use_bos
    return tok


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

WORDS = "the quick brown fox jumps over lazy dog cats tell fact numbers".split()


def make_records(n: int, seed: int = 0, max_words: int = 30) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        rec = {
            "instruction": f"Tell me fact {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6))),
            "output": " ".join(rng.choices(WORDS, k=rng.randint(1, max_words))),
        }
        if i % 3 == 0:
            rec["input"] = " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))
        recs.append(rec)
    return recs


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def all_samples(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def expected_sample(tokenizer, rec: dict, style: str = "alpaca") -> tuple[torch.Tensor, torch.Tensor]:
    prompt = PromptStyle.from_name(style).apply(rec["instruction"], rec.get("input", ""))
    p = tokenizer.encode(prompt, bos=tokenizer.use_bos)
    r = tokenizer.encode(rec["output"], bos=False, eos=True)
    return p, r


# ----------------------------------------------------------------------------------------------
# Prompt styles
# ----------------------------------------------------------------------------------------------


def test_alpaca_template_exact():
    style = PromptStyle.from_name("alpaca")
    assert style.apply("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert style.apply("Translate.", "Hallo") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nHallo\n\n### Response:\n"
    )


def test_chatml_and_llama3_formats(tokenizer):
    chatml = PromptStyle.from_name("chatml")
    assert chatml.apply("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.apply("Hi", "ctx", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\n\nctx<|im_end|>\n<|im_start|>assistant\n"
    )
    assert PromptStyle.from_name("qwen2").apply("Hi") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    llama3 = PromptStyle.from_name("llama3")
    assert llama3.apply("Hi") == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert llama3.apply("Hi", system="S").startswith("<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>")
    # End-of-turn markers become single special-token stop sequences next to EOS.
    im_end = tokenizer.encode("<|im_end|>", bos=False)
    eot = tokenizer.encode("<|eot_id|>", bos=False)
    assert len(im_end) == 1 and len(eot) == 1
    assert chatml.stop_tokens(tokenizer) == ([tokenizer.eos_id], im_end.tolist())
    assert llama3.stop_tokens(tokenizer) == ([tokenizer.eos_id], eot.tolist())
    assert PromptStyle.from_name("alpaca").stop_tokens(tokenizer) == ([tokenizer.eos_id],)


def test_family_styles_and_registry():
    assert set(prompt_styles) >= {"alpaca", "chatml", "llama3", "plain", "phi3", "gemma", "llama2", "mistral", "qwen2"}
    assert PromptStyle.from_name("plain").apply("Do it") == "Do it"
    assert PromptStyle.from_name("plain").apply("Do it", "now") == "Do it\n\nnow"
    assert PromptStyle.from_name("llama2").apply("Hi") == "[INST] Hi [/INST] "
    assert PromptStyle.from_name("llama2").apply("Hi", system="S") == "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] "
    assert PromptStyle.from_name("mistral").apply("Hi") == "[INST] Hi [/INST]"
    assert PromptStyle.from_name("phi3").apply("Hi") == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert PromptStyle.from_name("gemma").apply("Hi") == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert type(PromptStyle.from_name("ChatML")).__name__ == "ChatML"  # case-insensitive
    with pytest.raises(DataError, match="Unknown prompt style 'vicuna'.*alpaca.*chatml.*llama3"):
        PromptStyle.from_name("vicuna")


# ----------------------------------------------------------------------------------------------
# Tokenisation and masking
# ----------------------------------------------------------------------------------------------


def test_prompt_masking_exact(tokenizer, tmp_path):
    recs = make_records(6)
    path = write_json(tmp_path / "d.json", recs)
    data = JSON(json_path=path, val_json_path=path)  # val = same file: no split, order preserved
    data.setup(tokenizer, max_seq_length=512)
    assert len(data.train_dataset) == 6
    for rec, s in zip(recs, all_samples(data.train_dataset)):
        p, r = expected_sample(tokenizer, rec)
        assert torch.equal(s["input_ids"], torch.cat([p, r]))
        assert s["input_ids"][0] == tokenizer.bos_id and s["input_ids"][-1] == tokenizer.eos_id
        assert s["input_ids"].dtype == torch.long and s["labels"].shape == s["input_ids"].shape
        assert (s["labels"][: len(p)] == -100).all()  # exactly the prompt is masked
        assert torch.equal(s["labels"][len(p) :], r)  # response + EOS kept
        assert tokenizer.decode(s["input_ids"][len(p) :], skip_special_tokens=True) == rec["output"]

    # mask_prompt=False: everything is a target except the first token (nothing predicts it).
    data = JSON(json_path=path, val_json_path=path, mask_prompt=False, ignore_index=-1, add_eos=False)
    data.setup(tokenizer, max_seq_length=512)
    for rec, s in zip(recs, all_samples(data.train_dataset)):
        assert s["input_ids"][-1] != tokenizer.eos_id
        assert s["labels"][0] == -1 and torch.equal(s["labels"][1:], s["input_ids"][1:])


def test_truncation_warns_once_with_count(tokenizer, tmp_path):
    recs = [{"instruction": "Hi", "output": "fox " * n} for n in (2, 40, 60, 3)]
    path = write_json(tmp_path / "d.json", recs)
    data = JSON(json_path=path, val_json_path=path, prompt_style="plain")
    with pytest.warns(UserWarning) as record:
        data.setup(tokenizer, max_seq_length=20)
    msgs = [str(w.message) for w in record if "truncated" in str(w.message)]
    # One warning per file (train and val here are the same file, so two identical ones).
    assert len(msgs) == 2 and all("2 of 4 samples" in m and "max_seq_length=20" in m and "d.json" in m for m in msgs)
    assert data.num_truncated == 4
    lengths = [len(s["input_ids"]) for s in all_samples(data.train_dataset)]
    assert max(lengths) == 20 and lengths[0] < 20
    # A truncated sample is a prefix of the untruncated one, labels included.
    s, full, plen, kept = tokenize_example(tokenizer, "Hi", recs[1]["output"], None)
    assert full > 20 and kept == full - plen
    assert torch.equal(data.train_dataset[1]["input_ids"], s["input_ids"][:20])
    assert torch.equal(data.train_dataset[1]["labels"], s["labels"][:20])

    # No truncation, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JSON(json_path=path, val_json_path=path).setup(tokenizer, max_seq_length=4096)


def test_prompt_filling_max_seq_length_raises(tokenizer, tmp_path):
    recs = [{"instruction": "short", "output": "ok"}, {"instruction": "fox " * 50, "output": "ok"}]
    path = write_json(tmp_path / "long.json", recs)
    prompt_len = len(tokenizer.encode(PromptStyle.from_name("alpaca").apply("fox " * 50), bos=True))
    data = JSON(json_path=path)
    with pytest.raises(DataError) as exc:
        data.setup(tokenizer, max_seq_length=prompt_len)  # prompt fits exactly, response doesn't
    msg = str(exc.value)
    assert "long.json" in msg and "record 1" in msg and f"{prompt_len} tokens" in msg
    assert "no target tokens" in msg and "Raise max_seq_length" in msg and "shorten" in msg
    with pytest.warns(UserWarning, match="1 of 2 samples"):
        data.setup(tokenizer, max_seq_length=prompt_len + 1)  # one response token left: fine

    # Empty response with add_eos=False: nothing to learn, named as such.
    path = write_json(tmp_path / "empty_out.json", [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "c"}])
    with pytest.raises(DataError, match=r"empty_out.json.*record 0.*response is empty.*add_eos"):
        JSON(json_path=path, add_eos=False).setup(tokenizer, 128)


# ----------------------------------------------------------------------------------------------
# Formats and keys
# ----------------------------------------------------------------------------------------------


def test_json_jsonl_and_custom_keys_agree(tokenizer, tmp_path):
    recs = make_records(10)
    renamed = [{"prompt": r["instruction"], "context": r.get("input", ""), "response": r["output"]} for r in recs]
    variants = [
        JSON(json_path=write_json(tmp_path / "a.json", recs)),
        JSON(json_path=write_jsonl(tmp_path / "a.jsonl", recs)),
        JSON(json_path=write_jsonl(tmp_path / "lines.json", recs)),  # JSONL content named .json
        JSON(
            json_path=write_json(tmp_path / "c.json", renamed),
            instruction_key="prompt",
            input_key="context",
            output_key="response",
        ),
    ]
    results = []
    for data in variants:
        data.setup(tokenizer, max_seq_length=256, seed=3)
        results.append([s["input_ids"].tolist() for s in all_samples(data.train_dataset) + all_samples(data.val_dataset)])
    assert all(r == results[0] for r in results[1:])
    assert len(results[0]) == 10


def test_input_null_or_missing_is_empty(tokenizer, tmp_path):
    recs = [{"instruction": "x", "input": None, "output": "y"}, {"instruction": "x", "output": "y"}, {"instruction": "x", "input": "", "output": 7}]
    path = write_json(tmp_path / "d.json", recs)
    data = JSON(json_path=path, val_json_path=path)
    data.setup(tokenizer, 64)
    a, b, c = all_samples(data.train_dataset)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert tokenizer.decode(c["input_ids"], skip_special_tokens=True).endswith("### Response:\n7")


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------


def test_split_is_deterministic_by_seed(tokenizer, tmp_path):
    items = list(range(100))
    tr, va = train_test_split(items, 0.1, seed=1)
    assert (tr, va) == train_test_split(items, 0.1, seed=1)
    assert va != train_test_split(items, 0.1, seed=2)[1]
    assert len(va) == 10 and sorted(tr + va) == items and tr == sorted(tr)
    assert len(train_test_split([1, 2], 0.01, 0)[1]) == 1  # val never empty...
    assert len(train_test_split([1, 2], 0.99, 0)[0]) == 1  # ...nor train
    with pytest.raises(DataError, match="need at least 2"):
        train_test_split([1], 0.5, 0)

    path = write_json(tmp_path / "d.json", make_records(40))
    a, b = JSON(json_path=path, val_split_fraction=0.25), JSON(json_path=path, val_split_fraction=0.25)
    a.setup(tokenizer, 256, seed=7)
    b.setup(tokenizer, 256, seed=7)
    assert len(a.val_dataset) == 10 and len(a.train_dataset) == 30
    assert [s["input_ids"].tolist() for s in all_samples(a.val_dataset)] == [s["input_ids"].tolist() for s in all_samples(b.val_dataset)]
    b.setup(tokenizer, 256, seed=8)
    assert [s["input_ids"].tolist() for s in all_samples(a.val_dataset)] != [s["input_ids"].tolist() for s in all_samples(b.val_dataset)]

    one = write_json(tmp_path / "one.json", make_records(1))
    with pytest.raises(DataError, match=r"one.json.*only 1 sample.*val_json_path"):
        JSON(json_path=one).setup(tokenizer, 256)
    with pytest.raises(DataError, match="val_split_fraction"):
        JSON(json_path=one, val_split_fraction=0.0)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


def test_packing_invariants(tokenizer, tmp_path):
    max_len = 64
    path = write_json(tmp_path / "d.json", make_records(60, max_words=40))
    unpacked = JSON(json_path=path, val_split_fraction=0.2, prompt_style="plain")
    packed = JSON(json_path=path, val_split_fraction=0.2, prompt_style="plain", packing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some samples get truncated; that is tested elsewhere
        unpacked.setup(tokenizer, max_len, seed=5)
        packed.setup(tokenizer, max_len, seed=5)

    for split in ("train_dataset", "val_dataset"):
        originals = all_samples(getattr(unpacked, split))
        items = all_samples(getattr(packed, split))
        assert len(items) < len(originals)  # it actually packs
        recovered = []
        for item in items:
            n = len(item["input_ids"])
            assert n <= max_len
            assert all(item[k].shape == (n,) and item[k].dtype == torch.long for k in ("labels", "position_ids", "segment_ids"))
            segs = item["segment_ids"].tolist()
            assert segs[0] == 1 and all(b - a in (0, 1) for a, b in zip(segs, segs[1:]))  # 1, 1, 2, 2, 2, 3...
            for seg in range(1, segs[-1] + 1):
                where = (item["segment_ids"] == seg).nonzero().flatten()
                start, end = where[0].item(), where[-1].item() + 1
                assert torch.equal(item["position_ids"][start:end], torch.arange(end - start))
                assert item["labels"][start] == -100  # never predict across the boundary
                recovered.append((item["input_ids"][start:end].tolist(), item["labels"][start:end].tolist()))
        # Every original sample appears exactly once, intact (tokens and labels).
        expected = sorted((s["input_ids"].tolist(), s["labels"].tolist()) for s in originals)
        assert sorted(recovered) == expected

    # Deterministic: same seed, same packing.
    again = JSON(json_path=path, val_split_fraction=0.2, prompt_style="plain", packing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.setup(tokenizer, max_len, seed=5)
    assert [s["input_ids"].tolist() for s in all_samples(again.train_dataset)] == [
        s["input_ids"].tolist() for s in all_samples(packed.train_dataset)
    ]

    # Collate pads the packing keys: segment 0 and label -100 on padding.
    batch = next(iter(DataLoader(packed.train_dataset, batch_size=4, collate_fn=packed.collate_fn)))
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids"}
    for row in range(4):
        n = len(packed.train_dataset[row]["input_ids"])
        assert (batch["segment_ids"][row, n:] == 0).all() and (batch["labels"][row, n:] == -100).all()
        assert (batch["segment_ids"][row, :n] > 0).all()


def test_pack_samples_best_fit():
    def s(n: int) -> dict:
        ids = torch.arange(n)
        return {"input_ids": ids, "labels": ids.clone()}

    packed = pack_samples([s(6), s(3), s(5), s(4), s(2)], max_seq_length=10)
    assert sorted(len(p["input_ids"]) for p in packed) == [10, 10]  # 6+4, 5+3+2
    with pytest.raises(DataError, match="longer than max_seq_length"):
        pack_samples([s(11)], 10)


def test_packing_needs_max_seq_length(tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", make_records(4))
    with pytest.raises(DataError, match="packing=True needs a positive max_seq_length"):
        JSON(json_path=path, packing=True).setup(tokenizer, max_seq_length=-1)
    data = JSON(json_path=path)
    data.setup(tokenizer, max_seq_length=-1)  # unpacked: -1 = no truncation
    assert data.num_truncated == 0


# ----------------------------------------------------------------------------------------------
# Collate
# ----------------------------------------------------------------------------------------------


def test_collate_right_pads(tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", make_records(5))
    data = JSON(json_path=path, val_json_path=path)
    data.setup(tokenizer, 256)
    samples = all_samples(data.train_dataset)
    batch = data.collate_fn(samples)
    assert set(batch) == {"input_ids", "labels"}
    longest = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == (5, longest)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], s["input_ids"])
        assert torch.equal(batch["labels"][row, :n], s["labels"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all()
        assert (batch["labels"][row, n:] == -100).all()

    # A tokenizer without a pad token pads input_ids with 0.
    nopad_dir = tmp_path / "nopad"
    nopad_dir.mkdir()
    (nopad_dir / "tokenizer.json").write_text((tokenizer.checkpoint_dir / "tokenizer.json").read_text())
    (nopad_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    nopad = Tokenizer(nopad_dir)
    assert nopad.pad_id is None
    data.setup(nopad, 256)
    batch = data.collate_fn(all_samples(data.train_dataset))
    for row, s in enumerate(samples):
        assert (batch["input_ids"][row, len(s["input_ids"]) :] == 0).all()

    # The bare function: custom ignore_index is used for label padding.
    short = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-1, 6])}
    long = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-1, 6, 7])}
    out = collate([short, long], pad_id=0, ignore_index=-1)
    assert out["input_ids"].tolist() == [[5, 6, 0], [5, 6, 7]]
    assert out["labels"].tolist() == [[-1, 6, -1], [-1, 6, 7]]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_error_messages(tokenizer, tmp_path):
    def setup(path: Path, **kw) -> None:
        JSON(json_path=path, **kw).setup(tokenizer, 128)

    with pytest.raises(FileNotFoundError, match=r"nope.json' does not exist.*--data.json_path"):
        setup(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        setup(tmp_path)

    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(DataError, match=r"empty.json' is empty"):
        setup(tmp_path / "empty.json")
    with pytest.raises(DataError, match=r"zero.json' contains no samples"):
        setup(write_json(tmp_path / "zero.json", []))

    (tmp_path / "bad.json").write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"bad.json' is not valid JSON: .* line 3, column"):
        setup(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n')
    with pytest.raises(DataError, match=r"bad.jsonl': line 3 is not valid JSON"):
        setup(tmp_path / "bad.jsonl")

    with pytest.raises(DataError, match=r"holds a top-level dict"):
        setup(write_json(tmp_path / "obj.json", {"data": []}))
    with pytest.raises(DataError, match=r"record 1 is a list, expected a JSON object"):
        setup(write_json(tmp_path / "lst.json", [{"instruction": "a", "output": "b"}, ["a", "b"]]))

    recs = make_records(3)
    recs[2] = {"question": "q", "answer": "a"}
    with pytest.raises(DataError) as exc:
        setup(write_json(tmp_path / "keys.json", recs))
    msg = str(exc.value)
    assert "keys.json" in msg and "record 2 has no 'instruction' field" in msg
    assert "['answer', 'question']" in msg and "--data.instruction_key" in msg
    recs[2] = {"instruction": "q", "answer": "a"}
    with pytest.raises(DataError, match=r"record 2 \(line 3\) has no 'output' field.*--data.output_key"):
        setup(write_jsonl(tmp_path / "keys.jsonl", recs))
    with pytest.raises(DataError, match=r"field 'output' must be a string, got list"):
        setup(write_json(tmp_path / "typ.json", [{"instruction": "a", "output": ["b"]}]))

    with pytest.raises(DataError, match="Unknown prompt style 'nope'"):
        JSON(json_path=tmp_path / "x.json", prompt_style="nope")  # caught at construction time
    # All data errors are one-line CLI errors and plain ValueErrors.
    assert issubclass(DataError, LitftError) and issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------------------
# CLI wiring
# ----------------------------------------------------------------------------------------------


def test_jsonargparse_builds_data_modules(tokenizer, tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--data", type=DataModule)
    path = write_json(tmp_path / "f.json", make_records(8))
    cfg = parser.parse_args(["--data", "JSON", "--data.json_path", str(path), "--data.mask_prompt", "false", "--data.packing", "true"])
    data = parser.instantiate(cfg).data
    assert isinstance(data, JSON) and data.json_path == path and data.mask_prompt is False and data.packing is True
    data.setup(tokenizer, 128, seed=0)
    assert len(data.train_dataset) >= 1 and len(data.val_dataset) == 1

    cfg = parser.parse_args(["--data", "Alpaca", "--data.json_path", str(path), "--data.val_split_fraction", "0.5"])
    data = parser.instantiate(cfg).data
    assert isinstance(data, Alpaca) and data.val_split_fraction == 0.5 and data.prompt_style == "alpaca"


def test_one_sample_and_no_validation_file_is_one_error(tokenizer, tmp_path):
    data = JSON(json_path=write_json(tmp_path / "one.json", make_records(1)))
    with pytest.raises(DataError, match=r"only 1 sample\(s\), too few to split .* --data.val_json_path"):
        data.setup(tokenizer, max_seq_length=256)
    data = JSON(json_path=write_json(tmp_path / "one.json", make_records(1)), val_json_path=tmp_path / "one.json")
    data.setup(tokenizer, max_seq_length=256)  # a separate validation file: nothing to split
    assert len(data.train_dataset) == 1 and len(data.val_dataset) == 1
