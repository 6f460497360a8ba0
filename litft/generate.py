"""Token generation with the KV cache, and `litft generate`."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from litft import cpu_kernels, native
from litft.checkpoint import load_model
from litft.data.prompts import PromptStyle, _encoded_stops
from litft.models.gpt import GPT
from litft.threads import ThreadChooser
from litft.tokenizer import Tokenizer
from litft.utils import LitftError


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set holding top_p of the mass."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass (always keep the first)
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _small_rows_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if cpu_kernels.small_rows_ok(x2, layer.weight, layer.bias):  # checked once: straight to the kernel
        return native.linear_small(x2, layer.weight, layer.bias).view(*x.shape[:-1], layer.out_features)
    return F.linear(x, layer.weight, layer.bias)


@contextmanager
def small_rows_linears(model: nn.Module) -> Iterator[None]:
    """While decoding, every projection multiplies one token's row by its whole weight: a stream over the weight,
    which torch's fp32 CPU path reads at a third of the memory's speed. For the duration, plain `nn.Linear` layers
    (adapter layers already call `cpu_kernels.linear`) send products of a few rows to litft's kernel; larger ones
    (the prompt's prefill) stay in torch."""
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    for layer in layers:
        layer.forward = _small_rows_linear.__get__(layer)  # an instance attribute: nn.Module.__call__ calls it
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


_LAST_DECODE_THREADS: dict[int, int] = {}  # torch's thread count -> the count decoding last settled on


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_ids: set[int] | tuple[int, ...] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    on_token: Callable[[int], None] | None = None,
    stop_when: Callable[[list[int]], bool] | None = None,
) -> torch.Tensor:
    """Prompt (T,) -> prompt + up to max_new_tokens new tokens; stops after an eos id, once the new tokens end
    with one of `stop_sequences` (a prompt style's end-of-turn marker, `PromptStyle.stop_tokens`), or once
    `stop_when(new token ids)` is true (e.g. a stop string in the decoded text), the stopping token kept in the
    output as the eos id is. `on_token` sees each new token id as it is chosen (streaming)."""
    if prompt.ndim != 1 or prompt.numel() == 0:
        raise ValueError("prompt must be a non-empty 1-D tensor of token ids")
    total = prompt.numel() + max_new_tokens
    tokens = prompt.unsqueeze(0).to(model.embed.weight.device)
    was_training = model.training
    model.eval()
    if use_cache:
        model.set_kv_cache(1, total)
    # decoding steps run hundreds of tiny parallel regions: their thread count is chosen by timing them (see
    # litft/threads.py); the prompt's prefill runs with the count the last call's decoding settled on (a chat's
    # next turn), all threads the first time
    decode_threads = ThreadChooser(probe=3)
    try:
        prefill_threads = _LAST_DECODE_THREADS.get(decode_threads.full, decode_threads.full)
        if tokens.is_cpu and prefill_threads != decode_threads.full:
            torch.set_num_threads(prefill_threads)
        with small_rows_linears(model):
            pos, step_input = 0, tokens
            for i in range(max_new_tokens):
                with decode_threads.step() if use_cache and i > 0 and tokens.is_cpu else nullcontext():
                    if use_cache:
                        logits = model(step_input, input_pos=pos, output="last")
                        pos += step_input.shape[1]
                    else:
                        logits = model(tokens, output="last")
                    nxt = sample(logits[:, -1], temperature, top_k, top_p, generator)
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                step_input = nxt[:, None]
                if on_token is not None:
                    on_token(int(nxt))
                new_ids = tokens[0, prompt.numel():].tolist()
                if (int(nxt) in eos_ids or _ends_with_stop(new_ids, stop_sequences)
                        or (stop_when is not None and stop_when(new_ids))):
                    break
    finally:
        if decode_threads.n_steps:
            _LAST_DECODE_THREADS[decode_threads.full] = decode_threads.best
        decode_threads.close()
        if use_cache:
            model.clear_kv_cache()
        model.train(was_training)
    return tokens[0]


def chat_prompt(tokenizer: Tokenizer, prompt: str, prompt_style: str | None = None,
                system: str | None = None) -> tuple[str, torch.Tensor, tuple[list[int], ...]]:
    """(prompt text, prompt ids, stop sequences) for one user message. prompt_style None or "auto": the checkpoint's chat template
    when it ships one (stops: eos ids and the template's end-of-turn token), else the text as it is; "chat_template":
    the template, required; a style name: that hand-written style (stops: eos and its end-of-turn marker)."""
    key = (prompt_style or "auto").lower()
    if key in ("auto", "chat_template") and (tokenizer.chat_template is not None or key == "chat_template"):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.render_chat(messages, add_generation_prompt=True)
        return text, tokenizer.encode(text, bos=False), chat_stops(tokenizer)
    if key == "auto":
        return prompt, tokenizer.encode(prompt), _encoded_stops(tokenizer)
    style = PromptStyle.from_name(prompt_style)
    text = style.apply(prompt, system=system) if system else style.apply(prompt)
    return text, tokenizer.encode(text), style.stop_tokens(tokenizer)


