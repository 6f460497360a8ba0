"""Method-agnostic adapter plumbing: find target Linears, wrap them, freeze the rest,
extract / load / save the adapter weights, merge and unload.

Nothing here knows an adapter's math. An "adapter module" is anything with a ``base_layer``
attribute plus ``merge()`` / ``unmerge()`` methods: today ``LoRALinear`` (``adapters/lora.py``) and
its subclass ``DoRALinear`` (``adapters/dora.py``), each over a plain ``nn.Linear`` or, for QLoRA,
a bitsandbytes 4/8-bit one (``adapters/quantize.py`` builds that base; the adapter is the same
class). An "adapter parameter" is one whose dotted name has a component starting with one of
``ADAPTER_PARAM_PREFIXES`` (``lora_``: LoRA's ``lora_A`` / ``lora_B`` and DoRA's
``lora_magnitude``); a new adapter names its parameters so, extends the tuple, or passes its own
predicate (``is_adapter_param``) to the functions that take one.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "TARGET_ALIASES",
    "ALL_LINEAR",
    "ADAPTER_PARAM_PREFIXES",
    "BIAS_MODES",
    "resolve_targets",
    "inject_adapters",
    "is_adapter_param_name",
    "is_adapter_module",
    "adapter_modules",
    "mark_only_adapters_trainable",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "LoadResult",
    "merge_adapters",
    "unmerge_adapters",
    "unload_adapters",
]

# short name -> module name used by litft's GPT (same names as HF Llama)
TARGET_ALIASES: dict[str, str] = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "lm_head": "lm_head",
}
ALL_LINEAR = "all-linear"
# Substrings an adapter parameter's name component starts with. DoRA etc. append here.
ADAPTER_PARAM_PREFIXES: tuple[str, ...] = ("lora_",)
BIAS_MODES = ("none", "all", "lora_only")


# ---------------------------------------------------------------------------- targets
def resolve_targets(targets: list[str] | tuple[str, ...] | set[str] | str) -> set[str]:
    """Map user target names to full module names.

    Accepts short names ("q"), full names ("q_proj"), "all-linear" (every projection but
    lm_head, as in peft: the output head is usually left alone), a list of these, or a
    comma-separated string ("q,v")."""
    if isinstance(targets, str):
        targets = [t for t in (s.strip() for s in targets.split(",")) if t]
    targets = list(targets)
    if not targets:
        raise ValueError("no adapter targets given; e.g. ['q', 'v'] or 'all-linear'")

    full_names = set(TARGET_ALIASES.values())
    valid = sorted(set(TARGET_ALIASES) | full_names | {ALL_LINEAR})
    resolved: set[str] = set()
    for t in targets:
        if not isinstance(t, str):
            raise TypeError(f"adapter target names must be strings, got {t!r}")
        if t == ALL_LINEAR:
            resolved |= full_names - {"lm_head"}
        elif t in TARGET_ALIASES:
            resolved.add(TARGET_ALIASES[t])
        elif t in full_names:
            resolved.add(t)
        else:
            close = difflib.get_close_matches(t, valid, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown adapter target {t!r}.{hint} Valid targets: {valid}")
    return resolved


def _tied_elsewhere(model: nn.Module, module_name: str, param: Tensor) -> list[str]:
    """Names of parameters outside ``module_name`` that are the very same tensor object."""
    prefix = f"{module_name}." if module_name else ""
    return [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if p is param and not n.startswith(prefix)
    ]


def inject_adapters(
    model: nn.Module,
    targets: list[str] | str,
    make_adapter: Callable[[str, nn.Module], nn.Module],
) -> list[str]:
    """Replace every ``nn.Linear`` whose last name component is a target by
    ``make_adapter(full_name, linear)``; return the replaced module names in model order.

    bnb ``Linear4bit`` / ``Linear8bitLt`` subclass ``nn.Linear`` so QLoRA goes through here
    too. The original Linear object becomes the adapter's ``base_layer`` (not a copy), so
    a tied ``lm_head.weight is embed.weight`` stays tied; if ``make_adapter`` breaks such a
    tie we raise before touching the model."""
    wanted = resolve_targets(targets)

    matches: list[tuple[str, nn.Module]] = []
    linear_names: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if is_adapter_module(module) and leaf in wanted:
            raise ValueError(
                f"{name!r} already holds an adapter ({type(module).__name__}); "
                "unload it before injecting again"
            )
        if not isinstance(module, nn.Linear):
            continue
        linear_names.add(leaf)
        # `base_layer` children of existing adapters never match (their leaf is 'base_layer').
        if leaf in wanted:
            matches.append((name, module))
    if not matches:
        raise ValueError(
            f"no Linear layer matched adapter targets {sorted(wanted)}; the model's Linear "
            f"layers are named {sorted(linear_names) or '(none)'}"
        )

    # Build and validate every adapter first, then swap them in: a failure leaves the
    # model untouched.
    built: list[tuple[str, nn.Module]] = []
    for name, linear in matches:
        adapter = make_adapter(name, linear)
        if not isinstance(adapter, nn.Module):
            raise TypeError(f"make_adapter returned {type(adapter).__name__} for {name!r}, not a Module")
        ties = _tied_elsewhere(model, name, linear.weight)
        base_weight = getattr(getattr(adapter, "base_layer", None), "weight", None)
        if ties and base_weight is not linear.weight:
            raise RuntimeError(
                f"{name}.weight is tied to {ties} but the adapter built for it does not keep that "
                "weight object as base_layer.weight; this would silently untie them"
            )
        built.append((name, adapter))
    for name, adapter in built:
        model.set_submodule(name, adapter)
    return [name for name, _ in built]


# ----------------------------------------------------------------------- predicates
def is_adapter_param_name(name: str) -> bool:
    """True if any dotted component of ``name`` starts with an adapter prefix."""
    return any(part.startswith(ADAPTER_PARAM_PREFIXES) for part in name.split("."))


def is_adapter_module(module: nn.Module) -> bool:
    return (
        hasattr(module, "base_layer")
        and callable(getattr(module, "merge", None))
        and callable(getattr(module, "unmerge", None))
    )


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_adapter_module(m)]


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def _bias_names(model: nn.Module, bias: str) -> set[str]:
    """state_dict names of the biases that train alongside the adapter for a bias mode."""
    _check_bias(bias)
    if bias == "none":
        return set()
    if bias == "all":
        return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    # lora_only: the biases of the layers we wrapped
    names = set()
    for name, m in adapter_modules(model):
        if getattr(m.base_layer, "bias", None) is not None:
            names.add(f"{name}.base_layer.bias" if name else "base_layer.bias")
    return names


# ------------------------------------------------------------------------ trainable
def mark_only_adapters_trainable(
    model: nn.Module,
    bias: str = "none",
    is_adapter_param: Callable[[str], bool] = is_adapter_param_name,
) -> list[str]:
    """Freeze everything except adapter parameters (and biases per ``bias``:
    "none", "all" = every bias in the model, "lora_only" = biases of wrapped layers).
    Returns the names of the trainable parameters."""
    bias_names = _bias_names(model, bias)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name) or name in bias_names)
        if p.requires_grad:
            trainable.append(name)
    if not any(is_adapter_param(n) for n in trainable):
        raise ValueError("model has no adapter parameters; call inject_adapters() first")
    return trainable


# ---------------------------------------------------------------------- state dicts
def adapter_state_dict(
    model: nn.Module,
    bias: str = "none",
    is_adapter_param: Callable[[str], bool] = is_adapter_param_name,
) -> dict[str, Tensor]:
    """Only the adapter tensors (+ biases per ``bias``), keyed as in ``model.state_dict()``.
    Values are detached contiguous CPU *copies*, safe to save while training goes on."""
    bias_names = _bias_names(model, bias)
    return {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in model.state_dict().items()
        if is_adapter_param(k) or k in bias_names
    }


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _fmt_keys(keys: list[str], limit: int = 5) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_adapter_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    strict: bool = True,
    is_adapter_param: Callable[[str], bool] = is_adapter_param_name,
) -> LoadResult:
    """Copy adapter tensors into ``model``.

    Expected keys are the model's adapter tensors; biases that exist in the model are
    accepted too (adapters saved with a bias mode). Anything else -- in particular base
    weights -- is unexpected. Every key and shape is validated before anything is copied,
    so on error the model is unchanged. Shape mismatches are errors even with
    ``strict=False``."""
    own = model.state_dict(keep_vars=True)
    expected = [k for k in own if is_adapter_param(k)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [
        k
        for k in state_dict
        if k not in own or not (is_adapter_param(k) or k.rsplit(".", 1)[-1] == "bias")
    ]
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and k not in unexpected and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if shape_errors:
        problems.append(f"shape mismatch for {len(shape_errors)} key(s): {_fmt_keys(shape_errors, 3)}")
    if strict and missing:
        problems.append(f"missing {len(missing)} key(s): {_fmt_keys(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_fmt_keys(unexpected)}")
    if strict and not expected:
        problems.append("the model has no adapter parameters (call inject_adapters() first)")
    if problems:
        raise ValueError(
            "adapter weights do not fit this model: "
            + "; ".join(problems)
            + ". The adapter was likely trained for another base model or adapter config "
            "(targets / rank)."
        )
    merged = [n for n, m in adapter_modules(model) if getattr(m, "merged", False)]
    if merged:
        # Overwriting A/B under a merged layer would desync the base weight from the adapter.
        raise RuntimeError(f"cannot load adapter weights into merged layers ({_fmt_keys(merged)}); unmerge first")

    with torch.no_grad():
        for k, v in state_dict.items():
            if k in own and k not in unexpected:
                own[k].copy_(v)  # copy_ handles device / dtype
    return LoadResult(missing, unexpected)


# ------------------------------------------------------------------- merge / unload
def _untie_base_weight(model: nn.Module, name: str, module: nn.Module, untie: bool) -> None:
    base = module.base_layer
    weight = getattr(base, "weight", None)
    if weight is None:
        return
    ties = _tied_elsewhere(model, f"{name}.base_layer" if name else "base_layer", weight)
    if not ties:
        return
    if not untie:
        raise ValueError(
            f"{name}.base_layer.weight is tied to {ties}; merging would change those too. "
            "Use unload_adapters(model, merge=True) (which unties) or merge_adapters(model, untie=True)."
        )
    warnings.warn(f"untying {name}.base_layer.weight from {ties} to merge the adapter into it")
    base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)


def merge_adapters(model: nn.Module, untie: bool = False) -> list[str]:
    """Merge every adapter into its base weight. A base weight tied to another parameter
    (lm_head <-> embed) is an error unless ``untie=True``, which gives that layer its own
    copy first. Returns the merged module names."""
    mods = adapter_modules(model)
    already = [n for n, m in mods if getattr(m, "merged", False)]
    if already:  # check up front so we never end half-merged
        raise RuntimeError(f"adapters already merged: {_fmt_keys(already)}")
    _merge_all(model, mods, untie)
    return [n for n, _ in mods]


def _merge_all(model: nn.Module, mods: list[tuple[str, nn.Module]], untie: bool) -> None:
    """Merge each adapter of `mods`, all or none: a failure (a quantized base refuses to merge) unmerges the ones
    already merged before it is raised. Tied base weights are an error first, unless `untie`."""
    if not untie:
        for name, m in mods:  # raise on tied weights before mutating anything
            _untie_base_weight(model, name, m, untie=False)
    done: list[nn.Module] = []
    try:
        for name, m in mods:
            if untie:
                _untie_base_weight(model, name, m, untie=True)
            m.merge()
            done.append(m)
    except Exception:
        for m in done:  # roll back: never half-merged
            m.unmerge()
        raise


def unmerge_adapters(model: nn.Module) -> list[str]:
    mods = adapter_modules(model)
    not_merged = [n for n, m in mods if not getattr(m, "merged", True)]
    if not_merged:
        raise RuntimeError(f"adapters not merged: {_fmt_keys(not_merged)}")
    for _, m in mods:
        m.unmerge()
    return [n for n, _ in mods]


def unload_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every adapter module by its base layer.

    ``merge=True`` is merge-and-unload: bake the updates into the base weights first
    (untying tied weights as needed). ``merge=False`` returns the original base model,
    unmerging first where needed. Returns the model (or the base layer if the model
    itself was an adapter)."""
    # Outermost adapters only; parents before children so names stay valid.
    mods = []
    for name, m in adapter_modules(model):
        if not any(name.startswith(f"{p}.") or p == "" for p, _ in mods):
            mods.append((name, m))
    if merge:
        _merge_all(model, [(n, m) for n, m in mods if not getattr(m, "merged", False)], untie=True)
    else:
        for _, m in mods:
            if getattr(m, "merged", False):
                m.unmerge()
    for name, m in mods:
        if name == "":
            return m.base_layer
        model.set_submodule(name, m.base_layer)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every adapter layer taken out (its base layer put back in its place), then restored: the
    base model, without a copy of it (DPO's reference). Merged adapters live inside the base weights: refused."""
    mods = adapter_modules(model)
    if any(getattr(m, "merged", False) for _, m in mods):
        raise ValueError("adapters_disabled: some adapters are merged into the base weights; unmerge them first")
    for name, m in mods:
        model.set_submodule(name, m.base_layer)
    try:
        yield model
    finally:
        for name, m in mods:
            model.set_submodule(name, m)
