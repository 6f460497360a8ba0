"""litft.tokenizer against the oracle `transformers.AutoTokenizer`, on tokenizers trained here (no network, no mocks).

Cases:
* "hf_bpe": byte-level BPE trained with `tokenizers`, whose post-processor adds <s>; generation_config lists 2 eos.
* "hf_chatml": byte-level BPE without bos (Qwen-style): eos <|im_end|>, pad <|endoftext|>.
* "sp_bpe": a Llama-style sentencepiece BPE `tokenizer.model` (byte fallback, no normalization) with a Llama
  tokenizer_config.json and no tokenizer.json, so litft uses sentencepiece and transformers loads the .model itself.
* "sp_unigram": a sentencepiece unigram model. transformers 5's LlamaTokenizer loads any tokenizer.model as BPE
  (merges re-derived from the vocab), which segments a unigram model differently from sentencepiece, so the oracle
  is transformers' own Llama converter (`LlamaConverter`, which keeps the Unigram model) saved as tokenizer.json and
  loaded with AutoTokenizer; litft reads the same tokenizer.model through sentencepiece.
* "hf_unigram": litft's huggingface backend on that converted tokenizer.json, with clean_up_tokenization_spaces on.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from litft.tokenizer import TOKENIZER_FILES, Tokenizer, copy_tokenizer_files  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# corpus and probe strings

_SYLLABLES = "ka lo mi ne ta ru shi po ve da an en in on un the ing er ly tion hel wor ld é ü ñ ø 你 好 世 界 日 本".split()


def _corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))

    lines = []
    for _ in range(n):
        sep = rng.choice([" ", " ", " ", "  ", "    ", "\n", "\t"])
        line = rng.choice(["", "", " ", "  "]) + sep.join(word() for _ in range(rng.randint(2, 12)))
        lines.append(line + rng.choice(["", ".", ",", "!", "?", " 123", " 42."]))
    return lines


CORPUS = _corpus()

TEXTS = [
    "",
    " ",
    "   ",
    "\n",
    "hello world",
    "Hello, World!",
    "  leading and trailing  ",
    "multiple   spaces\tand\ttabs\n\nand newlines\n",
    "\t\tindented\n    code",
    "café naïve façade Ωmega øl",
    "日本語のテキスト 你好世界",
    "emoji 🙂🚀 and ZWJ 👩‍💻",
    "digits 123 4567 3.14",
    "wait . what ? it 's ok , fine ! don 't",
    "<|im_end|>",
    "user<|im_end|>\nassistant",
    "say <|im_end|> twice<|im_end|>",
    "a <s> b </s> c",
    "</s>",
    "x</s>y",
    "▁literal metaspace",
] + CORPUS[:25]


# ---------------------------------------------------------------------------------------------------------------------
# builders


def _train_byte_level_bpe(special_tokens: list[str]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _build_hf_bpe(root: Path) -> Path:
    d = root / "hf_bpe"
    tok = _train_byte_level_bpe(["<unk>", "<s>", "</s>", "<|im_end|>"])
    bos = tok.token_to_id("<s>")
    # the post-processor adds bos, as Llama 3's tokenizer.json does; the config does not say add_bos_token
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_end|>"],
    )
    hf.save_pretrained(d)
    gen = {"bos_token_id": bos, "eos_token_id": [tok.token_to_id("</s>"), tok.token_to_id("<|im_end|>")]}
    _write_json(d / "generation_config.json", gen)
    return d


def _build_hf_chatml(root: Path) -> Path:
    d = root / "hf_chatml"
    tok = _train_byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds nothing, like Qwen2's
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.save_pretrained(d)
    _write_json(d / "generation_config.json", {"eos_token_id": tok.token_to_id("<|im_end|>")})
    return d


def _train_spm(model_type: str, vocab_size: int) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        # Llama's settings: byte fallback, identity normalization, whitespace kept, digits split, <unk>/<s>/</s> = 0/1/2
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<|im_end|>"],
        minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


# What a Llama 2 tokenizer_config.json holds (special tokens serialized as AddedToken dicts).
def _llama_config() -> dict:
    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}  # fmt: skip

    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": added("<s>"),
        "eos_token": added("</s>"),
        "unk_token": added("<unk>"),
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
    }


def _build_sp_bpe(root: Path) -> Path:
    d = root / "sp_bpe"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(_train_spm("bpe", 500))
    _write_json(d / "tokenizer_config.json", _llama_config())
    return d


def _build_sp_unigram(root: Path) -> tuple[Path, Path]:
    from transformers import SentencePieceBackend
    from transformers.convert_slow_tokenizer import LlamaConverter

    d = root / "sp_unigram"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(_train_spm("unigram", 500))
    _write_json(d / "tokenizer_config.json", _llama_config())

    oracle_dir = root / "sp_unigram_oracle"
    slow = SentencePieceBackend(vocab_file=str(d / "tokenizer.model"), legacy=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=LlamaConverter(slow).converted(), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True,
    )  # fmt: skip
    fast.save_pretrained(oracle_dir)
    return d, oracle_dir


def _build_hf_unigram(oracle_dir: Path, root: Path) -> Path:
    d = root / "hf_unigram"
    d.mkdir()
    copy_tokenizer_files(oracle_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True  # transformers applies it for non-BPE models: check we mirror it
    _write_json(d / "tokenizer_config.json", config)
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """case -> (directory litft loads, directory AutoTokenizer loads)"""
    root = tmp_path_factory.mktemp("tokenizers")
    hf_bpe, hf_chatml, sp_bpe = _build_hf_bpe(root), _build_hf_chatml(root), _build_sp_bpe(root)
    sp_unigram, unigram_oracle = _build_sp_unigram(root)
    hf_unigram = _build_hf_unigram(unigram_oracle, root)
    assert not (sp_bpe / "tokenizer.json").exists() and not (sp_unigram / "tokenizer.json").exists()
    return {
        "hf_bpe": (hf_bpe, hf_bpe),
        "hf_chatml": (hf_chatml, hf_chatml),
        "sp_bpe": (sp_bpe, sp_bpe),
        "sp_unigram": (sp_unigram, unigram_oracle),
        "hf_unigram": (hf_unigram, hf_unigram),
    }


@pytest.fixture(scope="module")
def loaded(dirs: dict) -> dict[str, tuple[Tokenizer, object]]:
    return {case: (Tokenizer(ours), AutoTokenizer.from_pretrained(theirs)) for case, (ours, theirs) in dirs.items()}


@pytest.fixture(params=["hf_bpe", "hf_chatml", "sp_bpe", "sp_unigram", "hf_unigram"])
def pair(request: pytest.FixtureRequest, loaded: dict) -> tuple[str, Tokenizer, object]:
    return (request.param, *loaded[request.param])


# ---------------------------------------------------------------------------------------------------------------------
# parity with transformers


def test_backend_and_vocab(pair: tuple) -> None:
    case, ours, theirs = pair
    assert ours.backend == ("sentencepiece" if case.startswith("sp_") else "huggingface")
    assert ours.vocab_size == len(theirs)
    assert ours.bos_id == theirs.bos_token_id
    assert ours.eos_id == theirs.eos_token_id
    assert ours.pad_id == theirs.pad_token_id
    for token in theirs.all_special_tokens + ["<|im_end|>"]:
        assert ours.token_to_id(token) == theirs.convert_tokens_to_ids(token), token
    assert ours.token_to_id("definitely-not-a-token-☃") is None


def test_encode_matches_transformers(pair: tuple) -> None:
    case, ours, theirs = pair
    for text in TEXTS:
        expected = theirs(text)["input_ids"]
        got = ours.encode(text)
        assert got.dtype == torch.long and got.ndim == 1
        assert got.tolist() == expected, (case, text, theirs.convert_ids_to_tokens(expected))
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, bos=False).tolist() == expected, (case, text)


def test_decode_matches_transformers(pair: tuple) -> None:
    case, ours, theirs = pair
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        for skip in (False, True):
            expected = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (case, text, skip)
        assert ours.decode(torch.tensor(ids)) == theirs.decode(ids)
    # arbitrary id sequences too: specials mid-text, lone/partial byte-fallback pieces (invalid UTF-8), out-of-order
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 8))]
        for skip in (False, True):
            expected = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (case, ids, skip)


# ---------------------------------------------------------------------------------------------------------------------
# bos / eos / specials


def test_special_tokens_in_text_are_single_ids(pair: tuple) -> None:
    _, ours, _ = pair
    im_end = ours.token_to_id("<|im_end|>")
    ids = ours.encode("user<|im_end|>\nassistant", bos=False).tolist()
    assert ids.count(im_end) == 1
    assert ours.encode("<|im_end|>", bos=False).tolist() == [im_end]


def test_bos_eos_added_exactly_once(pair: tuple) -> None:
    case, ours, _ = pair
    if ours.bos_id is not None:
        with_bos = ours.encode("hello world", bos=True).tolist()
        assert with_bos[0] == ours.bos_id and with_bos.count(ours.bos_id) == 1
        assert ours.bos_id not in ours.encode("hello world", bos=False).tolist()
        assert ours.encode("", bos=True).tolist() == [ours.bos_id]
    else:
        with pytest.raises(ValueError, match="bos"):
            ours.encode("hi", bos=True)
    with_eos = ours.encode("hello world", bos=False, eos=True).tolist()
    assert with_eos[-1] == ours.eos_id and with_eos.count(ours.eos_id) == 1
    assert ours.encode("hello world", bos=False).tolist() == with_eos[:-1]
    assert ours.encode("", bos=False).tolist() == []


def test_max_length_truncates(pair: tuple) -> None:
    _, ours, _ = pair
    full = ours.encode(TEXTS[7], eos=True)
    assert ours.encode(TEXTS[7], eos=True, max_length=5).tolist() == full[:5].tolist()
    assert ours.encode(TEXTS[7], eos=True, max_length=-1).tolist() == full.tolist()


def test_ids_flags_and_generation_config(dirs: dict) -> None:
    hf = Tokenizer(dirs["hf_bpe"][0])
    assert hf.use_bos is True  # from the tokenizer.json post-processor alone
    assert hf.eos_ids == {hf.token_to_id("</s>"), hf.token_to_id("<|im_end|>")}  # generation_config list
    assert hf.eos_id == hf.token_to_id("</s>") and hf.pad_id is None

    chat = Tokenizer(dirs["hf_chatml"][0])
    assert chat.use_bos is False and chat.bos_id is None
    assert chat.eos_ids == {chat.eos_id} == {chat.token_to_id("<|im_end|>")}
    assert chat.pad_id == chat.token_to_id("<|endoftext|>")

    sp = Tokenizer(dirs["sp_bpe"][0])
    assert (sp.use_bos, sp.bos_id, sp.eos_id, sp.eos_ids, sp.pad_id) == (True, 1, 2, {2}, None)


@pytest.mark.parametrize("post_processor_adds_bos", [True, False])
def test_add_bos_token_in_config_wins(dirs: dict, tmp_path: Path, post_processor_adds_bos: bool) -> None:
    # An explicit add_bos_token decides even against the tokenizer.json post-processor (transformers v4 Llama/Gemma
    # semantics; v5 would follow the post-processor, so here we compare with transformers *without* specials).
    d = tmp_path / "flag"
    copy_tokenizer_files(dirs["hf_bpe"][0], d)
    if not post_processor_adds_bos:
        tok_json = json.loads((d / "tokenizer.json").read_text())
        tok_json["post_processor"] = None
        _write_json(d / "tokenizer.json", tok_json)
    assert Tokenizer(d).use_bos is post_processor_adds_bos  # no flag: the post-processor decides
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["add_bos_token"] = not post_processor_adds_bos
    _write_json(d / "tokenizer_config.json", config)
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert ours.use_bos is (not post_processor_adds_bos)
    for text in TEXTS[:10]:
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text).tolist() == ([ours.bos_id] if ours.use_bos else []) + expected


def test_special_tokens_map_and_generation_fallbacks(dirs: dict, tmp_path: Path) -> None:
    # An older checkpoint: no added_tokens_decoder in the config, special tokens in special_tokens_map.json.
    d = tmp_path / "legacy_map"
    copy_tokenizer_files(dirs["hf_chatml"][0], d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "eos_token", "pad_token", "extra_special_tokens", "additional_special_tokens"):
        config.pop(key, None)
    _write_json(d / "tokenizer_config.json", config)
    _write_json(d / "special_tokens_map.json", {"eos_token": {"content": "<|endoftext|>", "special": True}})
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert ours.eos_id == theirs.eos_token_id == ours.token_to_id("<|endoftext|>")
    # generation_config still adds its eos (<|im_end|>) to the stop set
    assert ours.eos_ids == {ours.token_to_id("<|endoftext|>"), ours.token_to_id("<|im_end|>")}


def test_config_declared_specials_are_registered(dirs: dict, tmp_path: Path) -> None:
    # tokenizer.json has <|im_start|> as a non-special added token and no <pad> at all; the config declares both
    # special. transformers keeps tokenizer.json's flags for <|im_start|> (still one id, but not skipped) and adds
    # <pad> as a new special token: so must we.
    d = tmp_path / "declared"
    copy_tokenizer_files(dirs["hf_chatml"][0], d)
    tok_json = json.loads((d / "tokenizer.json").read_text())
    for added in tok_json["added_tokens"]:
        if added["content"] == "<|im_start|>":
            added["special"] = False
    _write_json(d / "tokenizer.json", tok_json)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    config["pad_token"] = "<pad>"
    _write_json(d / "tokenizer_config.json", config)
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert ours.vocab_size == len(theirs)
    assert ours.pad_id == theirs.pad_token_id == ours.vocab_size - 1
    text = "<|im_start|>user\nhi<pad><|im_end|>"
    ids = theirs(text)["input_ids"]
    assert ours.encode(text).tolist() == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ids.count(ours.token_to_id("<|im_start|>")) == 1 and ids.count(ours.pad_id) == 1
    assert ours.decode(ids, skip_special_tokens=True) == "<|im_start|>user\nhi"


def test_config_added_tokens_missing_from_tokenizer_json(dirs: dict, tmp_path: Path) -> None:
    d = tmp_path / "config_added"
    copy_tokenizer_files(dirs["hf_bpe"][0], d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    n = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    config.setdefault("added_tokens_decoder", {})[str(n)] = {"content": "<|tool|>", "special": True, **flags}
    config["added_tokens_decoder"][str(n + 1)] = {"content": "[[note]]", "special": False, **flags}
    _write_json(d / "tokenizer_config.json", config)
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert ours.vocab_size == len(theirs) and ours.token_to_id("<|tool|>") == theirs.convert_tokens_to_ids("<|tool|>")
    for text in ["call<|tool|>x [[note]] y", "<|tool|>", " [[note]]"]:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text).tolist() == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_tokenizer_json_only_uses_generation_config(dirs: dict, tmp_path: Path) -> None:
    # No tokenizer_config.json: bos/eos ids come from generation_config.json, bos insertion from the post-processor.
    d = tmp_path / "json_only"
    d.mkdir()
    for name in ("tokenizer.json", "generation_config.json"):
        (d / name).write_bytes((dirs["hf_bpe"][0] / name).read_bytes())
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    gen = json.loads((d / "generation_config.json").read_text())
    assert (ours.bos_id, ours.eos_id) == (gen["bos_token_id"], gen["eos_token_id"][0])
    assert ours.eos_ids == set(gen["eos_token_id"])
    assert ours.use_bos is True
    for text in TEXTS:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"], text


def test_picklable_for_dataloader_workers(pair: tuple) -> None:
    _, ours, _ = pair
    clone = pickle.loads(pickle.dumps(ours))
    for text in TEXTS[:12]:
        assert clone.encode(text).tolist() == ours.encode(text).tolist()


def test_sentencepiece_family_convention_without_config(dirs: dict, tmp_path: Path) -> None:
    # Only tokenizer.model (e.g. Meta's original Llama download): bos/eos from the model, bos added by default.
    d = tmp_path / "bare_spm"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((dirs["sp_bpe"][0] / "tokenizer.model").read_bytes())
    ours, reference = Tokenizer(d), Tokenizer(dirs["sp_bpe"][0])
    assert (ours.use_bos, ours.bos_id, ours.eos_id, ours.vocab_size) == (True, 1, 2, 500)
    for text in TEXTS[:10]:
        assert ours.encode(text).tolist() == reference.encode(text).tolist()
    # and an explicit add_bos_token: false is honoured
    _write_json(d / "tokenizer_config.json", {"add_bos_token": False})
    assert Tokenizer(d).use_bos is False


def test_added_tokens_beyond_spm_vocab(dirs: dict, tmp_path: Path) -> None:
    # A fine-tuned Llama 2 with chat tokens appended after the sentencepiece vocab (ids 500, 501).
    d = tmp_path / "sp_added"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((dirs["sp_bpe"][0] / "tokenizer.model").read_bytes())
    config = _llama_config()
    config["added_tokens_decoder"] = {
        "500": {"content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False},
        "501": {"content": "<|assistant|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False},
    }
    config["additional_special_tokens"] = ["<|im_start|>", "<|assistant|>"]
    _write_json(d / "tokenizer_config.json", config)
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert ours.vocab_size == len(theirs) == 502
    for text in ["<|im_start|>user hi <|assistant|> yo", "x<|im_start|>", " <|assistant|>"]:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"], text
        ids = theirs(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


# ---------------------------------------------------------------------------------------------------------------------
# files and errors


def test_copy_tokenizer_files(dirs: dict, tmp_path: Path) -> None:
    src = dirs["hf_bpe"][0]
    copied = copy_tokenizer_files(src, tmp_path / "out")
    assert set(copied) == {n for n in TOKENIZER_FILES if (src / n).exists()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(copied)
    assert all((tmp_path / "out" / n).read_bytes() == (src / n).read_bytes() for n in copied)
    assert Tokenizer(tmp_path / "out").encode("hello").tolist() == Tokenizer(src).encode("hello").tolist()


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.json" in str(e.value) and "tokenizer.model" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        Tokenizer(tmp_path / "nope")
    assert "nope" in str(e.value) and "tokenizer.model" in str(e.value)


CORRUPTIBLE = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"]


@pytest.mark.parametrize("name", CORRUPTIBLE)
def test_corrupt_files(dirs: dict, tmp_path: Path, name: str) -> None:
    src = dirs["sp_bpe"][0] if name == "tokenizer.model" else dirs["hf_bpe"][0]
    copy_tokenizer_files(src, tmp_path)
    (tmp_path / name).write_bytes(b"\x00\x01 this is not a " + name.encode() + b" {")
    with pytest.raises(ValueError) as e:
        Tokenizer(tmp_path)
    assert str(tmp_path / name) in str(e.value)
    assert e.value.__cause__ is not None or name.endswith(".json")
