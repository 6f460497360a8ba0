"""litft checkpoint directories: `model.safetensors` (litft names) + `model_config.yaml` + tokenizer files.

Safetensors only, so loading never unpickles anything. Every file is written to a temp name and
renamed into place, so a failure never leaves a half-written checkpoint. Every safetensors file litft writes
carries a SHA-256 of its tensors in its header (`DIGEST_KEY`), checked whenever it is read whole: a file
changed after it was written (a flipped bit in a downloaded adapter, a bad disk) is refused, not loaded.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from litft.models.config import Config
from litft.models.gpt import GPT
from litft.tokenizer import copy_tokenizer_files
from litft.utils import LitftError, atomic_path

WEIGHTS = "model.safetensors"
CONFIG = "model_config.yaml"
METHOD_CONFIG = "method_config.yaml"  # in a run directory (out_dir/final, step-N): the method's class and init args
LITFT_FORMAT = {"format": "pt", "litft": "1"}  # safetensors header metadata marking litft names
DIGEST_KEY = "litft_sha256"  # header metadata: tensors_digest() of the file's tensors


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


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in the order given (callers sort by name)."""
    h = hashlib.sha256()
    for name, t in tensors:
        _digest_update(h, name, t)
    return h.hexdigest()


def _digest_update(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _open(path: Path):
    return safe_open(str(path), framework="pt")


def _unreadable(path: Path, e: Exception) -> LitftError:
    return LitftError(f"{path}: cannot read safetensors file (truncated or corrupt?): {' '.join(str(e).split())}")


_READ_ERRORS = (SafetensorError, OSError, RuntimeError)


def safetensors_header(path: Path) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """(name -> shape, metadata) of a safetensors file, from its header alone (no tensor data is read)."""
    try:
        with _open(path) as f:
            return {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file (not checksummed: only a whole-file read can check the digest)."""
    try:
        with _open(path) as f:
            return f.get_tensor(name)
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one safetensors file, one at a time, by name; a truncated or corrupt file, or one whose tensors
    no longer match the digest litft wrote into it, gives a LitftError (the digest is checked after the last
    tensor, so read the file whole before using what it holds). The file is opened per tensor: a handle kept
    open keeps every page it has read resident, which over a whole checkpoint is the full model in memory."""
    shapes, metadata = safetensors_header(path)
    expected = metadata.get(DIGEST_KEY)
    h = hashlib.sha256() if expected else None
    for name in sorted(shapes):
        t = read_tensor(path, name)
        if h is not None:
            _digest_update(h, name, t)
        yield name, t
    if h is not None and h.hexdigest() != expected:
        raise LitftError(f"{path}: the tensors do not match the checksum written with them: the file was corrupted or "
                         "modified after litft saved it; do not use it (re-download or re-create it)")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` atomically, with their digest in the header (see the module docstring)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    metadata = {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors.items())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def meta_model(config: Config) -> GPT:
    """The model of a config on the meta device: its names and shapes, no memory."""
    with torch.device("meta"):
        return GPT(config)


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a checkpoint of this config holds (a tied head is stored as the embedding)."""
    sd = meta_model(config).state_dict()
    if config.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: v.shape for k, v in sd.items()}


def linear_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear layer of a model with this config."""
    return {n: (m.out_features, m.in_features) for n, m in meta_model(config).named_modules()
            if isinstance(m, nn.Linear)}


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
    config: Config | None = None, prepare: Callable[[GPT], None] | None = None,
    place: Callable[[GPT, str, torch.Tensor], bool] | None = None,
) -> GPT:
    """Build the GPT of a litft checkpoint and load its weights (floating ones cast to `dtype` if given).

    The model is made on the meta device, names and shapes are checked against the config from the file's header
    before any data is read, and the tensors stream in one at a time onto `device`. Two hooks let a caller change
    layers on the way (QLoRA, `adapters/quantize.py`): `prepare(model)` runs on the empty model, and
    `place(model, name, tensor)` may install a tensor itself (e.g. quantized) and return True."""
    d = check_checkpoint_dir(checkpoint_dir)
    config = config or Config.from_checkpoint(d)
    path = d / WEIGHTS
    validate_state_dict(config, safetensors_header(path)[0], path)
    model = meta_model(config)
    if prepare is not None:
        prepare(model)
    for key, tensor in iter_safetensors(path):
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if place is None or not place(model, key, tensor):
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            old = getattr(module, attr)
            value = tensor.to(device)
            setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter) else value)
        del tensor
    if config.tie_embeddings and model.lm_head.weight.is_meta:  # (a quantized embedding installs its own head)
        model.lm_head.weight = model.embed.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a bug in a loader, not in the user's input
        raise RuntimeError(f"tensors not materialised after loading {path}: {left[:4]}")
    return model


def read_method_config(run_dir: Path | str) -> dict[str, Any]:
    """`method_config.yaml` of a run directory, checked for shape: {class_path: str, init_args: mapping}. Plain
    data only (yaml.safe_load): what it names is looked up by `litft.methods.run_dir`, never imported."""
    run_dir = Path(run_dir)
    path = run_dir / METHOD_CONFIG
    if not path.is_file():
        raise LitftError(f"{run_dir}: no {METHOD_CONFIG}; expected the `final/` (or `step-N/`) directory of a "
                         "litft finetune run (a PEFT adapter directory is read with `litft import_peft`)")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LitftError(f"{path}: not valid YAML ({' '.join(str(e).split())}); the run directory is damaged") from e
    if (not isinstance(cfg, dict) or not isinstance(cfg.get("class_path"), str)
            or not isinstance(cfg.setdefault("init_args", {}), dict)):
        raise LitftError(f"{path}: expected a mapping with a `class_path` string and an `init_args` mapping")
    return cfg


def run_base_dir(run_dir: Path | str, init_args: dict[str, Any], checkpoint_dir: Path | str | None = None) -> Path:
    """The base model of a run directory: `checkpoint_dir` if given, else the one the run records; an error that
    names --checkpoint_dir when that is not there (the run was made elsewhere, or the base has moved)."""
    if checkpoint_dir is not None:
        return check_checkpoint_dir(checkpoint_dir)
    recorded = init_args.get("checkpoint_dir")
    if not isinstance(recorded, str) or not Path(recorded).is_dir():
        raise LitftError(f"{run_dir}: the base model this run was trained from ({recorded}) is not there; pass its "
                         "location with --checkpoint_dir")
    return check_checkpoint_dir(recorded)


def load_torch_file(path: Path, mmap: bool = False) -> Any:
    """A PyTorch `.bin` / `.pt` file through torch's weights-only unpickler: tensors, numbers, strings and plain
    containers. A pickle that asks for anything else (a class to build, a function to call: code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise LitftError(f"{path}: refused: it holds Python objects other than tensors and plain data (a pickle that "
                         "could run code when loaded); litft reads PyTorch files weights-only. Use a safetensors "
                         "version of it, or re-save it with tensors only") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LitftError(f"{path}: cannot read this PyTorch file (truncated or corrupt?): {first}") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LitftError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise LitftError(f"{path}: invalid JSON: {e}") from e
