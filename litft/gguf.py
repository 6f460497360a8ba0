"""GGUF in and out: a litft checkpoint as one `.gguf` file for llama.cpp / Ollama, and a `.gguf` file back into a
litft checkpoint (with its tokenizer) to fine-tune.

The binary format is the `gguf` package's (llama.cpp's own Python library): `GGUFWriter` writes, `GGUFReader`
reads, `gguf.quants` (de)quantizes, and its tensor-name map (`get_tensor_name_map`) turns HF module names into
llama.cpp's (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`). litft goes litft -> HF names (`hf.py`) ->
GGUF names, so there is one name map per family, not two.

Two layout facts llama.cpp expects: for the `llama` architecture its RoPE rotates adjacent pairs (GPT-J style)
where HF rotates the two halves of a head, so the rows of q and k are permuted per head on export (and back on
import); `qwen2` uses the halves layout (NEOX style) and needs no permutation. 1-D tensors (norms, biases) stay F32.

A GGUF from elsewhere is untrusted data: every size is checked against the file and against the other sizes
before anything is written, and a bad file is one `LitftError`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from litft.checkpoint import (CONFIG, WEIGHTS, check_checkpoint_dir, iter_safetensors, save_safetensors,
                              validate_state_dict, LITFT_FORMAT)
from litft.models.config import Config
from litft.models.hf import hf_modules, hf_to_litft, litft_to_hf
from litft.tokenizer import Tokenizer
from litft.utils import LitftError, atomic_path, write_dir_atomically

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# litft family -> llama.cpp architecture. Mistral is `llama` to llama.cpp (its convert script does the same).
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
ARCH_FAMILY = {"llama": "llama", "qwen2": "qwen2"}
# Tensor types the importer dequantizes (through gguf.quants); others are refused by name.
IMPORT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# The pre-tokenizer split regexes llama.cpp knows by name (`tokenizer.ggml.pre`), as the tokenizers' own
# tokenizer.json files spell them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise LitftError('GGUF needs the `gguf` package: pip install "litft[gguf]"') from None
    return gguf


# -- export ------------------------------------------------------------------------------------------------------
def check_exportable(config: Config, source: str) -> str:
    """The llama.cpp architecture of a config, or one error naming what llama.cpp's llama/qwen2 cannot express."""
    if config.family not in FAMILY_ARCH:
        raise LitftError(f"{source}: GGUF export supports the Llama family ({', '.join(FAMILY_ARCH)}: Llama 2/3, "
                         f"Mistral, Qwen2, SmolLM2, TinyLlama), not {config.family!r}; convert it to HF with "
                         "`litft convert_from_litft` and use llama.cpp's convert_hf_to_gguf.py")
    unsupported = [name for name, bad in (("partial rotary", config.rotary_fraction != 1.0),
                                          ("layernorm", config.norm != "rmsnorm"),
                                          ("activation " + config.activation, config.activation != "silu"),
                                          ("mlp " + config.mlp, config.mlp != "gated"),
                                          ("norm_unit_offset", config.norm_unit_offset),
                                          ("scale_embeddings", config.scale_embeddings)) if bad]
    if unsupported:
        raise LitftError(f"{source}: GGUF export cannot express {', '.join(unsupported)} for a {config.family} model")
    return FAMILY_ARCH[config.family]


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split RoPE rows of q/k -> llama.cpp's interleaved pairs, per head (1-D biases too)."""
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rope_rows`."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: Config) -> torch.Tensor:
    """Llama 3.1's per-frequency RoPE divisors (Meta's published formula), which llama.cpp reads from the
    `rope_freqs` tensor instead of metadata."""
    s = config.rope_scaling or {}
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    dim = config.rotary_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def tensor_payload(gguf: Any, t: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(numpy data, raw GGML type or None) for one tensor: 1-D tensors and rows that do not fill whole quant
    blocks stay F32 / F16, as llama.cpp's converter keeps them."""
    q = gguf.GGMLQuantizationType
    x = t.detach().to(torch.float32).cpu().numpy()
    if t.ndim == 1 or gguf_type == "f32":
        return x, None
    if gguf_type == "f16":
        return x.astype(np.float16), None
    if gguf_type == "bf16":
        return gguf.quants.quantize(x, q.BF16), q.BF16
    block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]
    if x.shape[-1] % block:
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, q.Q8_0), q.Q8_0


def export_gguf(checkpoint_dir: Path | str, out_file: Path | str, gguf_type: str = "f16") -> Path:
    """Write a litft checkpoint as one GGUF file (atomically): llama.cpp tensor names, model and tokenizer
    metadata, weights as `gguf_type` (f32, f16, bf16 or q8_0)."""
    gguf = require_gguf()
    if gguf_type not in GGUF_TYPES:
        raise LitftError(f"unknown gguf_type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
    d = check_checkpoint_dir(checkpoint_dir)
    out_file = Path(out_file)
    if out_file.suffix != ".gguf":  # a directory: the file goes inside it
        if out_file.exists() and not out_file.is_dir():
            raise LitftError(f"{out_file} is a file but not a .gguf one: pass a path ending in .gguf or a directory")
        out_file = out_file / f"{d.name}-{gguf_type}.gguf"
    elif out_file.is_dir():
        raise LitftError(f"{out_file} is a directory: pass the .gguf file to write")
    config = Config.from_checkpoint(d)
    arch = check_exportable(config, str(d / CONFIG))
    tokenizer = Tokenizer(d)
    state = dict(iter_safetensors(d / WEIGHTS))
    validate_state_dict(config, {k: v.shape for k, v in state.items()}, d / WEIGHTS)
    hf_state = litft_to_hf(config, state)
    del state

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.n_layer)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    with atomic_path(out_file) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(config.name or d.name)
        w.add_context_length(config.max_seq_length)
        w.add_embedding_length(config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.n_head)
        w.add_head_count_kv(config.n_kv_head)
        if config.head_dim != config.n_embd // config.n_head:
            w.add_key_length(config.head_dim)
            w.add_value_length(config.head_dim)
        w.add_rope_dimension_count(config.rotary_dim)
        w.add_rope_freq_base(config.rope_theta)
        w.add_layer_norm_rms_eps(config.norm_eps)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(ftype)
        if gguf_type == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        kind = (config.rope_scaling or {}).get("rope_type", "default")
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
        elif kind == "llama3":
            w.add_tensor("rope_freqs.weight", llama3_rope_factors(config).numpy())
        add_tokenizer(gguf, w, tokenizer, d, config.vocab_size)

        for hf_name, t in hf_state.items():
            module, suffix = hf_name.rsplit(".", 1)
            name = names.get_name(module)
            if name is None:
                raise LitftError(f"no GGUF name for {hf_name} in llama.cpp's {arch} architecture")
            if arch == "llama" and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
                t = permute_rope_rows(t, config.n_head if module.endswith("q_proj") else config.n_kv_head)
            data, raw = tensor_payload(gguf, t, gguf_type)
            w.add_tensor(f"{name}.{suffix}", data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    print(f"Wrote GGUF {out_file} ({arch}, {gguf_type})")
    return out_file


def add_tokenizer(gguf: Any, w: Any, tokenizer: Tokenizer, d: Path, vocab_size: int) -> None:
    """The tokenizer metadata llama.cpp reads: a sentencepiece model (`llama`: pieces, scores, types) or a
    byte-level BPE (`gpt2`: tokens, merges, types, the pre-tokenizer's name); special ids; the chat template."""
    T = gguf.TokenType
    if (d / "tokenizer.model").is_file():
        tokens, scores, types = spm_vocab(d / "tokenizer.model", tokenizer)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        add_space_prefix = tokenizer._impl.add_prefix_space if tokenizer.backend == "sentencepiece" else True
        w.add_add_space_prefix(bool(add_space_prefix))
    else:
        tokens, types, merges, pre = bpe_vocab(d / "tokenizer.json", tokenizer)
        scores = None
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
    if len(tokens) > vocab_size:
        raise LitftError(f"{d}: the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
    for i in range(len(tokens), vocab_size):  # llama.cpp needs one token per embedding row
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    for add, token_id in ((w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id),
                          (w.add_pad_token_id, tokenizer.pad_id),
                          (w.add_unk_token_id, tokenizer._impl.special_id("unk_token"))):
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(tokenizer.use_bos)
    w.add_add_eos_token(False)
    template = tokenizer._impl.config.get("chat_template")
    if isinstance(template, str) or (isinstance(template, list) and template):
        w.add_chat_template(template)


def spm_vocab(path: Path, tokenizer: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of a sentencepiece model (the proto's type numbers are GGUF's token types), plus
    the added tokens beyond it (chat tokens a fine-tune appended)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(path.read_bytes())
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    impl = tokenizer._impl
    extra = sorted((i, c, s) for c, (i, s, _, _) in getattr(impl, "added", {}).items() if i >= len(tokens))
    for i, content, special in extra:
        if i != len(tokens):
            raise LitftError(f"{path.parent}: added token {content!r} has id {i}, leaving a gap after {len(tokens)}")
        tokens.append(content)
        scores.append(0.0)
        types.append(3 if special else 4)
    return tokens, scores, types


def bpe_vocab(path: Path, tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str], str]:
    """Tokens (by id), types, merges ("a b") and llama.cpp's pre-tokenizer name of a byte-level BPE tokenizer.json."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise LitftError(f"{path}: GGUF export supports byte-level BPE tokenizer.json files and sentencepiece "
                         "tokenizer.model files; this one is neither (put the model's tokenizer.model beside it)")
    tok = tokenizer._impl.tok
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise LitftError(f"{path}: token ids are not contiguous from 0; llama.cpp needs one token per id")
    added = {i: t.special for i, t in tok.get_added_tokens_decoder().items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [(3 if added[i] else 4) if i in added else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, pre_tokenizer_name(data.get("pre_tokenizer"), path)


def pre_tokenizer_name(pre: Any, path: Path) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer: by its split regex, or GPT-2's when ByteLevel splits."""
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [s.get("type") for s in steps]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    for name, regex in PRE_SPLITS.items():
        if splits == [regex]:
            return name
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM / SmolLM2
    raise LitftError(f"{path}: its pre-tokenizer ({kinds}) has no llama.cpp name litft knows (llama-bpe, qwen2, "
                     "gpt-2, smollm), and a wrong one would tokenize differently in llama.cpp")


# -- import ------------------------------------------------------------------------------------------------------
def field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value.item() if isinstance(value, np.generic) else value


def read_gguf(path: Path) -> Any:
    gguf = require_gguf()
    if not path.is_file():
        raise LitftError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / IndexError / struct errors on a short or corrupt file
        raise LitftError(f"{path}: not a readable GGUF file, truncated or corrupt ({' '.join(str(e).split())[:200]})"
                         ) from None


def config_from_gguf(reader: Any, path: Path) -> Config:
    arch = field(reader, "general.architecture")
    if arch not in ARCH_FAMILY:
        raise LitftError(f"{path}: unsupported GGUF architecture {arch!r}; litft imports {', '.join(ARCH_FAMILY)}")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LitftError(f"{path}: no token_embd.weight tensor")
    if "rope_freqs.weight" in tensors:
        raise LitftError(f"{path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) cannot be imported yet")

    def need(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise LitftError(f"{path}: metadata {arch}.{key} is missing")
        return value

    n_layer = int(need("block_count"))
    if n_layer < 1 or not all(f"blk.{i}.attn_norm.weight" in tensors for i in range(min(n_layer, len(tensors)))) \
            or n_layer > len(tensors):
        raise LitftError(f"{path}: block_count {n_layer} does not match the file's tensors")
    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    scaling = None
    if field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    head_dim = field(reader, f"{arch}.attention.key_length")
    try:
        return Config(
            name=str(field(reader, "general.name", path.stem)), family=ARCH_FAMILY[arch],
            vocab_size=int(tensors["token_embd.weight"].shape[-1]), n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            n_kv_head=int(field(reader, f"{arch}.attention.head_count_kv", n_head)),
            head_dim=int(head_dim) if head_dim is not None else None,
            intermediate_size=int(need("feed_forward_length")),
            max_seq_length=int(field(reader, f"{arch}.context_length", 2048)),
            norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
            qkv_bias="blk.0.attn_q.bias" in tensors, o_bias="blk.0.attn_output.bias" in tensors,
            tie_embeddings="output.weight" not in tensors)
    except (ValueError, TypeError) as e:
        raise LitftError(f"{path}: {e}") from None


def gguf_state_dict(reader: Any, config: Config, path: Path, dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 (cast to `dtype` one at a time, so float32 is never held whole), renamed to litft's names (q/k rows un-permuted for `llama`)."""
    gguf = require_gguf()
    arch = FAMILY_ARCH[config.family]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.n_layer)
    to_hf = {}
    for hf_module in hf_modules(config):
        name = names.get_name(hf_module)
        if name is not None:
            to_hf[name] = hf_module
    hf_tensors = []
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        if kind not in IMPORT_TYPES:
            raise LitftError(f"{path}: tensor {t.name} has quantization type {kind}; litft imports "
                             f"{', '.join(IMPORT_TYPES)} (requantize with llama.cpp's llama-quantize)")
        module, _, suffix = t.name.rpartition(".")
        if module not in to_hf:
            raise LitftError(f"{path}: unexpected tensor {t.name} for a {arch} model")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        try:
            x = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            x = x.reshape(shape)
        except Exception as e:
            raise LitftError(f"{path}: tensor {t.name} cannot be read as {kind} {list(shape)} "
                             f"({' '.join(str(e).split())[:200]})") from None
        hf_module = to_hf[module]
        if arch == "llama" and hf_module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.n_head if hf_module.endswith("q_proj") else config.n_kv_head
            if x.shape[0] % (2 * heads):
                raise LitftError(f"{path}: tensor {t.name} has {x.shape[0]} rows, not a multiple of 2 x {heads} heads")
            x = unpermute_rope_rows(x, heads)
        hf_tensors.append((f"{hf_module}.{suffix}", x.to(dtype) if dtype is not None else x.contiguous()))
    state = dict(hf_to_litft(config, hf_tensors))
    validate_state_dict(config, {k: v.shape for k, v in state.items()}, path)
    return state


def tokenizer_files(reader: Any, path: Path) -> dict[str, bytes]:
    """tokenizer.model (sentencepiece, from pieces/scores/types) or tokenizer.json (byte-level BPE, from tokens
    and merges), plus tokenizer_config.json (special tokens, add_bos_token, chat template)."""
    model = field(reader, "tokenizer.ggml.model")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise LitftError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / tokens)")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    types = [int(t) for t in types]
    if len(types) != len(tokens):
        raise LitftError(f"{path}: {len(tokens)} tokens but {len(types)} token types")

    def special(key: str) -> str | None:
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config: dict[str, Any] = {k: special(key) for k, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                                               ("unk_token", "unknown"), ("pad_token", "padding"))}
    config = {k: v for k, v in config.items() if v is not None}
    config["add_bos_token"] = bool(field(reader, "tokenizer.ggml.add_bos_token", model == "llama"))
    template = field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    files: dict[str, bytes] = {}
    if model == "llama":
        files["tokenizer.model"] = spm_model(reader, tokens, types, path)
        config["add_prefix_space"] = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    elif model == "gpt2":
        files["tokenizer.json"] = bpe_tokenizer_json(reader, tokens, types, path).encode()
    else:
        raise LitftError(f"{path}: tokenizer model {model!r} is not supported (litft imports llama and gpt2)")
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files


def spm_model(reader: Any, tokens: list[str], types: list[int], path: Path) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise LitftError(f"{path}: {len(tokens)} tokens but {len(scores)} scores")
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), kind if 1 <= kind <= 6 else 1
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(t == 6 for t in types)
    for attr, key in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        setattr(spec, attr, int(i) if i is not None and 0 <= int(i) < len(tokens) else -1)
    if spec.unk_id < 0:  # sentencepiece requires an unknown piece
        spec.unk_id = next((i for i, t in enumerate(types) if t == 2), 0)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def bpe_tokenizer_json(reader: Any, tokens: list[str], types: list[int], path: Path) -> str:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    merges = field(reader, "tokenizer.ggml.merges") or []
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise LitftError(f"{path}: malformed merge {m!r}")
        pairs.append((parts[0], parts[1]))
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        tok = HFTokenizer(models.BPE(vocab, pairs))
    except Exception as e:  # tokenizers raises a bare Exception on a merge of unknown tokens
        raise LitftError(f"{path}: the tokenizer's merges do not fit its tokens ({' '.join(str(e).split())[:200]})"
                         ) from None
    pre = field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre in PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRE_SPLITS[pre]), "isolated"),
                                                     pre_tokenizers.ByteLevel(False, use_regex=False)])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(False)])
    else:
        if pre not in ("gpt-2", "default"):
            print(f"note: {path}: pre-tokenizer {pre!r} is not known to litft; using GPT-2's split")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=k == 3, normalized=False) for t, k in zip(tokens, types) if k in (3, 4)]
    if added:
        tok.add_tokens(added)
    return tok.to_str()


def import_gguf(gguf_file: Path | str, out_dir: Path | str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Convert a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) into a litft checkpoint with its
    tokenizer; quantized weights are dequantized to float32. Everything is read and checked before the output
    directory appears (atomically)."""
    path = Path(gguf_file)
    reader = read_gguf(path)
    config = config_from_gguf(reader, path)
    files = tokenizer_files(reader, path)
    state = gguf_state_dict(reader, config, path, dtype)
    out = Path(out_dir) if out_dir is not None else path.with_suffix("")
    if out.exists() and not out.is_dir():
        raise LitftError(f"out_dir {out} is a file, not a directory: pass another --out_dir")

    def write(tmp: Path) -> None:
        save_safetensors(state, tmp / WEIGHTS, metadata=LITFT_FORMAT)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        config.save(tmp / CONFIG)

    write_dir_atomically(out, write, replaceable={WEIGHTS, CONFIG, *files})
    Tokenizer(out)  # the tokenizer written loads (else the error names it now, not at the first fine-tune)
    print(f"Converted {path} ({config.family}, {sum(v.numel() for v in state.values()):,} parameters) "
          f"-> litft checkpoint {out}")
    return out
