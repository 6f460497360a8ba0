"""Tiny real checkpoints for tests: a BPE tokenizer trained on the fly and a random-init GPT; a tmux driver for
`litft chat`."""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from litft.checkpoint import save_checkpoint
from litft.models.config import Config
from litft.models.gpt import GPT
from litft.models.hf import hf_modules

LETTERS = "abcdefghij"


def write_tokenizer(d: Path, vocab_size: int = 300) -> None:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.", "### Instruction:\n### Input:\n### Response:\n", "Repeat the letter: " + LETTERS] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False)
                                                  for t in ("<s>", "</s>", "<pad>")],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}))


def make_checkpoint(d: Path, seed: int = 0, **overrides) -> Path:
    """A litft checkpoint: tiny Llama-shape GPT (random init) + a BPE tokenizer."""
    write_tokenizer(d / "tok")
    cfg = Config(**{**dict(name="tiny", vocab_size=320, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                           intermediate_size=128, max_seq_length=128), **overrides})
    torch.manual_seed(seed)
    model = GPT(cfg)
    save_checkpoint(model.state_dict(), cfg, d, tokenizer_dir=d / "tok")
    return d


def make_task(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A learnable task: repeat the given letter three times."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        c = rng.choice(LETTERS)
        records.append({"instruction": "Repeat the letter", "input": c, "output": c * 3})
    path.write_text(json.dumps(records))
    return path


def hf_module_of(config: Config, litft_module: str) -> str:
    """The HF module (e.g. model.layers.3.self_attn.q_proj) that holds a litft module, from litft's name map."""
    return next(hf for hf, (parts, _) in hf_modules(config).items() if litft_module in parts)


_tmux_sessions = itertools.count()  # one private tmux server per call


def chat_in_tmux(command: str, lines: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Drive `litft chat` in a real terminal: run `command` in a detached tmux session, type each of `lines` (then
    Enter) once the chat shows its next ">> You:" prompt, and return the screen after the command has ended (so
    the last line should be /exit). Needs the tmux binary; the session is killed whatever happens."""
    session = f"litft-chat-test-{os.getpid()}-{next(_tmux_sessions)}"
    tmux = ["tmux", "-L", session]  # a private server: never touches the user's own tmux sessions
    subprocess.run(tmux + ["new-session", "-d", "-s", session, "-x", "200", "-y", "50",
                           f"{command}; echo CHAT-ENDED; sleep 30"], check=True, env=env)

    def pane() -> str:
        return subprocess.run(tmux + ["capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(text: str, count: int = 1) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pane().count(text) >= count:
                return pane()
            time.sleep(0.3)
        raise AssertionError(f"{text!r} did not appear; the pane shows:\n{pane()}")

    try:
        for i, line in enumerate(lines):
            wait_for(">> You:", i + 1)  # every line typed (/reset included) is answered by a new prompt
            subprocess.run(tmux + ["send-keys", "-t", session, line, "Enter"], check=True)
        return wait_for("CHAT-ENDED")
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)


def chat_replies(screen: str) -> list[str]:
    """The model's replies on a `litft chat` screen, in order, whitespace (the terminal's line wrapping) collapsed."""
    return [" ".join(part.split(">> You:", 1)[0].split()) for part in screen.split(">> Model:")[1:]]

