"""Generation stops at the chat template's end-of-turn token exactly where transformers' generate stops with the same
eos_token_id list; `litft chat` holds a multi-turn conversation (in-process and driven through tmux)."""
from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from litft.chat import run_session
from litft.checkpoint import load_model, save_checkpoint
from litft.generate import chat_prompt, chat_stops, generate
from litft.generate import main as generate_main
from litft.models.config import Config
from litft.tokenizer import Tokenizer
from tests.chat_fixtures import write_chat_tokenizer
from tests.helpers import chat_in_tmux, chat_replies, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def make_chat_checkpoint(d: Path) -> Path:
    """A tiny random Llama with the Phi-3 template (eos <|endoftext|>, end of turn <|end|>, so only the template says
    where a turn ends), whose lm_head row of <|end|> is twice that of a token greedy decoding picks after a few
    steps: from then on <|end|> wins wherever that token would have, so generation ends its turn."""
    make_checkpoint(d, vocab_size=448)
    write_chat_tokenizer(d, "phi3")
    tok = Tokenizer(d)
    model = load_model(d)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True)
    out = generate(model, prompt, 8)
    state = model.state_dict()
    state["lm_head.weight"][tok.token_to_id("<|end|>")] = 2 * state["lm_head.weight"][int(out[prompt.numel() + 5])]
    save_checkpoint(state, Config.from_checkpoint(d), d)
    return d


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory) -> Path:
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat_ckpt"))


def test_greedy_stops_where_transformers_stops(chat_ckpt, tmp_path, capsys, one_thread):
    transformers = pytest.importorskip("transformers")
    from litft.convert import convert_from_litft

    tok = Tokenizer(chat_ckpt)
    end = tok.token_to_id("<|end|>")
    assert end not in tok.eos_ids and chat_stops(tok)[-1] == [end]  # the stop comes from the template
    messages = [{"role": "user", "content": "hello there"}]
    _, ids, stops = chat_prompt(tok, "hello there")
    ours = generate(load_model(chat_ckpt), ids, 20, eos_ids=tok.eos_ids, stop_sequences=stops)[ids.numel():]
    assert ours[-1] == end and ours.numel() < 20  # it stopped at the end of the turn

    hf_dir = convert_from_litft(chat_ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_ids = torch.tensor([hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])
    assert hf_ids[0].tolist() == ids.tolist()
    theirs = model.generate(hf_ids, max_new_tokens=20, do_sample=False, eos_token_id=sorted(tok.eos_ids) + [end],
                            pad_token_id=end)[0, hf_ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()
    # `litft generate` frames the prompt with the template and stops there too
    text = generate_main(chat_ckpt, prompt="hello there", max_new_tokens=20, temperature=0)
    assert text == hf_tok.decode(theirs, skip_special_tokens=True)
    assert "<|user|>\nhello there<|end|>\n<|assistant|>\n" in capsys.readouterr().out


def test_session_multi_turn_reset_exit(chat_ckpt, one_thread):
    tok = Tokenizer(chat_ckpt)
    model = load_model(chat_ckpt)
    stdin = io.StringIO("hello there\nwhat is two plus three\n/reset\nhello there\n/exit\nnever read\n")
    stdout = io.StringIO()
    run_session(model, tok, None, chat_stops(tok), "You are a helpful assistant.", torch.Generator().manual_seed(0),
                20, 0.0, None, 1.0, stdin=stdin, stdout=stdout)
    replies = [line.split(">> Model: ", 1)[1] for line in stdout.getvalue().split(">> You: ") if ">> Model: " in line]
    assert len(replies) == 3 and "(new conversation)" in stdout.getvalue()
    assert replies[0] == replies[2]  # /reset: the same first turn again, the same greedy reply
    assert stdin.readline() == "never read\n"  # /exit left the loop
    # the second reply was generated from the whole conversation: the template's rendering of both turns
    first = replies[0].strip()
    system = {"role": "system", "content": "You are a helpful assistant."}
    msgs = [system, {"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "what is two plus three"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    out = generate(model, ids, 20, eos_ids=tok.eos_ids, stop_sequences=chat_stops(tok))[ids.numel():]
    want = tok.decode(out, skip_special_tokens=True)
    assert replies[1].strip() == want.strip()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install -y tmux)")
def test_litft_chat_in_tmux(chat_ckpt, tmp_path):
    """The real command in a real terminal: type, read the streamed reply, /reset, /exit."""
    tok = Tokenizer(chat_ckpt)
    _, ids, stops = chat_prompt(tok, "hello there")
    want = tok.decode(generate(load_model(chat_ckpt), ids, 20, eos_ids=tok.eos_ids, stop_sequences=stops)[ids.numel():],
                      skip_special_tokens=True).strip()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    screen = chat_in_tmux(f"cd {ROOT} && {sys.executable} -m litft.cli chat {chat_ckpt} --max_new_tokens 20",
                          ["hello there", "/reset", "/exit"], env)
    assert "(new conversation)" in screen
    reply = chat_replies(screen)[0]
    assert reply == " ".join(want.split()) and want


def test_chat_through_an_unmerged_adapter_equals_the_merged_model(chat_ckpt, tmp_path, monkeypatch, capsys,
                                                                   one_thread):
    """A LoRA run on conversations in the checkpoint's template: evaluation stops at the template's end of turn, and
    `litft chat --adapter_dir` answers as `litft generate` does on the merged checkpoint."""
    import json

    from litft.chat import chat
    from litft.data import Conversations
    from litft.methods.lora import LoRA
    from litft.methods.run_dir import merge_lora
    from litft.train import EvalArgs, TrainArgs, finetune, stop_ids

    tok = Tokenizer(chat_ckpt)
    assert tok.token_to_id("<|end|>") in stop_ids(tok)  # eval generations end at the turn, not only at eos
    convs = [{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "five"}]}] * 8
    (tmp_path / "c.json").write_text(json.dumps(convs))
    finetune(LoRA(checkpoint_dir=chat_ckpt, lr=3e-2), Conversations(tmp_path / "c.json", val_split_fraction=0.25),
             tmp_path / "run", TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=8, max_seq_length=256),
             EvalArgs(interval=0, initial_validation=False, max_new_tokens=4), logger_name="none")
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/exit\n"))
    chat(chat_ckpt, adapter_dir=tmp_path / "run" / "final", max_new_tokens=20)
    reply = capsys.readouterr().out.split(">> Model: ", 1)[1].split("\n")[0]
    merged = merge_lora(tmp_path / "run" / "final")
    want = generate_main(merged, prompt="hello there", max_new_tokens=20, temperature=0)
    assert reply.strip() == want.strip()
    assert want != generate_main(chat_ckpt, prompt="hello there", max_new_tokens=20, temperature=0)  # it learnt


