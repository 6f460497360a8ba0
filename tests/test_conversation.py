"""Conversational data: assistant-only masks derived by rendering, checked against transformers'
`return_assistant_tokens_mask` ({% generation %} templates) and a rendering-based oracle (the real families'
templates, which have no {% generation %} block); ShareGPT; packing; the errors."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

from litft.data import JSON, Conversations, DataError, pack_samples  # noqa: E402
from litft.data.conversation import tokenize_conversation  # noqa: E402
from litft.tokenizer import Tokenizer  # noqa: E402
from tests.chat_fixtures import CONVERSATIONS, FAMILIES, SYSTEM, write_chat_tokenizer  # noqa: E402

IGNORE = -100
THREE_TURNS = CONVERSATIONS["multi"] + [{"role": "user", "content": "and b"}, {"role": "assistant", "content": "bbb"}]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv_tok")
    return {f: write_chat_tokenizer(root / f, f) for f in FAMILIES}


@pytest.mark.parametrize("family", ["chatml_generation", "llama3_generation"])
@pytest.mark.parametrize("messages", [CONVERSATIONS["single"], THREE_TURNS, [SYSTEM] + THREE_TURNS])
def test_mask_equals_transformers_assistant_mask(tok_dirs, family, messages):
    hf = AutoTokenizer.from_pretrained(tok_dirs[family])
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    sample = tokenize_conversation(Tokenizer(tok_dirs[family]), messages, None)
    assert sample["input_ids"].tolist() == list(out["input_ids"])
    assert sum(out["assistant_masks"]) > 0
    want = torch.tensor(out["assistant_masks"], dtype=torch.bool)
    want[0] = False  # litft never trains the first token (nothing predicts it)
    assert (sample["labels"] != IGNORE).tolist() == want.tolist()


def _oracle_mask(hf, messages) -> list[bool]:
    """Independent oracle for templates without {% generation %}: re-render the conversation with every assistant
    reply wrapped in two marker characters the corpus never contains (U+E000 / U+E001, private use), locate the
    replies in that text (with the spaces just before them), and the end-of-turn special token the template writes
    right after each; tokenise the
    plain rendering with transformers and mark every token whose character offsets overlap a reply + end-of-turn."""
    plain = hf.apply_chat_template(messages, tokenize=False)
    def mark(text: str) -> str:  # markers inside the reply's outer whitespace, so `| trim` still trims it
        core = text.strip()
        lead = text[: len(text) - len(text.lstrip())]
        return lead + "\ue000" + core + "\ue001" + text[len(lead) + len(core):]

    marked_msgs = [{**m, "content": mark(m["content"])} if m["role"] == "assistant" else m for m in messages]
    marked = hf.apply_chat_template(marked_msgs, tokenize=False)
    assert marked.replace("\ue000", "").replace("\ue001", "") == plain
    specials = sorted((t.content for t in hf.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    spans, shift, pos = [], 0, 0
    while (a := marked.find("\ue000", pos)) >= 0:
        b = marked.find("\ue001", a)
        start, end = a - shift, b - shift - 1
        while start > 0 and plain[start - 1] == " ":  # spaces before a reply are generated with it (Llama 2's
            start -= 1  # template has no generation prompt: "[/INST]" then " reply")
        after = marked[b + 1:]
        ws = len(after) - len(after.lstrip(" "))  # spaces the reply ends with, then the end-of-turn token
        eot = next((len(t) for t in specials if after[ws:].startswith(t)), None)
        if eot is not None:
            end += ws + eot
        spans.append((start, end))
        shift += 2
        pos = b + 1
    enc = hf(plain, add_special_tokens=False, return_offsets_mapping=True)
    return [any(s < e_tok and b_tok < e for s, e in spans) for b_tok, e_tok in enc["offset_mapping"]], enc["input_ids"]


@pytest.mark.parametrize("family", ["smollm2", "llama3", "llama2", "gemma", "phi3"])
@pytest.mark.parametrize("with_system", [False, True])
def test_mask_equals_rendering_oracle(tok_dirs, family, with_system):
    if with_system and not FAMILIES[family][4]:
        pytest.skip("the template refuses a system turn (tested in test_chat_template)")
    messages = ([SYSTEM] if with_system else []) + THREE_TURNS
    hf = AutoTokenizer.from_pretrained(tok_dirs[family])
    want, want_ids = _oracle_mask(hf, messages)
    sample = tokenize_conversation(Tokenizer(tok_dirs[family]), messages, None)
    assert sample["input_ids"].tolist() == list(want_ids)
    want[0] = False
    got = (sample["labels"] != IGNORE).tolist()
    assert got == want, (hf.convert_ids_to_tokens([i for i, g in zip(want_ids, got) if g]))
    # every assistant turn is trained, each one's end-of-turn token included
    eot = Tokenizer(tok_dirs[family]).end_of_turn_ids()[0]
    assert int(((sample["labels"] == eot)).sum()) == 3


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_sharegpt_equals_messages_and_packing(tok_dirs, tmp_path):
    tok = Tokenizer(tok_dirs["smollm2"])
    convs = [THREE_TURNS, CONVERSATIONS["single"], [SYSTEM] + CONVERSATIONS["multi"]] * 4
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]} for c in convs]
    a = Conversations(_write(tmp_path / "m.jsonl", [{"messages": c} for c in convs]), val_split_fraction=0.25)
    b = Conversations(_write(tmp_path / "s.jsonl", sharegpt), val_split_fraction=0.25)
    a.setup(tok, 256)
    b.setup(tok, 256)
    for x, y in zip(a.train_dataset.samples + a.val_dataset.samples, b.train_dataset.samples + b.val_dataset.samples):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    # validation samples score the last reply only; training samples every reply
    last = tokenize_conversation(tok, THREE_TURNS, None, last_turn_only=True)
    every = tokenize_conversation(tok, THREE_TURNS, None)
    assert 0 < int((last["labels"] != IGNORE).sum()) < int((every["labels"] != IGNORE).sum())
    packed = Conversations(_write(tmp_path / "p.jsonl", [{"messages": c} for c in convs]), val_split_fraction=0.25,
                           packing=True)
    packed.setup(tok, 256)
    flat = pack_samples(a.train_dataset.samples, 256)
    assert [torch.equal(p["labels"], q["labels"]) for p, q in zip(packed.train_dataset.samples, flat)] == \
        [True] * len(flat)
    everything = Conversations(tmp_path / "m.jsonl", val_split_fraction=0.25, train_on_all=True)
    everything.setup(tok, 256)
    s = everything.train_dataset[0]
    assert (s["labels"][1:] == s["input_ids"][1:]).all()


def test_json_alpaca_uses_the_template_by_default(tok_dirs, tmp_path):
    tok = Tokenizer(tok_dirs["llama3"])
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "repeat the letter", "input": "a", "output": "aaa"}] * 4))
    data = JSON(path, val_split_fraction=0.25)
    data.setup(tok, 512)
    s = data.train_dataset[0]
    msgs = [{"role": "user", "content": "repeat the letter\n\na"}, {"role": "assistant", "content": "aaa"}]
    assert s["input_ids"].tolist() == tok.apply_chat_template(msgs).tolist()
    assert tok.decode(s["input_ids"][s["labels"] != IGNORE]) == "aaa<|eot_id|>"
    alpaca = JSON(path, val_split_fraction=0.25, prompt_style="alpaca")
    alpaca.setup(tok, 512)
    assert "### Instruction" in tok.decode(alpaca.train_dataset[0]["input_ids"])


@pytest.mark.parametrize("record,match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'wizard'"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "unknown role 'alien'"),
    ({"text": "hi"}, "no 'messages' list"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "must be a string"),
])
def test_bad_conversations_are_one_error(tok_dirs, tmp_path, record, match):
    data = Conversations(_write(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS["single"]}, record]))
    with pytest.raises(DataError, match=match):
        data.setup(Tokenizer(tok_dirs["smollm2"]), 128)
    assert data.train_dataset is None


def test_template_that_raises_is_one_error(tok_dirs, tmp_path):
    from litft.chat_template import ChatTemplateError

    data = Conversations(_write(tmp_path / "sys.jsonl", [{"messages": [SYSTEM] + CONVERSATIONS["single"]}] * 3))
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        data.setup(Tokenizer(tok_dirs["gemma"]), 128)
    assert data.train_dataset is None


def test_chat_template_style_needs_a_template(tmp_path):
    from tests.helpers import write_tokenizer

    write_tokenizer(tmp_path / "base")
    data = Conversations(_write(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS["single"]}] * 3),
                         prompt_style="chat_template")
    with pytest.raises(DataError, match="ships no chat template"):
        data.setup(Tokenizer(tmp_path / "base"), 128)
    # a base model without a template: a hand-written style frames each turn, replies + eos are the targets
    data = Conversations(tmp_path / "c.jsonl", prompt_style="chatml")
    data.setup(Tokenizer(tmp_path / "base"), 128)
    s = data.train_dataset[0]
    tok = Tokenizer(tmp_path / "base")
    assert tok.decode(s["input_ids"][s["labels"] != IGNORE]) == "five</s>"


@pytest.mark.parametrize("case", ["template_raises", "no_assistant", "unknown_role", "missing_column", "missing_split"])
def test_bad_input_through_the_cli_is_one_line_and_writes_nothing(tmp_path, case):
    """`litft finetune` with each bad input: one LitftError (the line `litft: error: ...` that `litft.cli.main`
    prints before exiting 1), and no out_dir."""
    from litft.cli import run
    from litft.utils import LitftError
    from tests.helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", vocab_size=448)
    write_chat_tokenizer(ckpt, "gemma")  # a template that refuses system turns
    good = [{"messages": CONVERSATIONS["single"]}] * 4
    records = {"template_raises": [{"messages": [SYSTEM] + CONVERSATIONS["single"]}] * 4,
               "no_assistant": good + [{"messages": [{"role": "user", "content": "hi"}]}],
               "unknown_role": good + [{"messages": [{"role": "bot", "content": "hi"}]}]}
    data = ["--data", "Conversations", "--data.json_path", str(_write(tmp_path / "c.jsonl", records.get(case, good)))]
    if case in ("missing_column", "missing_split"):
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 4)
        datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
        data = ["--data", "HF", "--data.path", str(tmp_path / "ds"), "--data.instruction_key", "question",
                "--data.output_key", "answer"] + (["--data.val_split", "test"] if case == "missing_split" else [])
        if case == "missing_column":
            data[data.index("answer")] = "response"
    out = tmp_path / "out"
    with pytest.raises(LitftError) as error:
        run(["finetune", "lora", "--checkpoint_dir", str(ckpt), *data, "--out_dir", str(out),
             "--train.max_seq_length", "256", "--logger_name", "none"])
    err = str(error.value)
    assert "\n" not in err, err
    want = {"template_raises": "System role not supported", "no_assistant": "no assistant turn",
            "unknown_role": "unknown role 'bot'", "missing_column": "no column 'response'",
            "missing_split": "no split 'test'"}[case]
    assert want in err
    assert not out.exists()


def test_prefix_unstable_template_needs_train_on_all(tmp_path):
    """A template that renders earlier turns differently once more follow (here: it numbers turns from the end)
    cannot give assistant spans by rendering: one DataError pointing at train_on_all, which then works."""
    d = write_chat_tokenizer(tmp_path / "t", "smollm2")
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ (messages | length - loop.index) ~ m['role'] ~ ': ' ~ m['content'] ~ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '0assistant: ' }}{% endif %}")
    tok = Tokenizer(d)
    with pytest.raises(DataError, match="train_on_all"):
        tokenize_conversation(tok, THREE_TURNS, None)
    s = tokenize_conversation(tok, THREE_TURNS, None, train_on_all=True)
    assert s["input_ids"].tolist() == tok.apply_chat_template(THREE_TURNS).tolist()
