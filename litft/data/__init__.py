"""Data for supervised fine-tuning and preference tuning (Preference): prompt styles, the DataModule interface, JSON/JSONL loaders."""

from litft.data.base import DataError, DataFileNotFoundError, DataModule, SFTDataset, collate
from litft.data.json_data import (JSON, Alpaca, load_json_records, pack_samples, split_off_validation, tokenize_example,
                                  train_test_split)
from litft.data.conversation import Conversations
from litft.data.hf_dataset import HF
from litft.data.preference import Preference
from litft.data.sampler import LengthGroupedSampler, sample_length
from litft.data.prompts import PromptStyle, prompt_styles, resolve_prompt_style

__all__ = [
    "DataModule",
    "DataError",
    "DataFileNotFoundError",
    "SFTDataset",
    "collate",
    "LengthGroupedSampler",
    "sample_length",
    "JSON",
    "Alpaca",
    "Conversations",
    "HF",
    "Preference",
    "resolve_prompt_style",
    "load_json_records",
    "pack_samples",
    "tokenize_example",
    "train_test_split",
    "split_off_validation",
    "PromptStyle",
    "prompt_styles",
]
