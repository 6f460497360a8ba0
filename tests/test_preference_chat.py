"""DPO preference data rendered with the checkpoint's chat template: prompt and completion ids against transformers'
`apply_chat_template`, the prompt mask, "auto" without a template, the errors, and a short DPO run on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

from litft.cli import run  # noqa: E402
from litft.data import DataError, Preference  # noqa: E402
from litft.data.conversation import tokenize_conversation  # noqa: E402
from litft.tokenizer import Tokenizer  # noqa: E402
from litft.utils import LitftError  # noqa: E402
from tests.chat_fixtures import SYSTEM, write_chat_tokenizer  # noqa: E402

IGNORE = -100
END_OF_TURN = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>"}
PAIRS = [{"prompt": "What is two plus three?", "chosen": "five", "rejected": "the cat sat on a mat"},
         {"prompt": "repeat the letter a", "chosen": " aaa ", "rejected": "abc def"},
         {"prompt": "hello there", "chosen": "How can I help today?", "rejected": "hello"}]


EARLIER = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "How can I help today?"}]


def conversational(pairs: list[dict], system: bool, earlier: bool = False) -> list[dict]:
    return [{"prompt": ([SYSTEM] if system else []) + (EARLIER if earlier else [])
             + [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]


def samples_of(tok_dir: Path, path: Path, prompt_style: str, max_seq_length: int | None = None) -> list[dict]:
    data = Preference(json_path=path, val_json_path=path, prompt_style=prompt_style)
    data.setup(Tokenizer(tok_dir), max_seq_length)
    return [data.train_dataset[i] for i in range(len(data.train_dataset))]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_tok")
    return {f: write_chat_tokenizer(root / f, f) for f in END_OF_TURN}


@pytest.mark.parametrize("family", ["smollm2", "llama3"])
@pytest.mark.parametrize("form", ["strings", "messages", "messages_with_system", "multi_turn_prompt"])
@pytest.mark.parametrize("prompt_style", ["chat_template", "auto"])
def test_ids_equal_transformers_apply_chat_template(tok_dirs, tmp_path, family, form, prompt_style):
    """The prompt is transformers' rendering of the prompt with the generation prompt; each completion is what
    rendering prompt + reply adds to it, up to and including the end-of-turn token (the template's layout after
    it, ChatML's newline, is not the reply's); the labels mask exactly the prompt, and they mark the same reply
    tokens as the SFT conversation mask of the last assistant turn does."""
    records = PAIRS if form == "strings" else conversational(PAIRS, system=form == "messages_with_system",
                                                             earlier=form == "multi_turn_prompt")
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    samples = samples_of(tok_dirs[family], path, prompt_style)
    hf = AutoTokenizer.from_pretrained(tok_dirs[family])
    eot = hf.convert_tokens_to_ids(END_OF_TURN[family])
    for pair, sample in zip(PAIRS, samples):
        prompt = (([SYSTEM] if form == "messages_with_system" else [])
                  + (EARLIER if form == "multi_turn_prompt" else []) + [{"role": "user", "content": pair["prompt"]}])
        want_prompt = list(hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False))
        for prefix, key in (("", "chosen"), ("rejected_", "rejected")):
            input_ids, labels = sample[f"{prefix}input_ids"].tolist(), sample[f"{prefix}labels"].tolist()
            reply = [{"role": "assistant", "content": pair[key]}]
            full = list(hf.apply_chat_template(prompt + reply, tokenize=True, return_dict=False))
            assert full[: len(want_prompt)] == want_prompt
            difference = full[len(want_prompt):]
            assert input_ids[: len(want_prompt)] == want_prompt
            completion = input_ids[len(want_prompt):]
            assert completion == difference[: len(completion)] and completion[-1] == eot
            assert not hf.decode(difference[len(completion):]).strip()  # only the layout after the turn is left
            assert labels == [IGNORE] * len(want_prompt) + completion  # the prompt masked, exactly
            sft = tokenize_conversation(Tokenizer(tok_dirs[family]), prompt + reply, None, last_turn_only=True)
            assert (sft["labels"][: len(labels)] != IGNORE).tolist() == [x != IGNORE for x in labels]


def test_auto_without_a_template_is_alpaca(ckpt, tmp_path):
    """The default "auto" on a checkpoint without a template renders exactly as the old default, Alpaca."""
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(conversational(PAIRS, system=False)))
    data = Preference(json_path=path, val_json_path=path)
    assert data.prompt_style == "auto"
    data.setup(Tokenizer(ckpt), None)
    want = samples_of(ckpt, path, "alpaca")
    for got, w in zip(data.train_dataset, want):
        assert all(torch.equal(got[k], w[k]) for k in w)


def test_max_prompt_length_keeps_the_templates_bos_and_the_prompts_end(tok_dirs, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS))
    whole = samples_of(tok_dirs["llama3"], path, "chat_template")[0]
    data = Preference(json_path=path, val_json_path=path, prompt_style="chat_template", max_prompt_length=6)
    with pytest.warns(UserWarning, match="truncated"):
        data.setup(Tokenizer(tok_dirs["llama3"]), None)
    cut = data.train_dataset[0]
    n_prompt = int((whole["labels"] == IGNORE).sum())
    bos = Tokenizer(tok_dirs["llama3"]).bos_id
    assert int(whole["input_ids"][0]) == bos
    assert cut["input_ids"].tolist() == [bos] + whole["input_ids"][n_prompt - 5:].tolist()
    assert int((cut["labels"] == IGNORE).sum()) == 6


@pytest.mark.parametrize("case", ["no_template", "prompt_ends_with_assistant", "template_refuses"])
def test_bad_chat_preference_data_is_one_clear_error(case, ckpt, tok_dirs, tmp_path):
    records = conversational(PAIRS, system=False)
    tok_dir, style, want = tok_dirs["smollm2"], "chat_template", None
    if case == "no_template":
        tok_dir, want = ckpt, "ships no chat template"
    elif case == "prompt_ends_with_assistant":
        records[1]["prompt"].append({"role": "assistant", "content": "hm"})
        want = "the last one a user turn"
    else:
        tok_dir = write_chat_tokenizer(tmp_path / "gemma", "gemma")  # refuses a system turn
        records = conversational(PAIRS, system=True)
        style, want = "auto", "record 0.*System role not supported"
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    with pytest.raises(LitftError, match=want) as error:
        samples_of(tok_dir, path, style)
    assert isinstance(error.value, (DataError, LitftError)) and "\n" not in str(error.value)


def test_dpo_runs_on_chat_template_data(tmp_path, one_thread):
    """Two DPO steps on a tiny model whose checkpoint ships a Llama-3 template, with the default prompt style."""
    from tests.helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", vocab_size=448)
    write_chat_tokenizer(ckpt, "llama3")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in conversational(PAIRS, system=True) * 4))
    out = tmp_path / "out"
    metrics = run(["finetune", "dpo", "--checkpoint_dir", str(ckpt), "--data", "Preference", "--data.json_path",
                   str(path), "--out_dir", str(out), "--train.max_steps", "2", "--train.global_batch_size", "4",
                   "--train.micro_batch_size", "4", "--eval.interval", "0", "--eval.final_validation", "false",
                   "--eval.max_new_tokens", "2", "--logger_name", "none"])
    assert torch.isfinite(torch.tensor(metrics["loss"])) and "rewards/margins" in metrics
    assert (out / "final" / "adapter.safetensors").is_file()
