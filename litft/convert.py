"""`litft convert_to_litft`, `litft convert_from_litft` and `litft download`.

Conversion streams tensor by tensor from the source files (safetensors lazily, .bin memory-mapped),
so a 7B model converts while holding one copy of its weights, never two.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from litft.checkpoint import (WEIGHTS, check_checkpoint_dir, iter_safetensors, load_torch_file,
                              read_json, safetensors_header, save_checkpoint, save_safetensors, validate_state_dict)
from litft.models.config import Config
from litft.models.hf import config_from_hf, config_to_hf, hf_to_litft, litft_to_hf
from litft.tokenizer import copy_tokenizer_files
from litft.utils import LitftError, atomic_write_text

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_out_dir(out_dir: Path | str | None) -> Path | None:
    """An output directory that cannot be one (an existing file), named before any work."""
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise LitftError(f"out_dir {out_dir} is a file, not a directory: pass another --out_dir")
    return Path(out_dir) if out_dir is not None else None


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The HF weight files of a directory: sharded (via the index) or single, safetensors preferred."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            files = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [f for f in files if not (hf_dir / f).is_file()]
            if missing:
                raise LitftError(f"{index}: lists shards that are not there: {missing[:3]}")
            return [hf_dir / f for f in files]
    files = sorted(p for p in hf_dir.glob("*.safetensors") if safetensors_header(p)[1].get("litft") is None)
    if files:
        return files
    files = sorted(hf_dir.glob("pytorch_model*.bin")) or sorted(hf_dir.glob("*.bin"))
    if files:
        return files
    raise LitftError(f"{hf_dir}: no weights found (looked for *.safetensors, pytorch_model*.bin and their index "
                     "files)")


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            yield from iter_safetensors(path)
            continue
        state = load_torch_file(path, mmap=True)  # mmap: no second copy in memory
        if not isinstance(state, dict):
            raise LitftError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
        yield from state.items()


def convert_to_litft(hf_dir: Path, out_dir: Path | None = None, dtype: str | None = None) -> Path:
    """Convert a Hugging Face checkpoint directory, or a GGUF file, into a litft checkpoint.

    Args:
        hf_dir: directory with config.json and HF weights (safetensors, sharded or not, or .bin); or a
            `.gguf` file (llama / qwen2 architecture; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K
            tensors, dequantized) with its tokenizer.
        out_dir: where to write the litft checkpoint; default: in place, into hf_dir (an HF
            `model.safetensors` there is replaced by the litft one, after the conversion succeeded); for a
            GGUF file, the file's path without `.gguf`.
        dtype: cast the weights (float32, float16, bfloat16); default: keep the checkpoint's (GGUF: float32).
    """
    hf_dir = Path(hf_dir)
    if dtype is not None and dtype not in DTYPES:
        raise LitftError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if hf_dir.suffix == ".gguf":
        from litft.gguf import import_gguf

        check_out_dir(out_dir)
        return import_gguf(hf_dir, out_dir, dtype=DTYPES[dtype] if dtype else None)
    if not hf_dir.is_dir():
        raise LitftError(f"{hf_dir}: directory not found")
    check_out_dir(out_dir)
    config = config_from_hf(read_json(hf_dir / "config.json"), source=str(hf_dir / "config.json"))
    if not config.name:
        config.name = hf_dir.name
    files = hf_weight_files(hf_dir)
    cast = DTYPES[dtype] if dtype else None
    state_dict = {}
    for name, tensor in hf_to_litft(config, iter_hf_tensors(files)):
        state_dict[name] = tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor
    validate_state_dict(config, {k: v.shape for k, v in state_dict.items()}, files[0].parent)
    out = save_checkpoint(state_dict, config, out_dir or hf_dir, tokenizer_dir=hf_dir)
    print(f"Converted {hf_dir} ({config.family}, {sum(v.numel() for v in state_dict.values()):,} parameters) "
          f"-> litft checkpoint {out}")
    return out


def convert_from_litft(checkpoint_dir: Path, out_dir: Path, format: str = "hf", gguf_type: str = "f16") -> Path:
    """Convert a litft checkpoint into a Hugging Face directory, or into one GGUF file for llama.cpp / Ollama.

    The HF directory (config.json + model.safetensors + tokenizer files) loads with
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`; GGUF covers Llama-family models (Llama 2/3,
    Mistral, Qwen2, SmolLM2, TinyLlama).

    Args:
        checkpoint_dir: a litft checkpoint (model.safetensors + model_config.yaml).
        out_dir: the HF directory to write; with --format gguf, the .gguf file (a path not ending in .gguf is
            a directory that gets `<checkpoint name>-<gguf_type>.gguf`).
        format: hf (a transformers checkpoint directory) or gguf (one file, needs `pip install "litft[gguf]"`).
        gguf_type: the GGUF weight type: f32, f16, bf16 or q8_0 (norms stay f32).
    """
    if format not in ("hf", "gguf"):
        raise LitftError(f"unknown format {format!r}: use hf or gguf")
    if format == "gguf":
        from litft.gguf import export_gguf

        return export_gguf(checkpoint_dir, out_dir, gguf_type)
    d = check_checkpoint_dir(checkpoint_dir)
    out_dir = check_out_dir(out_dir)
    config = Config.from_checkpoint(d)
    state_dict = dict(iter_safetensors(d / WEIGHTS))
    validate_state_dict(config, {k: v.shape for k, v in state_dict.items()}, d / WEIGHTS)
    hf_state = litft_to_hf(config, state_dict)
    del state_dict
    dtype = next(iter(hf_state.values())).dtype
    save_safetensors(hf_state, out_dir / "model.safetensors", metadata={"format": "pt"})
    copy_tokenizer_files(d, out_dir)
    hf_config = config_to_hf(config, dtype)
    # Special token ids: from the generation config when there is one; else null, never a family
    # default that may lie outside this vocabulary (Phi-3's default pad id is 32000).
    gen = read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf_config[key] = gen.get(key)
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    print(f"Wrote HF checkpoint {out_dir} ({config.family})")
    return out_dir


HUB_PATTERNS = ["*.json", "tokenizer.model", "*.safetensors", "chat_template.jinja"]  # the template stays with the model


def download(repo_id: str, checkpoint_dir: Path = Path("checkpoints"), access_token: str | None = None,
             dtype: str | None = None) -> Path:
    """Fetch a Hugging Face model repo (safetensors + tokenizer files) and convert it to litft.

    Args:
        repo_id: a hub repo such as "HuggingFaceTB/SmolLM2-135M" (or a local directory laid out like one).
        checkpoint_dir: the parent folder; the checkpoint lands in checkpoint_dir/repo_id.
        access_token: hub token for gated models (default: the HF_TOKEN environment variable).
        dtype: cast the weights while converting (float32, float16, bfloat16).
    """
    if dtype is not None and dtype not in DTYPES:
        raise LitftError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out = Path(checkpoint_dir) / (Path(repo_id).name if Path(repo_id).is_dir() else repo_id)
    if Path(repo_id).is_dir():  # a local snapshot: copy only what a hub download would bring
        out.mkdir(parents=True, exist_ok=True)
        for pattern in HUB_PATTERNS + ["*.bin"]:
            for f in Path(repo_id).glob(pattern):
                shutil.copy2(f, out / f.name)
    else:
        from huggingface_hub import HfApi, snapshot_download

        try:  # model_info fails at once offline; list_repo_files retries 5 times (~25 s) first
            files = [s.rfilename for s in HfApi(token=access_token).model_info(repo_id).siblings or []]
        except Exception as e:
            raise LitftError(hub_error_line(repo_id, e)) from None
        patterns = HUB_PATTERNS if any(f.endswith(".safetensors") for f in files) else HUB_PATTERNS + ["*.bin"]
        try:
            snapshot_download(repo_id, local_dir=out, allow_patterns=patterns, token=access_token)
        except Exception as e:
            raise LitftError(f"{hub_error_line(repo_id, e)} (what arrived stays in {out}: the next run resumes)") \
                from None
    return convert_to_litft(out, dtype=dtype)


def hub_error_line(repo_id: str, error: Exception) -> str:
    """huggingface_hub's errors (and its HTTP library's) as one line naming the cause and the fix; anything
    else is re-raised: it is a bug, not a user error."""
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(error, HFValidationError):
        return (f"{repo_id!r} is neither a local directory nor a Hugging Face repo id: use owner/name (e.g. "
                "HuggingFaceTB/SmolLM2-135M) or the path of a downloaded model directory")
    if isinstance(error, GatedRepoError):
        return (f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then pass --access_token "
                "(or set HF_TOKEN)")
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return (f"no model repository {repo_id!r} on the Hugging Face Hub (or it is private): check the id (e.g. "
                "HuggingFaceTB/SmolLM2-135M), or pass --access_token (or set HF_TOKEN) for a private one")
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it, or pass a local model directory"
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub refused {repo_id}: {' '.join(str(error).split())[:300]}"
    network = ("NetworkError", "TimeoutException", "ConnectionError", "Timeout", "ProtocolError")
    if isinstance(error, OSError) or any(c.__name__ in network for c in type(error).__mro__):
        return (f"cannot reach the Hugging Face Hub to download {repo_id} ({' '.join(str(error).split())[:200]}): "
                "check the network (or HF_ENDPOINT), or download the model elsewhere and pass its directory")
    raise error
