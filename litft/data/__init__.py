"""Data for supervised fine-tuning and preference tuning (Preference): prompt styles, the DataModule interface, JSON/JSONL loaders."""

from litft.data.base import DataError, DataFileNotFoundError, DataModule, SFTDataset, collate
from litft.data.json_data import JSON, Alpaca, load_json_records, pack_samples, tokenize_example, train_test_split
from litft.data.preference import Preference
from litft.data.prompts import PromptStyle, prompt_styles

__all__ = [
    "DataModule",
    "DataError",
    "DataFileNotFoundError",
    "SFTDataset",
    "collate",
    "JSON",
    "Alpaca",
    "Preference",
    "load_json_records",
    "pack_samples",
    "tokenize_example",
    "train_test_split",
    "PromptStyle",
    "prompt_styles",
]