def test_chat_through_a_qlora_adapter_keeps_the_base_quantized(chat_ckpt, tmp_path, monkeypatch, capsys, one_thread):
    """`litft chat --adapter_dir` on a QLoRA run (NF4 base, on CPU through bitsandbytes): the model it chats with
    keeps every base Linear 4-bit (bnb Linear4bit, NF4 codes packed two per uint8), and its reply is what
    `litft generate --adapter_dir` gives on the same run with the same template framing (greedy), not the base's."""
    bnb = pytest.importorskip("bitsandbytes")
    import json

    import litft.chat
    from litft.chat import chat
    from litft.data import Conversations
    from litft.methods.qlora import QLoRA
    from litft.train import EvalArgs, TrainArgs, finetune

    convs = [{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "five"}]}] * 8
    (tmp_path / "c.json").write_text(json.dumps(convs))
    final = tmp_path / "run" / "final"
    finetune(QLoRA(checkpoint_dir=chat_ckpt, quantize="bnb.nf4", lr=3e-2),
             Conversations(tmp_path / "c.json", val_split_fraction=0.25), tmp_path / "run",
             TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=8, max_seq_length=256),
             EvalArgs(interval=0, initial_validation=False, max_new_tokens=4), logger_name="none")
    chatted_with = []
    session = litft.chat.run_session

    def recording_session(model, *args, **kwargs):  # the real session; only notes which model it was given
        chatted_with.append(model)
        return session(model, *args, **kwargs)

    monkeypatch.setattr(litft.chat, "run_session", recording_session)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/exit\n"))
    chat(chat_ckpt, adapter_dir=final, max_new_tokens=20)
    reply = capsys.readouterr().out.split(">> Model: ", 1)[1].split("\n")[0]

    (model,) = chatted_with
    four_bit = {name.removesuffix(".base_layer") for name, m in model.named_modules()
                if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                       "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                                       "mlp.down_proj")}
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            assert type(w) is bnb.nn.Params4bit and w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4"
            assert w.numel() * 2 == m.in_features * m.out_features  # packed, never dequantized back

    want = generate_main(chat_ckpt, prompt="hello there", max_new_tokens=20, temperature=0, adapter_dir=final)
    assert reply.strip() == want.strip()
    assert want != generate_main(chat_ckpt, prompt="hello there", max_new_tokens=20, temperature=0)  # it learnt
