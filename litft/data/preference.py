"""Preference data for DPO: JSON / JSONL records with a prompt, a chosen and a rejected response.

A record is either plain text
    {"prompt": "What kind of word is otter?", "chosen": "animal", "rejected": "food"}
or conversational (lists of messages; each completion one assistant message):
    {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "animal"}], ...}

Rendering (`prompt_style`): "auto" (the default) uses the checkpoint's chat template when it ships one, else
Alpaca; "chat_template" requires the template; any other name is a hand-written style, which renders an optional
system message and one user message. With the template the prompt (any turns ending with a user turn; a string is
one user turn) is rendered with the generation prompt, exactly `apply_chat_template(prompt,
add_generation_prompt=True)`, and each completion is the assistant turn as the template renders it after that
prompt, its end-of-turn token included, found by prefix rendering as conversation.py finds assistant spans (so DPO
scores the same reply tokens SFT on that conversation trained). The template's layout after the end-of-turn
(ChatML's newline) is not part of the completion: TRL keeps it, litft stops where the reply's turn ends, as its
SFT masks do.

Each pair becomes two sequences sharing the prompt: prompt + chosen and prompt + rejected, the prompt masked
(-100). Truncation to max_seq_length keeps the completions' starts (their ends are cut); with max_prompt_length a
long prompt keeps its end (its start is cut). A completion of which nothing would remain is an error.
A batch of B pairs is 2B rows: the B chosen sequences, then the B rejected ones (`is_chosen` marks them), so the
model sees both in one forward.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from litft.chat_template import ROLES
from litft.data.base import DataError, DataModule, Sample, SFTDataset, collate
from litft.data.conversation import assistant_token_spans
from litft.data.json_data import _where, load_json_records, split_off_validation
from litft.data.prompts import PromptStyle, resolve_prompt_style
from litft.utils import LitftError

if TYPE_CHECKING:
    from litft.tokenizer import Tokenizer


class Preference(DataModule):
    """Preference pairs (prompt, chosen, rejected) from a JSON list or a JSONL file, plain or conversational."""

    preference_pairs = True  # the loop refuses it with an SFT method (which would also learn the rejected side)

    def __init__(
        self,
        json_path: Path,
        val_json_path: Path | None = None,
        val_split_fraction: float = 0.05,
        prompt_style: str = "auto",
        add_eos: bool = True,
        max_prompt_length: int | None = None,
        ignore_index: int = -100,
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
    ) -> None:
        """Preference pairs from a JSON / JSONL file.

        Args:
            json_path: Training pairs: a .json file holding a list of records, or a .jsonl file.
            val_json_path: Optional separate validation file; if unset, a seeded random `val_split_fraction`
                of json_path.
            val_split_fraction: Fraction of json_path held out for validation (when no val_json_path).
            prompt_style: "auto": the checkpoint's chat template (chat_template.jinja or tokenizer_config.json),
                else alpaca; "chat_template": the template, required; or a hand-written style that wraps the user
                message (one of litft.data.prompts.prompt_styles).
            add_eos: Append the EOS token to each completion (the model learns where a response ends); hand-written
                styles only: the chat template writes its own end-of-turn token.
            max_prompt_length: Cut longer prompts to their last this many tokens (null: prompts are kept whole,
                and one that leaves no room for a completion is an error).
            ignore_index: Label value that the loss ignores.
            prompt_key: Record field holding the prompt (a string, or a list of messages).
            chosen_key: Record field holding the preferred response (a string, or a list of messages).
            rejected_key: Record field holding the dispreferred response (a string, or a list of messages).
        """
        self.json_path = Path(json_path)
        self.val_json_path = Path(val_json_path) if val_json_path is not None else None
        if not 0.0 < val_split_fraction < 1.0:
            raise DataError(f"val_split_fraction must be in (0, 1), got {val_split_fraction}. Use e.g. "
                            "--data.val_split_fraction 0.05, or give a separate --data.val_json_path.")
        if max_prompt_length is not None and max_prompt_length < 1:
            raise DataError(f"max_prompt_length must be >= 1 or null, got {max_prompt_length}")
        resolve_prompt_style(prompt_style, None)  # fail at CLI-parse time, not after loading a model
        self.val_split_fraction, self.prompt_style, self.add_eos = val_split_fraction, prompt_style, add_eos
        self.max_prompt_length, self.ignore_index = max_prompt_length, ignore_index
        self.prompt_key, self.chosen_key, self.rejected_key = prompt_key, chosen_key, rejected_key
        self.train_dataset: SFTDataset | None = None
        self.val_dataset: SFTDataset | None = None
        self.num_truncated = 0

    def setup(self, tokenizer: Tokenizer, max_seq_length: int | None, seed: int = 42) -> None:
        if max_seq_length is not None and max_seq_length < 1:
            max_seq_length = None
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        style = resolve_prompt_style(self.prompt_style, tokenizer)  # None: the checkpoint's chat template
        self.num_truncated = 0
        train = self._load_and_tokenize(self.json_path, tokenizer, style, max_seq_length)
        val = (None if self.val_json_path is None
               else self._load_and_tokenize(self.val_json_path, tokenizer, style, max_seq_length))
        train, val = split_off_validation(train, val, self.val_split_fraction, seed,
                                          f"Data file {str(self.json_path)!r}", unit="pair")
        for split in (train, val):  # the index of each pair in its split: the key of a cached reference
            for i, sample in enumerate(split):
                sample["pair_index"] = torch.tensor(i)
        self.train_dataset, self.val_dataset = SFTDataset(train), SFTDataset(val)

    def collate_fn(self, samples: list[Sample]) -> dict[str, Tensor]:
        """2B rows, padded to the longest: chosen sequences (rows 0..B-1), then rejected ones (B..2B-1)."""
        rows = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples]
        rows += [{"input_ids": s["rejected_input_ids"], "labels": s["rejected_labels"]} for s in samples]
        batch = collate(rows, pad_id=self.pad_id, ignore_index=self.ignore_index)
        batch["is_chosen"] = torch.arange(2 * len(samples)) < len(samples)
        batch["pair_index"] = torch.stack([s["pair_index"] for s in samples])
        return batch

    # -- records -> token ids ------------------------------------------------------------------
    def _text(self, record: dict, key: str, option: str, path: Path, where: str, role: str) -> str | list:
        if key not in record:
            raise DataError(f"Data file {str(path)!r}: {where} has no {key!r} field; its keys are {sorted(record)}. "
                            f"If your data names this field differently, set --data.{option} <name>.")
        value = record[key]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            return value
        raise DataError(f"Data file {str(path)!r}: {where} field {key!r} must be a string or a list of "
                        f"{{\"role\": ..., \"content\": ...}} messages, got {value!r:.80}")

    def _render_prompt(self, value: str | list, style: PromptStyle, path: Path, where: str) -> str:
        if isinstance(value, str):
            return style.apply(value)
        roles = [m.get("role") for m in value]
        contents = [m.get("content") for m in value]
        if not all(isinstance(c, str) for c in contents) or roles not in (["user"], ["system", "user"]):
            raise DataError(f"Data file {str(path)!r}: {where} prompt messages must be an optional system message and "
                            f"one user message, each with string content (got roles {roles}); prompt styles render one "
                            "user turn: put earlier turns into the user message, or use the checkpoint's chat template "
                            "(--data.prompt_style chat_template)")
        return style.apply(contents[-1], **({"system": contents[0]} if len(value) == 2 else {}))

    def _prompt_messages(self, value: str | list, path: Path, where: str) -> list[dict[str, str]]:
        """The prompt as chat-template turns: a string is one user turn; a list is any turns ending with a user's."""
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        roles = [m.get("role") for m in value]
        if not all(isinstance(m.get("content"), str) for m in value) or not set(roles) <= set(ROLES) \
                or roles[-1] != "user":
            raise DataError(f"Data file {str(path)!r}: {where} prompt messages must be turns with roles among "
                            f"{', '.join(ROLES)} and string content, the last one a user turn (got roles {roles})")
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def _completion(self, value: str | list, key: str, path: Path, where: str) -> str:
        if isinstance(value, list):
            if len(value) != 1 or value[0].get("role") != "assistant" or not isinstance(value[0].get("content"), str):
                raise DataError(f"Data file {str(path)!r}: {where} field {key!r} must be one assistant message "
                                "with string content")
            value = value[0]["content"]
        if not value.strip():
            raise DataError(f"Data file {str(path)!r}: {where} has an empty {key!r} completion: a preference needs "
                            "two real responses; fill it in or drop the record")
        return value

    def _load_and_tokenize(self, path: Path, tokenizer: Tokenizer, style: PromptStyle | None,
                           max_seq_length: int | None) -> list[Sample]:
        records = load_json_records(path)
        if not records:
            raise DataError(f"Data file {str(path)!r} contains no pairs (an empty list). Add records to it.")
        samples: list[Sample] = []
        truncated = same = 0
        for index, (record, lineno) in enumerate(records):
            where = _where(index, lineno)
            if not isinstance(record, dict):
                raise DataError(f"Data file {str(path)!r}: {where} is a {type(record).__name__}, expected a JSON "
                                f'object like {{"{self.prompt_key}": ..., "{self.chosen_key}": ..., '
                                f'"{self.rejected_key}": ...}}.')
            prompt = self._text(record, self.prompt_key, "prompt_key", path, where, "user")
            chosen = self._text(record, self.chosen_key, "chosen_key", path, where, "assistant")
            rejected = self._text(record, self.rejected_key, "rejected_key", path, where, "assistant")
            if style is None:
                messages = self._prompt_messages(prompt, path, where)
            else:
                prompt_ids = tokenizer.encode(self._render_prompt(prompt, style, path, where), bos=tokenizer.use_bos)
            replies = [self._completion(c, k, path, where) for c, k in ((chosen, self.chosen_key),
                                                                        (rejected, self.rejected_key))]
            if style is None:
                try:
                    prompt_ids, ids = templated_pair(tokenizer, messages, replies)
                except LitftError as e:  # the template's refusal, located
                    raise type(e)(f"Data file {str(path)!r}: {where}: {e}") from None
            else:
                ids = [tokenizer.encode(r, bos=False, eos=self.add_eos) for r in replies]
            prompt_ids, ids = prompt_ids.long(), [i.long() for i in ids]
            full = len(prompt_ids) + max(len(i) for i in ids)
            if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
                # the prompt's end survives, and its BOS (a template writes its own)
                keep_bos = int(bool(tokenizer.use_bos)) if style is not None else int(
                    tokenizer.bos_id is not None and int(prompt_ids[0]) == tokenizer.bos_id)
                prompt_ids = torch.cat([prompt_ids[:keep_bos], prompt_ids[len(prompt_ids) - self.max_prompt_length
                                                                          + keep_bos:]])
            if max_seq_length is not None:
                room = max_seq_length - len(prompt_ids)
                if room < 1:
                    hint = ("or set --data.max_prompt_length (keeps the prompt's end)" if self.max_prompt_length is None
                            else f"or lower --data.max_prompt_length below {max_seq_length}")
                    raise DataError(f"Data file {str(path)!r}: {where}: the prompt is {len(prompt_ids)} tokens, "
                                    f"max_seq_length={max_seq_length} leaves nothing of its completions. Raise "
                                    f"max_seq_length (to at least {len(prompt_ids) + 1}) {hint}, or shorten the prompt.")
                ids = [i[:room] for i in ids]
            truncated += full > len(prompt_ids) + max(len(i) for i in ids)
            same += torch.equal(ids[0], ids[1])
            sample: Sample = {}
            for prefix, completion in (("", ids[0]), ("rejected_", ids[1])):
                input_ids = torch.cat([prompt_ids, completion])
                labels = input_ids.clone()
                labels[: len(prompt_ids)] = self.ignore_index
                sample[f"{prefix}input_ids"], sample[f"{prefix}labels"] = input_ids, labels
            samples.append(sample)
        if same == len(samples):
            raise DataError(f"Data file {str(path)!r}: in every pair the chosen and the rejected response are the same "
                            f"tokens{' after truncation' if truncated else ''}: there is no preference to learn. Check "
                            f"--data.chosen_key / --data.rejected_key{' and max_seq_length' if truncated else ''}.")
        if same:
            warnings.warn(f"Data file {str(path)!r}: {same} of {len(samples)} pairs have chosen == rejected (they "
                          "add nothing to the loss)", stacklevel=3)
        if truncated:
            warnings.warn(f"Data file {str(path)!r}: {truncated} of {len(samples)} pairs are longer than "
                          f"max_seq_length={max_seq_length} (or max_prompt_length) and were truncated (completion ends "
                          "cut, prompt starts cut).", stacklevel=3)
        self.num_truncated += truncated
        return samples


