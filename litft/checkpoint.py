"""litft checkpoint directories: `model.safetensors` (litft names) + `model_config.yaml` + tokenizer files.

Safetensors only, so loading never unpickles anything. Every file is written to a temp name and
renamed into place, so a failure never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from litft.models.config import Config
from litft.models.gpt import GPT
from litft.utils import LitftError, atomic_path

WEIGHTS = "model.safetensors"
CONFIG = "model_config.yaml"
LITFT_FORMAT = {"format": "pt", "litft": "1"}  # safetensors header metadata marking litft names


def check_checkpoint_dir(checkpoint_dir: Path | str) -> Path:
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise LitftError(f"{d}: checkpoint directory not found (convert a HF model with `litft convert_to_litft` "
                         "or fetch one with `litft download`)")
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            hint = " (this looks like a HF checkpoint: run `litft convert_to_litft` on it)" if (
                d / "config.json").is_file() else ""
            raise LitftError(f"{d}: not a litft checkpoint, {name} is missing{hint}")
    return d


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one safetensors file, one at a time; a truncated/corrupt file gives a LitftError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LitftError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise LitftError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = GPT(config)
    sd = model.state_dict()
    if config.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: v.shape for k, v in sd.items()}


def validate_state_dict(config: Config, shapes: dict[str, torch.Size], source: Path | str) -> None:
    """Missing/unexpected tensors or a shape that disagrees with the config: one clear error."""
    want = expected_shapes(config)
    missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or unexpected:
        raise LitftError(f"{source}: weights do not match the model config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (is the config for another model?)")
    for k, shape in shapes.items():
        if tuple(shape) != tuple(want[k]):
            raise LitftError(f"{source}: shape mismatch for {k}: weights have {tuple(shape)}, the config "
                             f"implies {tuple(want[k])} (config and weights come from different models?)")


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], config: Config, out_dir: Path | str, tokenizer_dir: Path | str | None = None
) -> Path:
    """Write a litft checkpoint: weights, then tokenizer files, then the config last (so a
    directory with a model_config.yaml is complete)."""
    from litft.tokenizer import copy_tokenizer_files

    out_dir = Path(out_dir)
    sd = {k: v for k, v in state_dict.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    validate_state_dict(config, {k: v.shape for k, v in sd.items()}, out_dir / WEIGHTS)
    save_safetensors(sd, out_dir / WEIGHTS, metadata=LITFT_FORMAT)
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out_dir.resolve():
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)
    config.save(out_dir / CONFIG)
    return out_dir


def load_state_dict(checkpoint_dir: Path | str) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(Path(checkpoint_dir) / WEIGHTS))


def load_model(
    checkpoint_dir: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    config: Config | None = None,
) -> GPT:
    """Build the GPT of a litft checkpoint and load its weights (optionally cast to `dtype`)."""
    d = check_checkpoint_dir(checkpoint_dir)
    config = config or Config.from_checkpoint(d)
    sd = load_state_dict(d)
    validate_state_dict(config, {k: v.shape for k, v in sd.items()}, d / WEIGHTS)
    with torch.device("meta"):
        model = GPT(config)
    sd = {k: v.to(device=device, dtype=dtype if (dtype and v.is_floating_point()) else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LitftError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise LitftError(f"{path}: invalid JSON: {e}") from e
