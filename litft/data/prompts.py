"""Prompt styles: turn an (instruction, input) pair into the text the model is conditioned on.

A style only produces the *prompt*; the response is appended by the data module (and by the
generation code at inference time), so the same class serves training and chatting.

To add a style, subclass `PromptStyle` and register it in `prompt_styles`:

    class MyStyle(PromptStyle):
        def apply(self, instruction: str, input: str = "", **kw) -> str:
            return f"Q: {join_input(instruction, input)}\nA: "

    prompt_styles["mine"] = MyStyle
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litft.data.base import DataError

if TYPE_CHECKING:
    from litft.tokenizer import Tokenizer


def join_input(instruction: str, input: str = "") -> str:
    """How styles without a dedicated input slot fold the optional input into the user turn."""
    return f"{instruction}\n\n{input}" if input else instruction


class PromptStyle:
    """Base class. `apply` returns the prompt text; the BOS token is NOT part of it (the
    tokenizer adds BOS when `tokenizer.use_bos`, so templates never double it)."""

    def apply(self, instruction: str, input: str = "", **kwargs: Any) -> str:
        raise NotImplementedError

    end_of_turn: str | None = None  # a chat style's end-of-turn marker: generation stops there as at EOS

    def stop_tokens(self, tokenizer: Tokenizer) -> tuple[list[int], ...]:
        """Token-id sequences that end a generated response: EOS, and the style's end-of-turn marker."""
        return _encoded_stops(tokenizer, *([self.end_of_turn] if self.end_of_turn else []))

    @classmethod
    def from_name(cls, name: str) -> PromptStyle:
        key = name.lower()
        if key not in prompt_styles:
            raise DataError(
                f"Unknown prompt style {name!r}. Valid names: auto, chat_template, {', '.join(sorted(prompt_styles))}. "
                "(Register a custom style by adding it to `litft.data.prompts.prompt_styles`.)"
            )
        return prompt_styles[key]()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _eos_ids(tokenizer: Tokenizer) -> list[int]:
    # `eos_ids` (from generation_config) can list several stop ids, e.g. Llama 3; eos_id comes first.
    first = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return first + sorted(set(getattr(tokenizer, "eos_ids", ())) - set(first))


def _encoded_stops(tokenizer: Tokenizer, *markers: str) -> tuple[list[int], ...]:
    # Encode each end-of-turn marker without BOS/EOS; with a tokenizer that knows the special
    # token this is a single id, otherwise a multi-token sequence (still a valid stop sequence).
    stops = [[i] for i in _eos_ids(tokenizer)]
    for marker in markers:
        ids = tokenizer.encode(marker, bos=False, eos=False).tolist()
        if ids and ids not in stops:
            stops.append(ids)
    return tuple(stops)


class Plain(PromptStyle):
    """No template: the instruction (and input, if any) verbatim."""

    def apply(self, instruction: str, input: str = "", **kwargs: Any) -> str:
        return join_input(instruction, input)


class Alpaca(PromptStyle):
    """The Stanford Alpaca template (two variants, with and without an input field)."""

    def apply(self, instruction: str, input: str = "", **kwargs: Any) -> str:
        if input:
            return (
                "Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
            )
        return (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Response:\n"
        )


class ChatML(PromptStyle):
    """<|im_start|>role ... <|im_end|> turns; pass `system=` for a system turn."""

    default_system: str | None = None
    end_of_turn = "<|im_end|>"

    def apply(self, instruction: str, input: str = "", system: str | None = None, **kwargs: Any) -> str:
        system = system if system is not None else self.default_system
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{join_input(instruction, input)}<|im_end|>\n<|im_start|>assistant\n"


class Qwen2(ChatML):
    """Qwen2 uses ChatML; its chat template inserts this system turn when none is given."""

    default_system = "You are a helpful assistant."


class Llama3(PromptStyle):
    """Llama 3 header-id format; <|begin_of_text|> is the BOS token so it is not in the text."""

    end_of_turn = "<|eot_id|>"

    def apply(self, instruction: str, input: str = "", system: str | None = None, **kwargs: Any) -> str:
        head = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
        return (
            f"{head}<|start_header_id|>user<|end_header_id|>\n\n{join_input(instruction, input)}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )


class Phi3(PromptStyle):
    end_of_turn = "<|end|>"

    def apply(self, instruction: str, input: str = "", system: str | None = None, **kwargs: Any) -> str:
        head = f"<|system|>\n{system}<|end|>\n" if system else ""
        return f"{head}<|user|>\n{join_input(instruction, input)}<|end|>\n<|assistant|>\n"


class Gemma(PromptStyle):
    """Gemma has no system role; a given system text is prepended to the user turn."""

    end_of_turn = "<end_of_turn>"

    def apply(self, instruction: str, input: str = "", system: str | None = None, **kwargs: Any) -> str:
        user = join_input(instruction, input)
        if system:
            user = f"{system}\n\n{user}"
        return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"


class Llama2(PromptStyle):
    """[INST] ... [/INST] with the optional <<SYS>> block inside the first instruction."""

    def apply(self, instruction: str, input: str = "", system: str | None = None, **kwargs: Any) -> str:
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"[INST] {sys_block}{join_input(instruction, input)} [/INST] "


class Mistral(PromptStyle):
    """Mistral instruct: [INST] ... [/INST], no system role (system text is prepended)."""

    def apply(self, instruction: str, input: str = "", system: str | None = None, **kwargs: Any) -> str:
        user = join_input(instruction, input)
        if system:
            user = f"{system}\n\n{user}"
        return f"[INST] {user} [/INST]"


def resolve_prompt_style(name: str, tokenizer: Tokenizer | None) -> PromptStyle | None:
    """The style a data module or generation uses; None means the checkpoint's own chat template.

    "auto": the template when the checkpoint ships one, else Alpaca; "chat_template": the template, which must exist;
    anything else: a hand-written style by name. With tokenizer None only the name is checked (at CLI-parse time)."""
    key = name.lower()
    if key not in ("auto", "chat_template"):
        return PromptStyle.from_name(name)
    if tokenizer is None:
        return None
    if getattr(tokenizer, "chat_template", None) is not None:
        return None
    if key == "chat_template":
        raise DataError(
            f"prompt_style 'chat_template': the checkpoint {str(tokenizer.checkpoint_dir)!r} ships no chat template "
            "(no chat_template.jinja, no chat_template in tokenizer_config.json); pick a style, e.g. --data.prompt_style"
            " chatml"
        )
    return Alpaca()


prompt_styles: dict[str, type[PromptStyle]] = {
    "plain": Plain,
    "alpaca": Alpaca,
    "chatml": ChatML,
    "qwen2": Qwen2,
    "llama3": Llama3,
    "phi3": Phi3,
    "gemma": Gemma,
    "llama2": Llama2,
    "mistral": Mistral,
}
