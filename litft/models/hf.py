"""Hugging Face interop: one weight-name map per family, serving both directions, and config.json.

A map is a list of rules `(hf_module, litft_modules, join)`; `{}` stands for the layer index.
join None: one tensor renamed. "cat": the HF tensor is the litft tensors concatenated on dim 0
(Phi-3's qkv_proj, gate_up_proj). "heads": GPT-NeoX's query_key_value, whose rows are per head
[q_h, k_h, v_h]. Each rule applies to `.weight` and `.bias` alike.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import torch

from litft.models.config import Config
from litft.utils import LitftError


def _llama_like(attn: list | None = None, mlp: list | None = None) -> list[tuple[str, list[str], str | None]]:
    p, q = "model.layers.{}.", "blocks.{}."
    attn = attn or [(p + f"self_attn.{n}_proj", [q + f"attn.{n}_proj"], None) for n in "qkvo"]
    mlp = mlp or [(p + f"mlp.{n}_proj", [q + f"mlp.{n}_proj"], None) for n in ("gate", "up", "down")]
    return [
        ("model.embed_tokens", ["embed"], None),
        (p + "input_layernorm", [q + "attn_norm"], None),
        *attn,
        (p + "post_attention_layernorm", [q + "mlp_norm"], None),
        *mlp,
        ("model.norm", ["norm"], None),
        ("lm_head", ["lm_head"], None),
    ]


_phi3 = _llama_like(
    attn=[
        ("model.layers.{}.self_attn.qkv_proj", [f"blocks.{{}}.attn.{n}_proj" for n in "qkv"], "cat"),
        ("model.layers.{}.self_attn.o_proj", ["blocks.{}.attn.o_proj"], None),
    ],
    mlp=[
        ("model.layers.{}.mlp.gate_up_proj", ["blocks.{}.mlp.gate_proj", "blocks.{}.mlp.up_proj"], "cat"),
        ("model.layers.{}.mlp.down_proj", ["blocks.{}.mlp.down_proj"], None),
    ],
)
_neox = [
    ("gpt_neox.embed_in", ["embed"], None),
    ("gpt_neox.layers.{}.input_layernorm", ["blocks.{}.attn_norm"], None),
    ("gpt_neox.layers.{}.attention.query_key_value", [f"blocks.{{}}.attn.{n}_proj" for n in "qkv"], "heads"),
    ("gpt_neox.layers.{}.attention.dense", ["blocks.{}.attn.o_proj"], None),
    ("gpt_neox.layers.{}.post_attention_layernorm", ["blocks.{}.mlp_norm"], None),
    ("gpt_neox.layers.{}.mlp.dense_h_to_4h", ["blocks.{}.mlp.up_proj"], None),
    ("gpt_neox.layers.{}.mlp.dense_4h_to_h", ["blocks.{}.mlp.down_proj"], None),
    ("gpt_neox.final_layer_norm", ["norm"], None),
    ("embed_out", ["lm_head"], None),
]

# family -> (HF model_type, HF architecture, name map)
FAMILY_HF = {
    "llama": ("llama", "LlamaForCausalLM", _llama_like()),
    "mistral": ("mistral", "MistralForCausalLM", _llama_like()),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", _llama_like()),
    "phi3": ("phi3", "Phi3ForCausalLM", _phi3),
    "gemma": ("gemma", "GemmaForCausalLM", _llama_like()),
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", _neox),
}
MODEL_TYPE_TO_FAMILY = {model_type: family for family, (model_type, _, _) in FAMILY_HF.items()}
# Buffers some HF checkpoints carry that are recomputed, not learned.
_IGNORED_HF = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


def _compile(family: str) -> list[tuple[re.Pattern, str, list[str], str | None]]:
    rules = []
    for hf, lit, join in FAMILY_HF[family][2]:
        pattern = re.compile("^" + re.escape(hf).replace(r"\{\}", r"(\d+)") + r"\.(weight|bias)$")
        rules.append((pattern, hf, lit, join))
    return rules


def _out_dim(config: Config, litft_module: str) -> int:
    leaf = litft_module.rsplit(".", 1)[-1]
    return {
        "q_proj": config.n_head * config.head_dim,
        "k_proj": config.n_kv_head * config.head_dim,
        "v_proj": config.n_kv_head * config.head_dim,
        "gate_proj": config.intermediate_size,
        "up_proj": config.intermediate_size,
    }[leaf]


def fuse_rows(config: Config, join: str | None, parts: list[torch.Tensor]) -> torch.Tensor:
    """The HF tensor of a module from its litft parts (weights, biases, or anything with one row per
    output feature: LoRA B matrices, DoRA magnitudes), laid out as the rule's `join` says."""
    if join is None:
        return parts[0]
    if join == "cat":
        return torch.cat(parts, dim=0)
    # "heads": rows are [n_head, 3 (q,k,v), head_dim]
    rows = [p.reshape(config.n_head, 1, config.head_dim, *p.shape[1:]) for p in parts]
    return torch.cat(rows, dim=1).reshape(-1, *parts[0].shape[1:])