def chat_stops(tokenizer: Tokenizer) -> tuple[list[int], ...]:
    """Stop sequences for the checkpoint's chat template: every eos id, then its end-of-turn token."""
    stops = list(_encoded_stops(tokenizer))
    eot = tokenizer.end_of_turn_ids()
    if eot and eot not in stops:
        stops.append(eot)
    return tuple(stops)


def _ends_with_stop(new_tokens: list[int], stop_sequences: Sequence[Sequence[int]]) -> bool:
    return any(0 < len(seq) <= len(new_tokens) and new_tokens[-len(seq):] == list(seq) for seq in stop_sequences)


PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float) -> None:
    """Options that would otherwise be silently ignored (top_p 2) or fail deep inside torch (top_k 0)."""
    if max_new_tokens < 1:
        raise LitftError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise LitftError(f"temperature must be >= 0 (0: greedy decoding), got {temperature}")
    if top_k is not None and top_k < 1:
        raise LitftError(f"top_k must be >= 1 (or null: all tokens), got {top_k}")
    if not 0 < top_p <= 1:
        raise LitftError(f"top_p must be in (0, 1] (1: off), got {top_p}")


def precision_dtype(precision: str) -> torch.dtype:
    """The weights' dtype for an inference precision, or one error listing the valid ones."""
    if precision not in PRECISIONS:
        raise LitftError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def load_for_generation(checkpoint_dir: Path, adapter_dir: Path | None, precision: str) -> tuple[GPT, str]:
    """(model, device): a checkpoint, or a base checkpoint with a trained (unmerged) adapter on it."""
    dtype = precision_dtype(precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if adapter_dir is None:
        return load_model(checkpoint_dir, device=device, dtype=dtype), device
    # imported here, not at the top: the methods are LightningModules, and importing Lightning (~5 s) is not
    # needed to generate from a plain checkpoint (`litft generate`, `litft chat` without --adapter_dir)
    from litft.methods.run_dir import load_method

    method = load_method(adapter_dir, checkpoint_dir)  # the run's own class rebuilds base + adapter
    model = method.model
    if not getattr(method, "quantize", None):  # a quantized base is already on the device, computing in the
        model.to(device=device, dtype=dtype)  # activations' dtype; casting would touch its packed weights
    return model, device


def main(
    checkpoint_dir: Path,
    prompt: str = "What food do llamas eat?",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int = 42,
    prompt_style: str | None = None,
    precision: str = "32-true",
    adapter_dir: Path | None = None,
) -> str:
    """Generate text from a litft checkpoint, optionally through a trained (unmerged) adapter.

    Args:
        checkpoint_dir: a litft checkpoint directory (e.g. from `litft convert_to_litft` or `litft merge_lora`);
            with adapter_dir, the base model the adapter applies to.
        prompt: the text to continue.
        max_new_tokens: how many tokens to generate at most (stops earlier at an end-of-sequence token).
        temperature: 0 for greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens (None: all).
        top_p: nucleus sampling: sample among the smallest set of tokens holding this much probability.
        seed: random seed for sampling.
        prompt_style: how the prompt is framed: default (auto) the checkpoint's chat template when it ships one
            (stopping at its end-of-turn token), else the text as it is; or a style (alpaca, chatml, llama3, plain...).
        precision: 32-true, bf16-true or 16-true.
        adapter_dir: the `final/` directory of an adapter run (LoRA, DoRA, QLoRA, ..., or `litft import_peft`'s
            output): generate with its adapter on checkpoint_dir, unmerged (a QLoRA run keeps its quantized base).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    model, device = load_for_generation(checkpoint_dir, adapter_dir, precision)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt, ids, stops = chat_prompt(tokenizer, prompt, prompt_style)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_ids, generator=gen,
                   stop_sequences=stops)
    dt = time.perf_counter() - t0
    text = tokenizer.decode(out[ids.numel():], skip_special_tokens=True)
    print(prompt + text)
    n = out.numel() - ids.numel()
    print(f"\n[{n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s]", flush=True)
    return text
