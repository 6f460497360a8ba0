"""PEFT adapter files in and out: `litft export_peft` and `litft import_peft`.

A PEFT LoRA directory is `adapter_config.json` + `adapter_model.safetensors`, with tensors named after the HF
model's modules (`base_model.model.<hf module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`).
Module names come from the family's HF name map (models/hf.py), read in both directions.

Fused HF modules (Phi-3 qkv_proj / gate_up_proj, GPT-NeoX query_key_value) hold several litft modules. Their
LoRA update is the rank sum of the parts':

    A = [A_q; A_k; A_v]  (rows stacked, r' = r_q + r_k + r_v)      B = blockdiag(B_q, B_k, B_v)

with B's rows in HF's fused layout (`fuse_rows`, as for the weights), so B·A gives each part its own B_i·A_i and
a part litft did not adapt gets zero rows. peft scales a module by alpha'/r' (alpha'/sqrt(r') with rsLoRA):
`rank_pattern` / `alpha_pattern` carry r' and an alpha' that keeps litft's scaling. A DoRA magnitude of a fused
module is its parts' magnitudes in HF row order; an unadapted part gets its base row norms (scale m/||W|| = 1).

Module names are those of the installed transformers when exporting (5.x calls GPT-NeoX's `embed_out` `lm_head`;
without transformers, 5.x's); import accepts either.

Import is the reverse: B's rows are split per part (`split_rows`) and every part keeps the whole A (rank r'). A
litft run has one r and alpha for all modules, so modules of smaller rank are zero-padded to the largest and a
module whose scaling differs has the ratio folded into B: the same update, written in litft's form.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from litft.adapters.adapter_dir import (FIX_BASE, AdapterWeights, base_weight_reader, check_fits, check_module_fits,
                                        read_adapter_dir, write_adapter_dir)
from litft.adapters.inject import TARGET_ALIASES
from litft.adapters.lora import lora_scaling
from litft.adapters.vera import vera_to_peft
from litft.checkpoint import (check_checkpoint_dir, iter_safetensors, linear_shapes, load_torch_file, read_json,
                              read_method_config, run_base_dir, save_safetensors)
from litft.models.config import Config
from litft.models.hf import fuse_rows, hf_modules, split_rows
from litft.utils import LitftError, atomic_write_text, write_dir_atomically

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's name for the wrapped HF model
PEFT_SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude",
                 "lora_magnitude_vector.weight": "lora_magnitude"}  # the last: older peft versions
# adapter_config.json keys litft reads, or that only describe where the adapter came from. Any other key must be
# unset (null / false / empty): each one turns on a peft feature (lora_bias, modules_to_save, QALoRA, ...) that a
# litft LoRA/DoRA layer does not compute, so importing it would silently change the model.
_UNDERSTOOD = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
               "alpha_pattern", "bias", "fan_in_fan_out", "init_lora_weights", "target_modules", "exclude_modules",
               "layers_to_transform", "layers_pattern", "task_type", "inference_mode", "base_model_name_or_path",
               "revision", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "eva_config",
               "ensure_weight_tying"}
_PLAIN_INITS = (True, False, "gaussian", "eva")  # the others (pissa, olora, corda, loftq) rewrite the base weights


# ------------------------------------------------------------------------------------ litft -> peft
def litft_to_peft(adapter: AdapterWeights, config: Config,
                  base_weight: Callable[[str], Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json dict, tensors) of the PEFT adapter equal to `adapter` on this base model.
    `base_weight(module)` is only called for DoRA parts of a fused module that the adapter leaves alone."""
    shapes = linear_shapes(config)
    adapted, t = set(adapter.modules()), adapter.tensors
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for hf_name, (parts, join) in hf_modules(config, _transformers5()).items():
        if not adapted.intersection(parts):
            continue
        A = torch.cat([t[f"{p}.lora_A"] for p in parts if p in adapted])
        R, col, B_parts, magnitudes = A.shape[0], 0, [], []
        for p in parts:
            if p in adapted:
                B = t[f"{p}.lora_B"]
                B_parts.append(F.pad(B, (col, R - col - B.shape[1])))  # its block of the block diagonal
                col += B.shape[1]
            else:
                B_parts.append(A.new_zeros(shapes[p][0], R))
            if adapter.dora:
                magnitudes.append(t[f"{p}.lora_magnitude"] if p in adapted
                                  else base_weight(p).float().norm(dim=1).to(A.dtype))
        key = PREFIX + hf_name
        tensors[f"{key}.lora_A.weight"] = A
        tensors[f"{key}.lora_B.weight"] = fuse_rows(config, join, B_parts)
        if adapter.dora:
            tensors[f"{key}.lora_magnitude_vector"] = fuse_rows(config, join, magnitudes)
        ranks[hf_name] = R

    r, alpha = adapter.r, adapter.alpha
    # alpha' with alpha'/r' == alpha/r (rsLoRA: alpha'/sqrt(r') == alpha/sqrt(r))
    alpha_for = (lambda R: alpha * math.sqrt(R / r)) if adapter.use_rslora else (lambda R: alpha * R / r)
    rank_pattern, alpha_pattern = {}, {}
    for hf_name, R in ranks.items():
        if R != r:
            key = _pattern_key(hf_name, ranks)
            rank_pattern[key], alpha_pattern[key] = R, alpha_for(R)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config.hf_repo or None,
        "r": r, "lora_alpha": alpha, "lora_dropout": adapter.dropout, "use_rslora": adapter.use_rslora,
        "use_dora": adapter.dora, "target_modules": _target_modules(list(ranks), config),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    return peft_config, tensors