def split_rows(config: Config, join: str | None, litft_modules: list[str], tensor: torch.Tensor,
               name: str = "tensor") -> list[torch.Tensor]:
    """The inverse of `fuse_rows`: the rows of an HF tensor split into the litft modules' parts."""
    if join is None:
        return [tensor]
    sizes = [_out_dim(config, n) for n in litft_modules]
    if sum(sizes) != tensor.shape[0]:
        raise LitftError(f"{name} has {tensor.shape[0]} rows; the config expects {sum(sizes)}")
    if join == "cat":
        return [t.contiguous() for t in torch.split(tensor, sizes, dim=0)]
    per_head = tensor.reshape(config.n_head, len(litft_modules), config.head_dim, *tensor.shape[1:])
    return [per_head[:, i].reshape(config.n_head * config.head_dim, *tensor.shape[1:]).contiguous()
            for i in range(len(litft_modules))]


# Modules transformers >= 5 names differently from the checkpoint tensors it loads (renamed on load). The maps
# above name tensors; PEFT adapters name modules, so they need the names of the transformers that loads them.
_TRANSFORMERS5_MODULES = {"gpt_neox": {"embed_out": "lm_head"}}


def hf_modules(config: Config, transformers5: bool = False) -> dict[str, tuple[list[str], str | None]]:
    """Every HF module of a model with this config -> (the litft modules it holds, in order; its join).
    transformers5: the module names of transformers >= 5 instead of the checkpoint's tensor names."""
    renames = _TRANSFORMERS5_MODULES.get(config.family, {}) if transformers5 else {}
    out = {}
    for _, hf, lit, join in _compile(config.family):
        for layer in range(config.n_layer) if "{}" in hf else [None]:
            hf_name, *lit_names = (t if layer is None else t.format(layer) for t in (renames.get(hf, hf), *lit))
            out[hf_name] = (lit_names, join)
    return out


