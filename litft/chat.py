"""`litft chat`: an interactive multi-turn conversation in the terminal, streamed token by token."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from litft.data.conversation import conversation_prompt
from litft.data.prompts import PromptStyle, resolve_prompt_style
from litft.generate import _ends_with_stop, chat_stops, check_sampling_args, generate, load_for_generation
from litft.tokenizer import Tokenizer

HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) leaves."


def chat(
    checkpoint_dir: Path,
    adapter_dir: Path | None = None,
    system: str | None = None,
    prompt_style: str = "auto",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 42,
    precision: str = "32-true",
) -> None:
    """Chat with a model in the terminal: multi-turn, streamed, in the checkpoint's chat template.

    Type /reset to start a new conversation and /exit (or Ctrl-D) to leave.

    Args:
        checkpoint_dir: a litft checkpoint (a merged fine-tune, or the base an adapter applies to).
        adapter_dir: the `final/` directory of an adapter run: chat through its adapter, unmerged (a QLoRA run keeps
            its quantized base).
        system: a system message that opens every conversation.
        prompt_style: "auto": the checkpoint's chat template when it ships one, else alpaca; "chat_template", or a
            hand-written style (chatml, llama3, ...): the one the model was fine-tuned with.
        max_new_tokens: the longest reply, in tokens (a reply stops earlier at the end-of-turn token).
        temperature: 0 for greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens (None: all).
        top_p: nucleus sampling: the smallest set of tokens holding this much probability.
        seed: random seed for sampling.
        precision: 32-true, bf16-true or 16-true.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    tokenizer = Tokenizer(checkpoint_dir)
    style = resolve_prompt_style(prompt_style, tokenizer)  # None: the checkpoint's template
    model, device = load_for_generation(checkpoint_dir, adapter_dir, precision)
    stops = chat_stops(tokenizer) if style is None else style.stop_tokens(tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed)
    run_session(model, tokenizer, style, stops, system, generator, max_new_tokens, temperature, top_k, top_p)


def run_session(model, tokenizer: Tokenizer, style: PromptStyle | None, stops: tuple[list[int], ...],
                system: str | None, generator: torch.Generator, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """The read-reply loop: each reply is generated from the whole conversation so far."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout  # looked up per call: a caller may have replaced them
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    print(HELP, file=stdout, flush=True)
    while True:
        print(">> You: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # Ctrl-D
            print(file=stdout)
            return
        text = line.rstrip("\n").strip()
        if text == "/exit":
            return
        if text == "/reset":
            messages = list(opening)
            print("(new conversation)", file=stdout, flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        prompt = conversation_prompt(tokenizer, messages, style)
        print(">> Model: ", end="", file=stdout, flush=True)
        new: list[int] = []
        shown = ""

        def stream(token: int) -> None:
            nonlocal shown
            new.append(token)
            if token in tokenizer.eos_ids or _ends_with_stop(new, stops):
                return  # the end-of-turn marker is not part of the reply
            now = tokenizer.decode(new, skip_special_tokens=True)
            if not now.endswith("\ufffd"):  # a multi-byte character still arriving
                print(now[len(shown):], end="", file=stdout, flush=True)
                shown = now

        generate(model, prompt, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_ids, generator=generator,
                 stop_sequences=stops, on_token=stream)
        for seq in stops:  # drop a trailing stop sequence from the reply kept in the conversation
            if len(seq) <= len(new) and new[-len(seq):] == list(seq):
                new = new[: -len(seq)]
                break
        reply = tokenizer.decode(new, skip_special_tokens=True)
        print(reply[len(shown):], file=stdout, flush=True)
        messages.append({"role": "assistant", "content": reply.strip() if style is None else reply})


__all__ = ["chat", "run_session"]
