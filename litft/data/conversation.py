"""Conversational data: multi-turn `messages` ([{role, content}]) or ShareGPT `conversations` ([{from, value}]).

Loss goes on every assistant turn by default, its end-of-turn token included. With the checkpoint's chat template
the assistant spans are derived by rendering, for any template: an assistant turn starts where the rendering of the
conversation before it with the generation prompt ends, and stops where the template starts writing whatever comes
after it (found by rendering the turn with and without a following message), trailing whitespace excluded. The
whole conversation is tokenised once, exactly as `apply_chat_template(tokenize=True)` would, and the edges are
found by comparing it with the encoded renderings (a token straddling the prompt/reply edge counts as the reply's,
as in transformers' assistant masks).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from litft.chat_template import ROLES
from litft.data.base import DataError, DataModule, Sample, SFTDataset
from litft.data.json_data import _where, load_json_records, pack_samples, split_off_validation
from litft.data.prompts import PromptStyle, resolve_prompt_style
from litft.utils import LitftError

if TYPE_CHECKING:
    from litft.tokenizer import Tokenizer

# ShareGPT speaker names -> roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function": "tool", "observation": "tool"}


def record_messages(record: Any, where: str, messages_key: str = "messages") -> list[dict[str, str]]:
    """The [{role, content}] list of one record: `messages_key` ([{role, content}]) or ShareGPT `conversations`
    ([{from, value}]). Raises one DataError naming the record for anything else."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, expected an object with a {messages_key!r} list")
    if messages_key in record:
        turns, role_key, content_key, names = record[messages_key], "role", "content", {r: r for r in ROLES}
    elif "conversations" in record:
        turns, role_key, content_key, names = record["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise DataError(f"{where} has no {messages_key!r} list (nor a ShareGPT 'conversations' list); its keys are "
                        f"{sorted(record)}. Set --data.messages_key if your data names it differently.")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: the conversation must be a non-empty list of turns, got {turns!r:.80}")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{where}, turn {k}: expected {{{role_key!r}: ..., {content_key!r}: ...}}, got {turn!r:.80}")
        role, content = turn[role_key], turn[content_key]
        if role not in names:
            raise DataError(f"{where}, turn {k}: unknown role {role!r}; known: {', '.join(sorted(names))}")
        if not isinstance(content, str):
            raise DataError(f"{where}, turn {k}: content must be a string, got {type(content).__name__}")
        messages.append({"role": names[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where} has no assistant turn, so nothing to learn: add the reply, or drop the record")
    return messages


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_token_spans(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids of the rendered conversation, [(start, end) token span of each assistant turn]) by prefix rendering.

    Compared in tokens, not characters: "<|endoftext|>" and "<|user|>" share the characters "<|", not a token."""
    full = tokenizer.render_chat(messages)
    ids = tokenizer.encode(full, bos=False).tolist()
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        if not full.startswith(before):
            raise DataError("the chat template renders earlier turns differently once later turns follow, so the "
                            "assistant turns cannot be found by rendering; use --data.train_on_all true, or another "
                            "template (--data.prompt_style)")
        # a token straddling the prompt/reply edge holds reply text: it counts as the reply's
        start = _common_prefix(tokenizer.encode(before, bos=False).tolist(), ids) if before else 0
        upto = tokenizer.encode(tokenizer.render_chat(messages[: i + 1]), bos=False).tolist()
        end = _common_prefix(upto, ids)
        try:  # what the template writes only after a conversation's last turn (Phi-3's eos) is not the reply's
            probe = tokenizer.render_chat(messages[: i + 1] + [{"role": "user", "content": "x"}])
            end = min(end, _common_prefix(upto, tokenizer.encode(probe, bos=False).tolist()))
        except LitftError:  # a template that refuses the probe: keep the rendering of the turn itself
            pass
        while end > start and not tokenizer.decode(ids[end - 1 : end]).strip():
            end -= 1  # the newline after the end-of-turn token is the template's layout, not the reply
        spans.append((start, end))
    return ids, spans


def tokenize_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]], style: PromptStyle | None,
                          train_on_all: bool = False, ignore_index: int = -100,
                          last_turn_only: bool = False) -> Sample:
    """input_ids + labels of one conversation: labels on the assistant turns only (unless train_on_all), or only on
    the last one (last_turn_only: the held-out reply exact match scores). `style` None: the checkpoint's template."""
    if style is None and train_on_all and not last_turn_only:  # no spans needed: any template works
        ids, token_spans = tokenizer.apply_chat_template(messages).tolist(), []
    elif style is None:
        ids, token_spans = assistant_token_spans(tokenizer, messages)
    else:
        ids, token_spans = _hand_written(tokenizer, messages, style)
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone() if train_on_all else torch.full_like(input_ids, ignore_index)
    if not train_on_all:
        for s, e in token_spans[-1:] if last_turn_only else token_spans:
            labels[s:e] = input_ids[s:e]
    elif last_turn_only:
        labels[: token_spans[-1][0]] = ignore_index
    labels[:1] = ignore_index  # nothing predicts the first token (nor, packed, from the previous sample)
    return {"input_ids": input_ids, "labels": labels}


def _hand_written(tokenizer: Tokenizer, messages: list[dict[str, str]],
                  style: PromptStyle) -> tuple[list[int], list[tuple[int, int]]]:
    """A conversation in a hand-written prompt style: each user turn wrapped by the style (the system text given to
    the first), each assistant reply followed by eos. The pieces are encoded one by one, so the spans are exact."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    ids: list[int] = [tokenizer.bos_id] if tokenizer.use_bos and tokenizer.bos_id is not None else []
    spans, first_user = [], True
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "tool":
            raise DataError(f"tool turns need the model's chat template; the prompt style {style!r} has no tool role")
        if m["role"] == "user":
            prompt = style.apply(m["content"], system=system) if first_user else style.apply(m["content"])
            ids += tokenizer.encode(prompt, bos=False).tolist()
            first_user = False
        else:
            start = len(ids)
            ids += tokenizer.encode(m["content"], bos=False, eos=tokenizer.eos_id is not None).tolist()
            spans.append((start, len(ids)))
    return ids, spans


def conversation_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]], style: PromptStyle | None) -> torch.Tensor:
    """The ids that ask for the next assistant turn after `messages` (the last one a user turn), framed exactly as
    training framed the turns before a reply: the template with its generation prompt, or the hand-written style."""
    if style is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids, _ = _hand_written(tokenizer, messages, style)
    return torch.tensor(ids, dtype=torch.long)


class Conversations(DataModule):
    """Multi-turn conversations from a JSON list or JSONL file: `messages` [{role, content}] (system, user,
    assistant, tool) or ShareGPT `conversations` [{from, value}]."""

    def __init__(
        self,
        json_path: Path,
        val_json_path: Path | None = None,
        val_split_fraction: float = 0.05,
        prompt_style: str = "auto",
        train_on_all: bool = False,
        ignore_index: int = -100,
        packing: bool = False,
        messages_key: str = "messages",
    ) -> None:
        """Conversations from a JSON / JSONL file.

        Args:
            json_path: Training data: a .json list of records or a .jsonl file; each record holds a `messages` list
                of {"role", "content"} or a ShareGPT `conversations` list of {"from", "value"}.
            val_json_path: Optional separate validation file (else a seeded `val_split_fraction` of json_path).
            val_split_fraction: Fraction of json_path held out for validation (when no val_json_path).
            prompt_style: "auto": the checkpoint's chat template (chat_template.jinja or tokenizer_config.json),
                else alpaca; "chat_template": the template, required; or a hand-written style (chatml, llama3, ...).
            train_on_all: Compute the loss on every token, not only on the assistant turns.
            ignore_index: Label value that the loss ignores.
            packing: Pack several conversations into each max_seq_length sequence.
            messages_key: Record field holding the [{role, content}] list.
        """
        self.json_path = Path(json_path)
        self.val_json_path = Path(val_json_path) if val_json_path is not None else None
        if not 0.0 < val_split_fraction < 1.0:
            raise DataError(f"val_split_fraction must be in (0, 1), got {val_split_fraction}")
        self.val_split_fraction = val_split_fraction
        resolve_prompt_style(prompt_style, None)  # a misspelt name fails at parse time
        self.prompt_style = prompt_style
        self.train_on_all = train_on_all
        self.ignore_index = ignore_index
        self.packing = packing
        self.messages_key = messages_key
        self.train_dataset: SFTDataset | None = None
        self.val_dataset: SFTDataset | None = None
        self.num_truncated = 0

    def load(self, path: Path) -> list[tuple[list[dict[str, str]], str]]:
        """(messages, where) of every record in a file."""
        records = load_json_records(path)
        if not records:
            raise DataError(f"Data file {str(path)!r} contains no conversations (an empty list). Add records to it.")
        return [(record_messages(r, f"Data file {str(path)!r}: {_where(i, ln)}", self.messages_key),
                 f"{path}: {_where(i, ln)}") for i, (r, ln) in enumerate(records)]

    def setup(self, tokenizer: Tokenizer, max_seq_length: int | None, seed: int = 42) -> None:
        train = self.load(self.json_path)
        val = self.load(self.val_json_path) if self.val_json_path is not None else None
        setup_conversations(self, tokenizer, train, val, max_seq_length, seed, source=str(self.json_path))


def setup_conversations(data: DataModule, tokenizer: Tokenizer, train: list[tuple[list[dict[str, str]], str]],
                        val: list[tuple[list[dict[str, str]], str]] | None, max_seq_length: int | None,
                        seed: int, source: str) -> None:
    """Tokenise, split, truncate and pack conversations into `data.train_dataset` / `data.val_dataset`. Validation
    samples carry labels on their last assistant turn only: the exact-match score generates that reply from the
    conversation before it."""
    if max_seq_length is not None and max_seq_length < 1:
        max_seq_length = None
    if data.packing and max_seq_length is None:
        raise DataError("packing=True needs a positive max_seq_length to pack into.")
    data.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    style = resolve_prompt_style(data.prompt_style, tokenizer)
    train, val = split_off_validation(train, val, data.val_split_fraction, seed, source, unit="conversation",
                                      hint="pass a separate validation file")

    def build(items: list[tuple[list[dict[str, str]], str]], last_turn_only: bool) -> list[Sample]:
        samples, truncated = [], 0
        for messages, where in items:
            s = tokenize_conversation(tokenizer, messages, style, data.train_on_all, data.ignore_index, last_turn_only)
            if max_seq_length is not None and len(s["input_ids"]) > max_seq_length:
                truncated += 1
                s = {k: v[:max_seq_length] for k, v in s.items()}
            if not (s["labels"] != data.ignore_index).any():
                raise DataError(f"{where}: no assistant tokens left after truncation to max_seq_length="
                                f"{max_seq_length}; raise max_seq_length or shorten the conversation")
            samples.append(s)
        if truncated:
            warnings.warn(f"{source}: {truncated} of {len(items)} conversations are longer than max_seq_length="
                          f"{max_seq_length} and were truncated", stacklevel=3)
        data.num_truncated += truncated
        return samples

    data.num_truncated = 0
    train_samples, val_samples = build(train, False), build(val, True)
    if data.packing:
        train_samples, val_samples = pack_samples(train_samples, max_seq_length), pack_samples(val_samples, max_seq_length)
    data.train_dataset, data.val_dataset = SFTDataset(train_samples), SFTDataset(val_samples)


__all__ = ["Conversations", "conversation_prompt", "record_messages", "tokenize_conversation", "assistant_token_spans", "setup_conversations"]