def hf_to_litft(config: Config, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename (and split fused) HF tensors into litft names, one tensor at a time (streaming)."""
    rules = _compile(config.family)
    for name, tensor in tensors:
        if _IGNORED_HF.search(name):
            continue
        for pattern, _, lit, join in rules:
            m = pattern.match(name)
            if m:
                break
        else:
            raise LitftError(f"unexpected tensor {name!r} for a {config.family} model")
        *idx, suffix = m.groups()
        lit = [t.format(*idx) + "." + suffix for t in lit]
        if config.tie_embeddings and lit[0] == "lm_head.weight":
            continue  # tied: the head is the embedding
        yield from zip(lit, split_rows(config, join, [n.rsplit(".", 1)[0] for n in lit], tensor, f"tensor {name!r}"))


def litft_to_hf(config: Config, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_litft`, driven by the same rules."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for _, hf, lit, join in _compile(config.family):
        for layer in range(config.n_layer) if "{}" in hf else [None]:
            for suffix in ("weight", "bias"):
                names = [(t.format(layer) if layer is not None else t) + "." + suffix for t in lit]
                if not all(n in state_dict for n in names):
                    continue
                used.update(names)
                out[(hf.format(layer) if layer is not None else hf) + "." + suffix] = fuse_rows(
                    config, join, [state_dict[n] for n in names])
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)  # HF re-ties it from the embedding on load
    left = sorted(set(state_dict) - used)
    if left:
        raise LitftError(f"litft tensors with no HF name for family {config.family!r}: {left[:5]}")
    return out


# -- config.json, both dialects -----------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> Config:
    """Read an HF config.json dict, written by transformers 4.x (rope_theta / rope_scaling /
    rotary_pct at top level) or 5.x (rope_parameters)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPE_TO_FAMILY:
        arch = (hf.get("architectures") or ["?"])[0]
        raise LitftError(
            f"{source}: unsupported architecture {arch} (model_type {model_type!r}); "
            f"litft supports model types {sorted(MODEL_TYPE_TO_FAMILY)}"
        )
    family = MODEL_TYPE_TO_FAMILY[model_type]
    rope = dict(hf.get("rope_parameters") or {})
    if "rope_theta" not in rope:  # transformers 4.x dialect
        rope.update(hf.get("rope_scaling") or {})
        rope["rope_theta"] = hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct")))
    if partial is None:
        partial = 0.25 if family == "gpt_neox" else 1.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
        scaling["rope_type"] = kind
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if family == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers does the same: the legacy value means the tanh approximation
    activation = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu"}.get(act)
    if activation is None:
        raise LitftError(f"{source}: unsupported activation {act!r}")
    n_head = hf["num_attention_heads"]
    common = dict(
        family=family,
        name=hf.get("_name_or_path", "") or "",
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or None,
        intermediate_size=hf["intermediate_size"],
        max_seq_length=hf.get("max_position_embeddings", 2048),
        activation=activation,
        rope_theta=float(rope["rope_theta"]),
        rotary_fraction=float(partial),
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", family in ("gemma",))),
    )
    try:
        if family == "gpt_neox":
            bias = hf.get("attention_bias", True)
            return Config(**common, norm="layernorm", norm_bias=True, norm_eps=hf.get("layer_norm_eps", 1e-5),
                          mlp="plain", qkv_bias=bias, o_bias=bias, mlp_bias=True,
                          parallel_residual=hf.get("use_parallel_residual", True))
        sliding = hf.get("sliding_window")
        if family == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        attn_bias = bool(hf.get("attention_bias", False))
        return Config(
            **common,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            norm_unit_offset=family == "gemma",
            scale_embeddings=family == "gemma",
            qkv_bias=attn_bias or family == "qwen2",
            o_bias=attn_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=sliding if family in ("mistral", "qwen2", "phi3") else None,
        )
    except ValueError as e:
        raise LitftError(f"{source}: {e}") from e


def config_to_hf(config: Config, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """An HF config.json dict in the transformers 4.x dialect, which 4.x and 5.x both read."""
    model_type, arch, _ = FAMILY_HF[config.family]
    act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(config.activation, config.activation)
    hf: dict[str, Any] = dict(
        architectures=[arch],
        model_type=model_type,
        vocab_size=config.vocab_size,
        num_hidden_layers=config.n_layer,
        hidden_size=config.n_embd,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_seq_length,
        hidden_act=act,
        rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        tie_word_embeddings=config.tie_embeddings,
    )
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    if config.family == "gpt_neox":
        hf.update(layer_norm_eps=config.norm_eps, use_parallel_residual=config.parallel_residual,
                  rotary_pct=config.rotary_fraction, rotary_emb_base=config.rope_theta,
                  attention_bias=config.qkv_bias)
        return hf
    hf.update(rms_norm_eps=config.norm_eps, attention_bias=config.o_bias, mlp_bias=config.mlp_bias)
    if config.rotary_fraction != 1.0:
        hf["partial_rotary_factor"] = config.rotary_fraction
    if config.family == "gemma":
        hf["hidden_activation"] = act
    if config.family in ("mistral", "qwen2", "phi3"):
        hf["sliding_window"] = config.sliding_window
        if config.family == "qwen2":
            hf["use_sliding_window"] = config.sliding_window is not None
    return hf
