"""Hugging Face datasets: `--data HF --data.path NAME_OR_DIR` through the `datasets` library (the `litft[data]`
extra): a directory written by `save_to_disk`, a local parquet / json / jsonl / csv file, or a dataset on the hub
(online). Rows in the Alpaca layout (instruction / input / output columns) or conversational (a `messages` or
ShareGPT `conversations` column) become samples exactly as the same records in a JSON file would.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from litft.data.base import DataError
from litft.data.conversation import record_messages, setup_conversations
from litft.data.json_data import JSON

if TYPE_CHECKING:
    from litft.tokenizer import Tokenizer

FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("--data HF needs the `datasets` package: pip install 'litft[data]'") from None
    return datasets


def load_split(path: str, split: str, name: str | None = None) -> Any:
    """One split of a dataset as a `datasets.Dataset`; a missing split or dataset is one DataError."""
    datasets = _datasets()
    p = Path(path)
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(p))  # save_to_disk's arrow files: data, never code
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path} has no split {split!r}; its splits are {', '.join(loaded)}")
                return loaded[split]
            if split != "train":  # a single Dataset saved on its own is the training split
                raise DataError(f"{path} holds one split (saved without split names), so only 'train', not {split!r}")
            return loaded
        if p.is_file():
            builder = FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: unknown data file type {p.suffix!r}; use {', '.join(FILE_BUILDERS)}")
            if split != "train":
                raise DataError(f"{path} is one file, so one split 'train', not {split!r}; give the validation data "
                                "as another --data.val_path file, or leave --data.val_split unset")
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        return datasets.load_dataset(path, name, split=split)  # a hub name (online) or a local folder of files
    except DataError:
        raise
    except ValueError as e:  # datasets: 'Unknown split "x". Should be one of [...]'
        raise DataError(f"{path}: {' '.join(str(e).split())[:300]}") from None
    except Exception as e:  # not found, offline, corrupt files: one line naming the dataset
        raise DataError(f"cannot load dataset {path!r} (split {split!r}): {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None


class HF(JSON):
    """A Hugging Face dataset (save_to_disk directory, parquet/json/csv file, or hub name), Alpaca-layout or
    conversational columns."""

    def __init__(
        self,
        path: str,
        split: str = "train",
        val_split: str | None = None,
        val_path: str | None = None,
        name: str | None = None,
        val_split_fraction: float = 0.05,
        prompt_style: str = "auto",
        mask_prompt: bool = True,
        train_on_all: bool = False,
        ignore_index: int = -100,
        packing: bool = False,
        add_eos: bool = True,
        instruction_key: str = "instruction",
        input_key: str = "input",
        output_key: str = "output",
        messages_key: str = "messages",
    ) -> None:
        """A dataset read with the `datasets` library (pip install 'litft[data]').

        Args:
            path: a directory written by `Dataset.save_to_disk`, a .parquet/.json/.jsonl/.csv file, or a hub dataset
                name (needs the network).
            split: the training split.
            val_split: the validation split (e.g. "test"); else val_path, else a seeded val_split_fraction of split.
            val_path: a separate dataset (directory or file) whose `val_split` (default "train") is validation.
            name: the hub dataset's configuration name, if it has several.
            val_split_fraction: Fraction held out for validation when neither val_split nor val_path is given.
            prompt_style: "auto" (the checkpoint's chat template, else alpaca), "chat_template", or a style name.
            mask_prompt: Alpaca layout: loss on the response only.
            train_on_all: Conversations: loss on every token, not only the assistant turns.
            ignore_index: Label value that the loss ignores.
            packing: Pack several samples into each max_seq_length sequence.
            add_eos: Alpaca layout with a hand-written style: append EOS to each response.
            instruction_key: Alpaca layout: the instruction column.
            input_key: Alpaca layout: the optional input column.
            output_key: Alpaca layout: the response column.
            messages_key: Conversations: the [{role, content}] column (a ShareGPT `conversations` column also works).
        """
        super().__init__(json_path=Path(path), val_split_fraction=val_split_fraction, prompt_style=prompt_style,
                         mask_prompt=mask_prompt, ignore_index=ignore_index, packing=packing, add_eos=add_eos,
                         instruction_key=instruction_key, input_key=input_key, output_key=output_key)
        self.path, self.split, self.val_split, self.val_path, self.name = path, split, val_split, val_path, name
        self.train_on_all = train_on_all
        self.messages_key = messages_key
        self._rows: dict[str, Any] = {}

    def load_records(self, path: Path) -> list[tuple[Any, int | None]]:
        return [(row, None) for row in self._rows[str(path)]]

    def setup(self, tokenizer: Tokenizer, max_seq_length: int | None, seed: int = 42) -> None:
        train = load_split(self.path, self.split, self.name)
        val = None
        if self.val_path is not None:
            val = load_split(self.val_path, self.val_split or "train", self.name)
        elif self.val_split is not None:
            val = load_split(self.path, self.val_split, self.name)
        train_label = f"{self.path}[{self.split}]"
        val_label = f"{self.val_path or self.path}[{self.val_split or 'train'}]"
        columns = set(train.column_names)
        if self.messages_key in columns or "conversations" in columns:
            items = [(record_messages(r, f"{train_label} row {i}", self.messages_key), f"{train_label} row {i}")
                     for i, r in enumerate(train)]
            val_items = None if val is None else [
                (record_messages(r, f"{val_label} row {i}", self.messages_key), f"{val_label} row {i}")
                for i, r in enumerate(val)]
            setup_conversations(self, tokenizer, items, val_items, max_seq_length, seed, source=train_label)
            return
        for dataset, label in ((train, train_label), (val, val_label)):
            if dataset is None:
                continue
            for column, option in ((self.instruction_key, "instruction_key"), (self.output_key, "output_key")):
                if column not in dataset.column_names:
                    raise DataError(
                        f"{label} has no column {column!r}; its columns are {', '.join(dataset.column_names)}. "
                        f"Map yours with --data.{option} (or --data.messages_key for conversations)")
        self._rows = {train_label: list(train)}
        if val is not None:
            self._rows[val_label] = list(val)
        self.json_path = Path(train_label)
        self.val_json_path = Path(val_label) if val is not None else None
        super().setup(tokenizer, max_seq_length, seed)


__all__ = ["HF", "load_split"]