def templated_pair(tokenizer: Tokenizer, messages: list[dict[str, str]],
                   replies: list[str]) -> tuple[Tensor, list[Tensor]]:
    """(prompt ids, [completion ids, one per reply]) by the checkpoint's chat template.

    The prompt is `apply_chat_template(messages, add_generation_prompt=True)`; a completion is the reply's assistant
    span in the rendering of messages + reply (conversation.assistant_token_spans: it starts where the prompt's
    rendering ends and stops after the turn's end-of-turn token). A token straddling the edge (reply text merged
    into the prompt's last token) is the reply's, so the shared prompt is the part every rendering begins with."""
    prompt_text = tokenizer.render_chat(messages, add_generation_prompt=True)
    rows = []
    for reply in replies:
        turns = messages + [{"role": "assistant", "content": reply}]
        if not tokenizer.render_chat(turns).startswith(prompt_text):
            raise DataError("the chat template renders the prompt differently once a reply follows it, so the "
                            "reply cannot be found by rendering; pick a hand-written style (--data.prompt_style "
                            "chatml, ...)")
        ids, spans = assistant_token_spans(tokenizer, turns)
        start, end = spans[-1]
        if end <= start:
            raise DataError("the chat template renders nothing of the reply; check the template or the record")
        rows.append((ids, start, end))
    shared = min(start for _, start, _ in rows)  # ids[:shared] is the prompt's rendering in every row
    prompt_ids = torch.tensor(rows[0][0][:shared], dtype=torch.long)
    return prompt_ids, [torch.tensor(ids[shared:end], dtype=torch.long) for ids, _, end in rows]


__all__ = ["Preference", "templated_pair"]
