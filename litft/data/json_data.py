"""Instruction-tuning data from JSON / JSONL files in the Alpaca layout (instruction, input, output).

Pipeline in `JSON.setup`: load records -> format each with the prompt style -> tokenise (mask the
prompt, truncate) -> split train/val by seed -> optionally pack. Everything is tokenised up front:
fine-tuning sets are small, and it lets us report truncation and bad samples before training starts.
"""

from __future__ import annotations

import bisect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from litft.data.base import DataError, DataFileNotFoundError, DataModule, Sample, SFTDataset
from litft.data.prompts import PromptStyle, join_input, resolve_prompt_style

if TYPE_CHECKING:
    from litft.tokenizer import Tokenizer

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_json_records(path: Path) -> list[tuple[Any, int | None]]:
    """Read a JSON list or a JSONL file. Returns (record, line_number) pairs; the line number is
    only known for JSONL (for a JSON list, errors point at the record index instead)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataFileNotFoundError(f"Data file {str(path)!r} {what}. Check --data.json_path (or --data.val_json_path).")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"Data file {str(path)!r} is not valid UTF-8 ({e}). Re-save it as UTF-8.") from None
    if not text.strip():
        raise DataError(f"Data file {str(path)!r} is empty. It must hold a JSON list of records or JSON Lines.")

    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file holding one object per line fails with "Extra data" after the first line.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, path)
        raise DataError(
            f"Data file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Expected a JSON list of records `[{...}, ...]`, or JSON Lines (one object per line, .jsonl)."
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"Data file {str(path)!r} holds a top-level {type(data).__name__}; expected a JSON list of records "
            "`[{...}, ...]` or JSON Lines (one object per line, .jsonl)."
        )
    return [(record, None) for record in data]


def _parse_jsonl(text: str, path: Path) -> list[tuple[Any, int | None]]:
    records: list[tuple[Any, int | None]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are harmless
        try:
            records.append((json.loads(line), lineno))
        except json.JSONDecodeError as e:
            raise DataError(
                f"Data file {str(path)!r}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}). "
                "In a JSONL file every non-blank line must be one complete JSON object."
            ) from None
    return records


def _where(index: int, lineno: int | None) -> str:
    return f"record {index} (line {lineno})" if lineno is not None else f"record {index}"


def _field(record: dict, key: str, option: str, path: Path, where: str, required: bool) -> str:
    if key not in record:
        if not required:
            return ""
        raise DataError(
            f"Data file {str(path)!r}: {where} has no {key!r} field; its keys are {sorted(record)}. "
            f"If your data names this field differently, set --data.{option} (e.g. --data.{option} <name>)."
        )
    value = record[key]
    if value is None and not required:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. numeric answers in math sets
    if not isinstance(value, str):
        raise DataError(
            f"Data file {str(path)!r}: {where} field {key!r} must be a string, got {type(value).__name__}: {value!r:.80}"
        )
    return value


# ----------------------------------------------------------------------------------------------
# Tokenisation, splitting, packing
# ----------------------------------------------------------------------------------------------


def tokenize_example(
    tokenizer: Tokenizer,
    prompt: str,
    response: str,
    max_seq_length: int | None,
    mask_prompt: bool = True,
    ignore_index: int = -100,
    add_eos: bool = True,
) -> tuple[Sample, int, int, int]:
    """Tokenise one (prompt, response) pair.

    Returns (sample, full_length, prompt_length, kept_response_tokens), where sample holds the
    (possibly truncated) aligned `input_ids` and `labels`. labels[0] is always ignore_index: the
    model shifts internally, and in a packed sequence the first token must not be predicted
    from the previous sample.
    """
    prompt_ids = tokenizer.encode(prompt, bos=tokenizer.use_bos)
    response_ids = tokenizer.encode(response, bos=False, eos=add_eos)
    input_ids = torch.cat([prompt_ids, response_ids]).long()
    labels = input_ids.clone()
    if mask_prompt:
        labels[: len(prompt_ids)] = ignore_index
    labels[:1] = ignore_index
    full_length = len(input_ids)
    if max_seq_length is not None and full_length > max_seq_length:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    kept_response = max(0, len(input_ids) - len(prompt_ids))
    return {"input_ids": input_ids, "labels": labels}, full_length, len(prompt_ids), kept_response


def _templated_example(tokenizer: Tokenizer, user: str, reply: str, max_seq_length: int | None, mask_prompt: bool,
                       ignore_index: int) -> tuple[Sample, int, int, int]:
    """tokenize_example's result for a (user, reply) pair rendered by the checkpoint's chat template: the reply's
    span (its end-of-turn token included) is found by rendering, as for conversations."""
    from litft.data.conversation import tokenize_conversation  # same layer; conversation.py builds on this file

    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    sample = tokenize_conversation(tokenizer, messages, None, train_on_all=False, ignore_index=ignore_index)
    targets = (sample["labels"] != ignore_index).nonzero()
    prompt_len = int(targets[0]) if len(targets) else len(sample["labels"])
    if not mask_prompt:
        sample["labels"] = sample["input_ids"].clone()
        sample["labels"][:1] = ignore_index
    full_length = len(sample["input_ids"])
    if max_seq_length is not None and full_length > max_seq_length:
        sample = {k: v[:max_seq_length] for k, v in sample.items()}
    return sample, full_length, prompt_len, max(0, len(sample["input_ids"]) - prompt_len)


def train_test_split(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic random split: the same (items, val_fraction, seed) always gives the same split.
    Validation gets round(n * val_fraction) items, clamped so both splits are non-empty.
    Both splits keep the original order."""
    n = len(items)
    if n < 2:
        raise DataError(f"Cannot split {n} sample(s) into train and validation: need at least 2.")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = sorted(perm[:n_val])
    train_idx = sorted(perm[n_val:])
    return [items[i] for i in train_idx], [items[i] for i in val_idx]


