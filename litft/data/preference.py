"""Preference data for DPO: JSON / JSONL records with a prompt, a chosen and a rejected response.

A record is either plain text
    {"prompt": "What kind of word is otter?", "chosen": "animal", "rejected": "food"}
or conversational (lists of messages, rendered with the prompt style; the prompt holds an optional system message
and one user message, each completion one assistant message):
    {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "animal"}], ...}

Each pair becomes two sequences sharing the prompt: prompt + chosen and prompt + rejected, the prompt masked
(-100). Truncation to max_seq_length keeps the completions' starts (their ends are cut); with max_prompt_length a
long prompt keeps its end (its start is cut). A completion of which nothing would remain is an error.
A batch of B pairs is 2B rows: the B chosen sequences, then the B rejected ones (`is_chosen` marks them), so the
model sees both in one forward.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from litft.data.base import DataError, DataModule, Sample, SFTDataset, collate
from litft.data.json_data import _where, load_json_records, train_test_split
from litft.data.prompts import PromptStyle

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
        prompt_style: str = "alpaca",
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
            prompt_style: Template that wraps the prompt (the user message); one of litft.data.prompts.prompt_styles.
            add_eos: Append the EOS token to each completion (the model learns where a response ends).
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
        PromptStyle.from_name(prompt_style)  # fail at CLI-parse time, not after loading a model
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
        style = PromptStyle.from_name(self.prompt_style)
        self.num_truncated = 0
        train = self._load_and_tokenize(self.json_path, tokenizer, style, max_seq_length)
        if self.val_json_path is not None:
            val = self._load_and_tokenize(self.val_json_path, tokenizer, style, max_seq_length)
        else:
            if len(train) < 2:
                raise DataError(f"Data file {str(self.json_path)!r} has only {len(train)} pair, too few to split into "
                                "train and validation. Add pairs or pass a separate --data.val_json_path.")
            train, val = train_test_split(train, self.val_split_fraction, seed)
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
                            "user turn: put earlier turns into the user message")
        return style.apply(contents[-1], **({"system": contents[0]} if len(value) == 2 else {}))

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

    def _load_and_tokenize(self, path: Path, tokenizer: Tokenizer, style: PromptStyle,
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
            prompt_ids = tokenizer.encode(self._render_prompt(prompt, style, path, where), bos=tokenizer.use_bos).long()
            ids = [tokenizer.encode(self._completion(c, k, path, where), bos=False, eos=self.add_eos).long()
                   for c, k in ((chosen, self.chosen_key), (rejected, self.rejected_key))]
            full = len(prompt_ids) + max(len(i) for i in ids)
            if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
                keep_bos = int(bool(tokenizer.use_bos))  # the prompt's end survives, and its BOS
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


__all__ = ["Preference"]