def _transformers5() -> bool:
    """Whether the installed transformers (the one that will load the export, usually) is 5.x or newer."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    try:
        return Version(version("transformers")).major >= 5
    except (PackageNotFoundError, InvalidVersion):
        return True


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _pattern_key(hf_name: str, ranks: dict[str, int]) -> str:
    """The leaf name (qkv_proj) when every module of that leaf has this rank, else the full module name.
    peft matches a key as the regex `(.*\\.)?(key)$`; a full name's dots then match only itself."""
    same_leaf = {R for name, R in ranks.items() if _leaf(name) == _leaf(hf_name)}
    return _leaf(hf_name) if len(same_leaf) == 1 else hf_name


def _target_modules(adapted: list[str], config: Config) -> list[str]:
    """Leaf names when they select exactly the adapted modules (the usual case), else full names."""
    leaves = sorted({_leaf(n) for n in adapted})
    selected = {n for n in hf_modules(config, _transformers5()) if _leaf(n) in leaves}
    return leaves if selected == set(adapted) else sorted(adapted)


def export_peft(adapter_dir: Path, out_dir: Path, checkpoint_dir: Path | None = None) -> Path:
    """Write a litft adapter run as a PEFT adapter (adapter_config.json + adapter_model.safetensors).

    `peft.PeftModel.from_pretrained(hf_model, out_dir)` loads it onto the HF model that `litft convert_from_litft`
    makes of the base model.

    Args:
        adapter_dir: the `final/` (or `step-N/`) directory of a LoRA-family run (lora, qlora, dora, lora_plus, neft;
            pissa as the equal rank-2r LoRA against the original base; vera as a peft VeRA adapter).
        out_dir: the PEFT adapter directory to write.
        checkpoint_dir: the litft base model; default: the one the run was trained from.
    """
    if "projection_seed" in read_method_config(adapter_dir)["init_args"]:
        return _export_vera(Path(adapter_dir), Path(out_dir), checkpoint_dir)
    adapter, method_config = read_adapter_dir(adapter_dir)
    base = run_base_dir(adapter_dir, method_config["init_args"], checkpoint_dir)
    config = Config.from_checkpoint(base)
    check_fits(adapter, config, str(adapter_dir))
    peft_config, tensors = litft_to_peft(adapter, config, base_weight_reader(base))
    # the hub id where litft knows it (download), else the base's path: what AutoPeftModel would load
    peft_config["base_model_name_or_path"] = config.hf_repo or str(base.resolve())

    def write(d: Path) -> None:
        save_safetensors(tensors, d / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        atomic_write_text(d / ADAPTER_CONFIG, json.dumps(peft_config, indent=2) + "\n")

    write_dir_atomically(Path(out_dir), write, {ADAPTER_CONFIG, ADAPTER_WEIGHTS})
    quantize = method_config["init_args"].get("quantize")
    note = (f"; trained on a {quantize} base: load it onto the full-precision HF model of {base}" if quantize else "")
    print(f"Exported {adapter_dir} ({'DoRA' if adapter.dora else 'LoRA'}, {len(tensors)} tensors) -> PEFT adapter "
          f"{out_dir}{note} (HF base: `litft convert_from_litft {base} HF_DIR`)")
    return Path(out_dir)


def _export_vera(adapter_dir: Path, out_dir: Path, checkpoint_dir: Path | None) -> Path:
    """A litft VeRA run as a peft VeRA adapter (`adapters/vera.py`: `vera_to_peft`)."""
    args = read_method_config(adapter_dir)["init_args"]
    base = run_base_dir(adapter_dir, args, checkpoint_dir)
    config = Config.from_checkpoint(base)
    path = adapter_dir / "adapter.safetensors"
    if not path.is_file():
        raise LitftError(f"{adapter_dir}: adapter.safetensors is missing (was the run interrupted before it finished?)")
    try:
        peft_config, tensors = vera_to_peft(dict(iter_safetensors(path)), int(args["r"]), int(args["projection_seed"]),
                                            float(args.get("d_initial", 0.1)), float(args.get("dropout", 0.0)),
                                            hf_modules(config, _transformers5()), linear_shapes(config), str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise LitftError(f"{adapter_dir}: cannot export this VeRA run: {e}") from None
    peft_config["base_model_name_or_path"] = config.hf_repo or str(base.resolve())

    def write(d: Path) -> None:
        save_safetensors(tensors, d / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        atomic_write_text(d / ADAPTER_CONFIG, json.dumps(peft_config, indent=2) + "\n")

    write_dir_atomically(out_dir, write, {ADAPTER_CONFIG, ADAPTER_WEIGHTS})
    print(f"Exported {adapter_dir} (VeRA, {len(tensors)} tensors) -> PEFT adapter {out_dir} (HF base: "
          f"`litft convert_from_litft {base} HF_DIR`)")
    return out_dir


# ------------------------------------------------------------------------------------ peft -> litft
def read_peft_dir(peft_dir: Path | str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """adapter_config.json and the adapter tensors of a PEFT adapter directory, checked to be a plain
    LoRA / rsLoRA / DoRA adapter that litft computes exactly."""
    peft_dir = Path(peft_dir)
    if not peft_dir.is_dir():
        raise LitftError(f"{peft_dir}: PEFT adapter directory not found")
    cfg_path = peft_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise LitftError(f"{peft_dir}: no {ADAPTER_CONFIG}; expected a PEFT adapter directory (what "
                         "`PeftModel.save_pretrained` writes)")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise LitftError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported; litft imports LoRA "
                         "adapters (plain, rsLoRA or DoRA) only")
    unsupported = {k: v for k, v in cfg.items() if k not in _UNDERSTOOD and v not in (None, False, {}, [], "", 0)}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if cfg.get("fan_in_fan_out", False):
        unsupported["fan_in_fan_out"] = True
    if cfg.get("init_lora_weights", True) not in _PLAIN_INITS:
        unsupported["init_lora_weights"] = cfg["init_lora_weights"]
    if unsupported:
        raise LitftError(f"{cfg_path}: peft options litft does not support: {unsupported}. litft imports plain "
                         "LoRA / rsLoRA / DoRA adapters (bias none, nothing in modules_to_save); merge this one with "
                         "peft (merge_and_unload) and convert the merged model with `litft convert_to_litft`")
    weights = peft_dir / ADAPTER_WEIGHTS
    if weights.is_file():
        tensors = dict(iter_safetensors(weights))
    elif (peft_dir / "adapter_model.bin").is_file():
        tensors = load_torch_file(peft_dir / "adapter_model.bin")
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise LitftError(f"{peft_dir}/adapter_model.bin: expected a mapping of names to tensors")
    else:
        raise LitftError(f"{peft_dir}: {ADAPTER_WEIGHTS} is missing")
    return cfg, tensors


def _pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key k with `(.*\\.)?(k)$` matching the module."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_to_litft(peft_config: dict[str, Any], tensors: dict[str, Tensor], config: Config,
                  base_weight: Callable[[str], Tensor], source: str = "adapter") -> AdapterWeights:
    """The litft adapter equal to a PEFT LoRA/DoRA adapter on this base model (see the module docstring).
    `base_weight(module)` gives fresh DoRA magnitudes to modules the adapter skips in some layers."""
    modules = {**hf_modules(config), **hf_modules(config, transformers5=True)}  # either naming
    shapes = linear_shapes(config)
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in PEFT_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None and _is_base_copy(key, tensor, modules, base_weight, source):
            continue
        if not key.startswith(PREFIX) or suffix is None:
            raise LitftError(f"{source}: unsupported tensor {key!r}: litft imports LoRA/DoRA adapters on Linear "
                             "layers (lora_A, lora_B, lora_magnitude_vector); embedding adapters, trainable biases "
                             "and modules_to_save are not supported")
        grouped.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[PEFT_SUFFIXES[suffix]] = tensor
    if not grouped:
        raise LitftError(f"{source}: the adapter holds no LoRA tensors")
    use_dora, rs = bool(peft_config.get("use_dora")), bool(peft_config.get("use_rslora"))

    entries: dict[str, tuple[Tensor, Tensor, float, float, Tensor | None]] = {}  # module -> A, B, alpha, scaling, m
    for hf_name, t in grouped.items():
        if hf_name not in modules:
            raise LitftError(f"{source}: the adapter adapts {hf_name}, which this {config.family} model "
                             f"({config.n_layer} layers) does not have; {FIX_BASE}")
        parts, join = modules[hf_name]
        if not all(_leaf(p) in TARGET_ALIASES.values() for p in parts):
            raise LitftError(f"{source}: the adapter adapts {hf_name}, which is not a Linear layer; litft adapts "
                             "q, k, v, o, gate, up, down and lm_head only")
        A, B, m = t.get("lora_A"), t.get("lora_B"), t.get("lora_magnitude")
        if A is None or B is None or (m is None) == use_dora:
            raise LitftError(f"{source}: {hf_name} has tensors {sorted(t)}; a {'DoRA' if use_dora else 'LoRA'} "
                             "adapter needs lora_A, lora_B" + (" and lora_magnitude_vector" if use_dora else ""))
        check_module_fits(hf_name, sum(shapes[p][0] for p in parts), shapes[parts[0]][1], A, B, m, source)
        default_alpha = peft_config.get("lora_alpha", 8)  # 8: peft's default
        alpha = float(_pattern_value(peft_config.get("alpha_pattern"), hf_name, default_alpha))
        scaling = lora_scaling(A.shape[0], alpha, rs)
        B_parts = split_rows(config, join, parts, B, f"{hf_name}.lora_B")
        m_parts = (split_rows(config, join, parts, m, f"{hf_name}.lora_magnitude_vector") if use_dora
                   else [None] * len(parts))
        for p, Bp, mp in zip(parts, B_parts, m_parts):
            entries[p] = (A, Bp, alpha, scaling, mp)

    # One r and alpha for all: the largest rank, and the alpha of the most common scaling among modules of that rank.
    r = max(A.shape[0] for A, *_ in entries.values())
    alpha, scaling = Counter((a, s) for A, _, a, s, _ in entries.values() if A.shape[0] == r).most_common(1)[0][0]
    out_tensors: dict[str, Tensor] = {}
    for p, (A, B, _, s, m) in entries.items():
        if s != scaling:  # fold this module's own scaling into B
            B = (B.float() * (s / scaling)).to(B.dtype)
        out_tensors[f"{p}.lora_A"] = F.pad(A, (0, 0, 0, r - A.shape[0]))  # zero rows / columns: same B·A
        out_tensors[f"{p}.lora_B"] = F.pad(B, (0, r - B.shape[1]))
        if m is not None:
            out_tensors[f"{p}.lora_magnitude"] = m.clone()
    adapter = AdapterWeights(r=r, alpha=alpha, tensors=out_tensors, use_rslora=rs,
                             dropout=float(peft_config.get("lora_dropout") or 0.0))
    _fill_missing_layers(adapter, shapes, base_weight)
    return adapter


def _is_base_copy(key: str, tensor: Tensor, modules: dict[str, tuple[list[str], str | None]],
                  base_weight: Callable[[str], Tensor], source: str) -> bool:
    """peft saves the embedding / lm_head weights next to an adapter that targets them (save_embedding_layers).
    A copy of the base model's own weight (possibly in another dtype) carries nothing to import; anything else
    (a resized vocabulary, ...) is a change of the base that a litft adapter cannot hold: an error."""
    module = key.removeprefix(PREFIX).removesuffix(".weight").removesuffix(".base_layer")
    parts = modules.get(module, ([], None))[0]
    if not (key.startswith(PREFIX) and key.endswith(".weight") and len(parts) == 1):
        return False
    base = base_weight(parts[0])
    # compared in the lower of the two precisions: a copy cast to another dtype matches there bit for bit
    low = min(tensor.dtype, base.dtype, key=lambda d: torch.finfo(d).bits)
    if tensor.shape != base.shape or not torch.equal(tensor.to(low), base.to(low)):
        raise LitftError(f"{source}: the adapter carries its own weights for {module} ({key}, shape "
                         f"{tuple(tensor.shape)}), "
                         f"not the base model's (shape {tuple(base.shape)}): a resized vocabulary or a fully trained "
                         "module, which a litft adapter cannot hold; merge it with peft (merge_and_unload) and "
                         "convert the merged model with `litft convert_to_litft`")
    return True


def _fill_missing_layers(adapter: AdapterWeights, shapes: dict[str, tuple[int, int]],
                         base_weight: Callable[[str], Tensor]) -> None:
    """litft adapts a target in every layer; a layer the PEFT adapter skips (layers_to_transform) gets a fresh
    adapter, which computes nothing yet (B = 0; DoRA: m = ||W||) and trains like any other."""
    targets, present = set(adapter.targets()), set(adapter.modules())
    dtype = next(iter(adapter.tensors.values())).dtype
    g = torch.Generator().manual_seed(0)
    for module, (out, in_) in shapes.items():
        if _leaf(module) in targets and module not in present:
            A = torch.empty(adapter.r, in_)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)  # LoRALinear's init of A
            adapter.tensors[f"{module}.lora_A"] = A.to(dtype)
            adapter.tensors[f"{module}.lora_B"] = torch.zeros(out, adapter.r, dtype=dtype)
            if adapter.dora:
                adapter.tensors[f"{module}.lora_magnitude"] = base_weight(module).float().norm(dim=1).to(dtype)


def import_peft(peft_dir: Path, *, checkpoint_dir: Path, out_dir: Path | None = None) -> Path:
    """Turn a PEFT LoRA / rsLoRA / DoRA adapter into a litft adapter run directory (like a run's `final/`).

    `litft merge_lora`, `litft generate --adapter_dir`, `export_peft` and `load_method` (to train further) read it.

    Args:
        peft_dir: the PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        checkpoint_dir: the litft base model (`litft convert_to_litft` of the HF model the adapter was trained on).
        out_dir: where to write the litft adapter; default: peft_dir/litft.
    """
    peft_config, tensors = read_peft_dir(peft_dir)
    config = Config.from_checkpoint(check_checkpoint_dir(checkpoint_dir))
    adapter = peft_to_litft(peft_config, tensors, config, base_weight_reader(checkpoint_dir), str(peft_dir))
    out = write_adapter_dir(adapter, Path(out_dir) if out_dir else Path(peft_dir) / "litft", checkpoint_dir)
    print(f"Imported PEFT adapter {peft_dir} ({'DoRA' if adapter.dora else 'LoRA'}, r={adapter.r}, "
          f"targets {','.join(adapter.targets())}) -> {out}")
    return out