def split_off_validation(train: list[T], val: list[T] | None, val_fraction: float, seed: int, source: str,
                         unit: str = "sample", hint: str = "pass a separate --data.val_json_path") -> tuple[list[T], list[T]]:
    """(train, val): `val` when given, else a seeded `val_fraction` of `train` (one error when there are too few)."""
    if val is not None:
        return train, val
    if len(train) < 2:
        raise DataError(f"{source} has only {len(train)} {unit}(s), too few to split into train and validation. "
                        f"Add {unit}s or {hint}.")
    return train_test_split(train, val_fraction, seed)


def pack_samples(samples: Sequence[Sample], max_seq_length: int) -> list[Sample]:
    """Pack samples into sequences of at most max_seq_length tokens (best-fit decreasing).

    Deterministic: samples are visited longest first (ties by original order) and each goes into
    the fullest open sequence it still fits in. Each packed item carries `position_ids`
    (restarting at 0 per sample, for RoPE) and `segment_ids` (1, 2, ... per sample; 0 is reserved
    for padding) so the model can build a block-diagonal causal mask.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    if any(n > max_seq_length for n in lengths):
        raise DataError(f"pack_samples: a sample is longer than max_seq_length={max_seq_length}; truncate first")
    order = sorted(range(len(samples)), key=lambda i: -lengths[i])  # sorted() is stable
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))  # tightest bin with room
        if pos < len(free):
            remaining, b = free.pop(pos)
        else:
            remaining, b = max_seq_length, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (remaining - lengths[i], b))

    packed: list[Sample] = []
    for members in bins:
        parts = [samples[i] for i in members]
        packed.append(
            {
                "input_ids": torch.cat([p["input_ids"] for p in parts]),
                "labels": torch.cat([p["labels"] for p in parts]),
                "position_ids": torch.cat([torch.arange(len(p["input_ids"])) for p in parts]),
                "segment_ids": torch.cat(
                    [torch.full((len(p["input_ids"]),), seg, dtype=torch.long) for seg, p in enumerate(parts, start=1)]
                ),
            }
        )
    return packed


# ----------------------------------------------------------------------------------------------
# Data modules
# ----------------------------------------------------------------------------------------------


class JSON(DataModule):
    """Instruction data from a JSON list or a JSONL file of Alpaca-layout records (instruction, input, output).

    A record: {"instruction": ..., "input": ..., "output": ...}; "input" is optional, and the three key names
    are options."""

    def __init__(
        self,
        json_path: Path,
        val_json_path: Path | None = None,
        val_split_fraction: float = 0.05,
        prompt_style: str = "auto",
        mask_prompt: bool = True,
        ignore_index: int = -100,
        packing: bool = False,
        add_eos: bool = True,
        instruction_key: str = "instruction",
        input_key: str = "input",
        output_key: str = "output",
    ) -> None:
        """Instruction data from a JSON / JSONL file.

        Args:
            json_path: Training data: a .json file holding a list of records, or a .jsonl file.
            val_json_path: Optional separate validation file. If unset, validation data is a
                seeded random `val_split_fraction` of json_path.
            val_split_fraction: Fraction of json_path held out for validation (when no val_json_path).
            prompt_style: Template that wraps instruction/input: "auto" (the checkpoint's chat template when it
                ships one, else alpaca), "chat_template", or one of litft.data.prompts.prompt_styles.
            mask_prompt: Compute the loss on response tokens only (prompt labels set to ignore_index).
            ignore_index: Label value that the loss ignores.
            packing: Pack several samples into each max_seq_length sequence (attention and positions
                stay within each sample via segment_ids / position_ids; on fp32 CPU litft's attention kernel
                skips the other samples' keys, elsewhere a dense mask). Without packing, the training loop's
                length-grouped batches (train.group_by_length) already keep padding low.
            add_eos: Append the EOS token to each response so the model learns to stop.
            instruction_key: Record field holding the instruction.
            input_key: Record field holding the optional input / context.
            output_key: Record field holding the target response.
        """
        self.json_path = Path(json_path)
        self.val_json_path = Path(val_json_path) if val_json_path is not None else None
        if not 0.0 < val_split_fraction < 1.0:
            raise DataError(
                f"val_split_fraction must be in (0, 1), got {val_split_fraction}. "
                "Use e.g. --data.val_split_fraction 0.05, or give a separate --data.val_json_path."
            )
        self.val_split_fraction = val_split_fraction
        resolve_prompt_style(prompt_style, None)  # fail at CLI-parse time, not after loading a model
        self.prompt_style = prompt_style
        self.mask_prompt = mask_prompt
        self.ignore_index = ignore_index
        self.packing = packing
        self.add_eos = add_eos
        self.instruction_key = instruction_key
        self.input_key = input_key
        self.output_key = output_key
        self.train_dataset: SFTDataset | None = None
        self.val_dataset: SFTDataset | None = None
        self.num_truncated = 0  # set by setup(): samples cut to max_seq_length (both files)

    def setup(self, tokenizer: Tokenizer, max_seq_length: int | None, seed: int = 42) -> None:
        """Load, tokenise, split and (optionally) pack. max_seq_length None or < 1 means no truncation."""
        if max_seq_length is not None and max_seq_length < 1:
            max_seq_length = None
        if self.packing and max_seq_length is None:
            raise DataError("packing=True needs a positive max_seq_length to pack into.")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        style = resolve_prompt_style(self.prompt_style, tokenizer)  # None: the checkpoint's chat template

        self.num_truncated = 0
        train = self._load_and_tokenize(self.json_path, tokenizer, style, max_seq_length)
        val = (None if self.val_json_path is None
               else self._load_and_tokenize(self.val_json_path, tokenizer, style, max_seq_length))
        train, val = split_off_validation(train, val, self.val_split_fraction, seed, f"Data file {str(self.json_path)!r}")

        if self.packing:
            assert max_seq_length is not None
            train, val = pack_samples(train, max_seq_length), pack_samples(val, max_seq_length)
        self.train_dataset, self.val_dataset = SFTDataset(train), SFTDataset(val)

    def load_records(self, path: Path) -> list[tuple[Any, int | None]]:
        """(record, line number) pairs of one file (the HF data module reads dataset rows instead)."""
        return load_json_records(path)

    def _load_and_tokenize(
        self, path: Path, tokenizer: Tokenizer, style: PromptStyle | None, max_seq_length: int | None
    ) -> list[Sample]:
        records = self.load_records(path)
        if not records:
            raise DataError(f"Data file {str(path)!r} contains no samples (an empty list). Add records to it.")

        samples: list[Sample] = []
        truncated = 0
        no_target: list[tuple[str, int, int, str]] = []  # (where, full length, prompt length, response)
        for index, (record, lineno) in enumerate(records):
            where = _where(index, lineno)
            if not isinstance(record, dict):
                raise DataError(
                    f"Data file {str(path)!r}: {where} is a {type(record).__name__}, expected a JSON object "
                    f'like {{"{self.instruction_key}": ..., "{self.output_key}": ...}}.'
                )
            instruction = _field(record, self.instruction_key, "instruction_key", path, where, required=True)
            input_ = _field(record, self.input_key, "input_key", path, where, required=False)
            output = _field(record, self.output_key, "output_key", path, where, required=True)
            if style is None:  # the checkpoint's chat template: a user turn and the assistant's reply
                sample, full_len, prompt_len, kept = _templated_example(
                    tokenizer, join_input(instruction, input_), output, max_seq_length, self.mask_prompt,
                    self.ignore_index)
            else:
                sample, full_len, prompt_len, kept = tokenize_example(
                    tokenizer,
                    style.apply(instruction, input_),
                    output,
                    max_seq_length,
                    mask_prompt=self.mask_prompt,
                    ignore_index=self.ignore_index,
                    add_eos=self.add_eos,
                )
            if kept == 0:
                no_target.append((where, full_len, prompt_len, output))
            truncated += full_len > len(sample["input_ids"])
            samples.append(sample)

        if no_target:
            # Collect them all first so the message can say how widespread the problem is.
            where, full_len, prompt_len, output = no_target[0]
            others = f" ({len(no_target) - 1} more sample(s) have the same problem)" if len(no_target) > 1 else ""
            if full_len == prompt_len:
                raise DataError(
                    f"Data file {str(path)!r}: {where} has no target tokens: its response is empty and "
                    f"add_eos=False{others}. Fill in its {self.output_key!r} field, drop it, or set --data.add_eos true."
                )
            raise DataError(
                f"Data file {str(path)!r}: {where} has no target tokens left after truncation to "
                f"max_seq_length={max_seq_length}: the prompt alone is {prompt_len} tokens (prompt + response = "
                f"{full_len} tokens){others}. Raise max_seq_length (to at least {prompt_len + 1}) or shorten "
                "or remove this sample."
            )
        if truncated:
            warnings.warn(
                f"Data file {str(path)!r}: {truncated} of {len(samples)} samples are longer than "
                f"max_seq_length={max_seq_length} and were truncated (the end of their response is cut off). "
                "Raise max_seq_length to keep them whole.",
                stacklevel=3,
            )
        self.num_truncated += truncated
        return samples


class Alpaca(JSON):
    """The Stanford Alpaca set (or a cleaned variant): JSON with the default Alpaca field names and
    template. litft does not download it; fetch e.g. `alpaca_data_cleaned.json` yourself and
    point --data.json_path at it. All other options are JSON's."""

    def __init__(self, json_path: Path = Path("data/alpaca/alpaca_data_cleaned.json"), prompt_style: str = "alpaca",
                 **kwargs: Any) -> None:
        """The Alpaca set from a local file (all JSON options apply).

        Args:
            json_path: Path to the Alpaca JSON file.
            prompt_style: the set's own Alpaca template by default; "auto" or "chat_template" for the checkpoint's.
        """
        super().__init__(json_path=json_path, prompt_style=prompt_style, **kwargs)


__all__ = ["JSON", "Alpaca", "load_json_records", "tokenize_example", "train_test_split", "pack_samples"]
