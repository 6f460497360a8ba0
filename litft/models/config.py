"""The model config: one dataclass, and named configs as plain data.

A new family is a set of field values here plus a weight-name map in `hf.py`; the model code in
`gpt.py` reads only these fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
import types
import typing
from typing import Any, Literal

import yaml

from litft.utils import LitftError, atomic_write_text

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt_neox")


@dataclass
class Config:
    name: str = ""
    family: str = "llama"  # selects the HF name map and config.json dialect (see hf.py)
    hf_repo: str = ""  # where `litft download` fetches it from, for named configs
    vocab_size: int = 32000
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (MHA); fewer: GQA / MQA
    head_dim: int | None = None  # None: n_embd // n_head (Gemma sets it explicitly)
    intermediate_size: int = 688
    max_seq_length: int = 2048  # HF max_position_embeddings
    # normalisation
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    # MLP
    mlp: Literal["gated", "plain"] = "gated"  # gated: down(act(gate(x)) * up(x)); plain: down(act(up(x)))
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    # biases
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm bias (GPT-NeoX)
    # block shape
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    # positions
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # partial rotary: only the first fraction of head_dim rotates
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    sliding_window: int | None = None
    # embeddings / head
    tie_embeddings: bool = False
    scale_embeddings: bool = False  # Gemma: embeddings * sqrt(n_embd)

    def __post_init__(self) -> None:
        for size in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "intermediate_size",
                     "max_seq_length"):
            value = getattr(self, size)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Config {self.name!r}: {size} must be an integer >= 1, got {value!r}")
        if self.family not in FAMILIES:
            import difflib

            close = difflib.get_close_matches(str(self.family), FAMILIES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Config {self.name!r}: unknown family {self.family!r}.{hint} Expected one of {FAMILIES}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"Config {self.name!r}: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"Config {self.name!r}: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(
                    f"Config {self.name!r}: rope scaling type {kind!r} is not supported "
                    "(supported: default, linear, llama3)"
                )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    # -- named configs and yaml -------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in name_to_config:
            import difflib

            close = difflib.get_close_matches(name, list(name_to_config), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"No named config {name!r}.{hint} Known: {', '.join(sorted(name_to_config))}")
        return cls(**{**name_to_config[name], **overrides})

    @classmethod
    def from_file(cls, path: Path | str) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no model config file (a litft checkpoint holds model_config.yaml)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a valid YAML file ({' '.join(str(e).split())}); re-create it, e.g. "
                              "by converting the model again with `litft convert_to_litft`") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key not in hints:
                import difflib

                close = difflib.get_close_matches(str(key), list(hints), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{path}: unknown model config key {key!r}.{hint} Valid keys: {', '.join(hints)}")
            if not _has_type(value, hints[key]):
                raise ConfigError(f"{path}: {key} must be {_type_name(hints[key])}, got {value!r}")
        try:
            return cls(**data)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path | str) -> "Config":
        return cls.from_file(Path(checkpoint_dir) / "model_config.yaml")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path | str) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


class ConfigError(LitftError, ValueError):
    """A model_config.yaml that litft cannot use (a ValueError, and a LitftError: the CLI prints one line)."""


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a Config field's type (ints count as floats; bools never as numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint in (bool, str) or origin is dict:
        return isinstance(value, origin or hint)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return str(hint).replace("typing.", "").replace("NoneType", "null").replace("<class '", "").replace("'>", "")


# Named configs: the real checkpoints litft knows how to download and convert. Each row is plain data.
_llama2 = dict(family="llama", vocab_size=32000, norm_eps=1e-5, max_seq_length=4096)
configs: list[dict[str, Any]] = [
    # Llama 2
    dict(name="Llama-2-7b-hf", hf_repo="meta-llama/Llama-2-7b-hf", n_layer=32, n_embd=4096, n_head=32,
         intermediate_size=11008, **_llama2),
    dict(name="Llama-2-13b-hf", hf_repo="meta-llama/Llama-2-13b-hf", n_layer=40, n_embd=5120, n_head=40,
         intermediate_size=13824, **_llama2),
    # Llama 3.x
    dict(name="Llama-3.1-8B", hf_repo="meta-llama/Llama-3.1-8B", family="llama", vocab_size=128256, n_layer=32,
         n_embd=4096, n_head=32, n_kv_head=8, intermediate_size=14336, max_seq_length=131072, rope_theta=500000.0,
         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)),
    dict(name="Llama-3.2-1B", hf_repo="meta-llama/Llama-3.2-1B", family="llama", vocab_size=128256, n_layer=16,
         n_embd=2048, n_head=32, n_kv_head=8, intermediate_size=8192, max_seq_length=131072, rope_theta=500000.0,
         tie_embeddings=True,
         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)),
    # Mistral
    dict(name="Mistral-7B-v0.1", hf_repo="mistralai/Mistral-7B-v0.1", family="mistral", vocab_size=32000,
         n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, intermediate_size=14336, max_seq_length=32768,
         sliding_window=4096),
    # Qwen2 / 2.5
    dict(name="Qwen2.5-0.5B", hf_repo="Qwen/Qwen2.5-0.5B", family="qwen2", vocab_size=151936, n_layer=24, n_embd=896,
         n_head=14, n_kv_head=2, intermediate_size=4864, max_seq_length=32768, rope_theta=1000000.0, norm_eps=1e-6,
         qkv_bias=True, tie_embeddings=True),
    # SmolLM2 / TinyLlama: Llama shape
    dict(name="SmolLM2-135M", hf_repo="HuggingFaceTB/SmolLM2-135M", family="llama", vocab_size=49152, n_layer=30,
         n_embd=576, n_head=9, n_kv_head=3, intermediate_size=1536, max_seq_length=8192, rope_theta=100000.0,
         tie_embeddings=True),
    dict(name="SmolLM2-360M", hf_repo="HuggingFaceTB/SmolLM2-360M", family="llama", vocab_size=49152, n_layer=32,
         n_embd=960, n_head=15, n_kv_head=5, intermediate_size=2560, max_seq_length=8192, rope_theta=100000.0,
         tie_embeddings=True),
    dict(name="TinyLlama-1.1B", hf_repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", family="llama",
         vocab_size=32000, n_layer=22, n_embd=2048, n_head=32, n_kv_head=4, intermediate_size=5632,
         max_seq_length=2048),
    # Phi-3
    dict(name="Phi-3-mini-4k-instruct", hf_repo="microsoft/Phi-3-mini-4k-instruct", family="phi3", vocab_size=32064,
         n_layer=32, n_embd=3072, n_head=32, intermediate_size=8192, max_seq_length=4096),
    # Gemma
    dict(name="gemma-2b", hf_repo="google/gemma-2b", family="gemma", vocab_size=256000, n_layer=18, n_embd=2048,
         n_head=8, n_kv_head=1, head_dim=256, intermediate_size=16384, max_seq_length=8192, norm_eps=1e-6,
         norm_unit_offset=True, activation="gelu_tanh", tie_embeddings=True, scale_embeddings=True),
    # GPT-NeoX / Pythia
    dict(name="pythia-160m", hf_repo="EleutherAI/pythia-160m", family="gpt_neox", vocab_size=50304, n_layer=12,
         n_embd=768, n_head=12, intermediate_size=3072, max_seq_length=2048, norm="layernorm", norm_bias=True,
         mlp="plain", activation="gelu", qkv_bias=True, o_bias=True, mlp_bias=True, parallel_residual=True,
         rotary_fraction=0.25),
    # litft's own small base model for the demo (see litft/demo/); vocab 1024 makes every demo word one token
    dict(name="litft-demo", family="llama", vocab_size=1024, n_layer=4, n_embd=192, n_head=6, n_kv_head=2,
         intermediate_size=512, max_seq_length=256, tie_embeddings=True),
]
name_to_config: dict[str, dict[str, Any]] = {c["name"]: c for c in configs}
