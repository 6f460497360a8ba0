"""litft's built-in demo: a tiny base model of our own and an instruction task it cannot do until fine-tuned.

`litft finetune lora --config config_hub/finetune/demo/lora.yaml` trains on these files; see README.md here
for what they are and `build.py` for how they are made. The paths below are package-relative, so the demo
works from any working directory.
"""
from pathlib import Path

DEMO_DIR = Path(__file__).parent
BASE_DIR = DEMO_DIR / "base"  # litft checkpoint: model.safetensors, model_config.yaml, tokenizer files
DATA_DIR = DEMO_DIR / "data"
TRAIN_JSON = DATA_DIR / "train.json"
TEST_JSON = DATA_DIR / "test.json"

__all__ = ["DEMO_DIR", "BASE_DIR", "DATA_DIR", "TRAIN_JSON", "TEST_JSON"]
