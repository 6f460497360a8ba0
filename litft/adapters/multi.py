"""Several named adapters on one litft model: load, switch, merge / unmerge, combine, delete, unload.

    am = AdapterModel(load_model(checkpoint_dir))
    am.load_adapter("out/a/final", "a")          # a litft run directory, or a PEFT adapter directory
    am.load_adapter("hub_adapter/", "b")
    am.set_adapter("a"); logits = am(ids)
    am.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")

Each named adapter is its own set of wrapper modules (`LoRALinear` / `DoRALinear`, unchanged: one adapter per
wrapper), all wrapping the *same* base layer objects. `set_adapter(name)` installs that adapter's wrappers in the
model, and the plain base layers where it adapts nothing; the other adapters wait outside the model, so they
cost no compute, get no gradients, and `am.model` stays an ordinary GPT for training and generation.

`add_weighted_adapter` follows peft's `LoraModel.add_weighted_adapter` (peft/tuners/lora/model.py) exactly:
the new adapter has r = alpha = its new rank (so with rsLoRA copied from the first adapter, as in peft, its
scaling is sqrt(rank)), and
  linear  (equal ranks)  A = sum_i sign_i sqrt(|w_i s_i|) A_i,  B = sum_i sqrt(|w_i s_i|) B_i   (not sum w_i B_i A_i)
  cat                    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]: exactly sum_i w_i s_i B_i A_i
  svd                    the rank-k truncated SVD of sum_i w_i s_i B_i A_i (k = svd_rank or the largest rank)
with s_i each adapter's scaling; a module only some adapters adapt combines those (cat: zero-padded to the rank).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from litft.adapters.adapter_dir import SUFFIXES, AdapterWeights, check_fits, read_adapter_dir
from litft.adapters.dora import DoRALinear
from litft.adapters.inject import adapter_modules, merge_adapters, unload_adapters, unmerge_adapters
from litft.adapters.lora import LoRALinear
from litft.adapters.peft_format import ADAPTER_CONFIG, peft_to_litft, read_peft_dir
from litft.adapters.quantize import dequantize_weight, is_quantized_linear
from litft.checkpoint import METHOD_CONFIG
from litft.utils import LitftError

COMBINATIONS = ("linear", "cat", "svd")


class AdapterModel:
    """A litft model plus named adapters, one of them (or none) active. `am(...)` runs `am.model(...)`."""

    def __init__(self, model: nn.Module) -> None:
        """`model`: a litft GPT. Adapters already injected into it (e.g. `load_method(run).model`) become the
        adapter named "default", active."""
        self.model = model
        self._bases: dict[str, nn.Module] = {}  # module name -> the base layer every adapter of it wraps
        self._adapters: dict[str, dict[str, LoRALinear]] = {}  # adapter name -> {module name: wrapper}
        self.active_adapter: str | None = None
        self.merged = False
        found = adapter_modules(model)
        if found:
            self._bases = {n: m.base_layer for n, m in found}
            self._adapters["default"] = dict(found)
            self.active_adapter = "default"
            self.merged = any(m.merged for _, m in found)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    # ------------------------------------------------------------------ adding
    def add_adapter(self, name: str, adapter: AdapterWeights) -> None:
        """Add an adapter from its weights (not activated: see `set_adapter`). Checked against the model first;
        on any error the model and the other adapters are unchanged."""
        if not isinstance(name, str) or not name:
            raise LitftError(f"adapter names are non-empty strings, got {name!r}")
        if name in self._adapters:
            raise LitftError(f"an adapter named {name!r} exists already; delete_adapter({name!r}) first or pick "
                             "another name")
        if self.merged:  # a new DoRA layer reads the base row norms: they must be the base's
            raise LitftError(f"cannot add adapter {name!r} while {self.active_adapter!r} is merged into the base "
                             "weights; call unmerge_adapter() first")
        check_fits(adapter, self.model.config, f"adapter {name!r}")
        cls = DoRALinear if adapter.dora else LoRALinear
        wrappers: dict[str, LoRALinear] = {}
        for module in adapter.modules():  # built aside: nothing in the model changes until all are built
            base = self._bases[module] if module in self._bases else self.model.get_submodule(module)
            wrapper = cls(base, adapter.r, adapter.alpha, adapter.dropout, adapter.use_rslora)
            with torch.no_grad():
                for suffix in SUFFIXES:
                    if f"{module}.{suffix}" in adapter.tensors:
                        getattr(wrapper, suffix).copy_(adapter.tensors[f"{module}.{suffix}"])
            wrappers[module] = wrapper
        for module, wrapper in wrappers.items():
            self._bases.setdefault(module, wrapper.base_layer)
        self._adapters[name] = wrappers

    def load_adapter(self, path: Path | str, name: str) -> None:
        """Add the adapter in `path`: a litft run directory (`final/`) or a PEFT adapter directory."""
        path = Path(path)
        if (path / ADAPTER_CONFIG).is_file():
            peft_config, tensors = read_peft_dir(path)
            adapter = peft_to_litft(peft_config, tensors, self.model.config, self._base_weight, str(path))
        elif (path / METHOD_CONFIG).is_file():
            adapter, _ = read_adapter_dir(path)
        else:
            raise LitftError(f"{path}: neither a litft adapter run ({METHOD_CONFIG}) nor a PEFT adapter "
                             f"({ADAPTER_CONFIG}); pass the `final/` directory of a run or a PEFT adapter directory")
        self.add_adapter(name, adapter)

    def _base_weight(self, module: str) -> Tensor:
        layer = self._bases[module] if module in self._bases else self.model.get_submodule(module)
        return dequantize_weight(layer) if is_quantized_linear(layer) else layer.weight.detach()

    def adapter_weights(self, name: str) -> AdapterWeights:
        """The weights of a named adapter (CPU copies), e.g. to save a combined adapter with
        `litft.adapters.adapter_dir.write_adapter_dir`."""
        wrappers = self._get(name)
        first = next(iter(wrappers.values()))
        tensors = {f"{module}.{suffix}": getattr(w, suffix).detach().to("cpu", copy=True)
                   for module, w in wrappers.items() for suffix in SUFFIXES
                   if hasattr(w, suffix)}
        return AdapterWeights(r=first.r, alpha=first.alpha, tensors=tensors, use_rslora=first.use_rslora,
                              dropout=first.dropout)

    # ------------------------------------------------------------------ switching
    def _get(self, name: str) -> dict[str, LoRALinear]:
        if name not in self._adapters:
            raise LitftError(f"unknown adapter {name!r}; this model has {self.adapters or 'no adapters'} "
                             "(add one with load_adapter(path, name))")
        return self._adapters[name]

    def _install(self, name: str | None) -> None:
        wrappers = self._get(name) if name is not None else {}
        for module, base in self._bases.items():
            layer = wrappers.get(module, base)
            if layer is not base:
                layer.train(self.model.training)  # e.g. no adapter dropout in an eval-mode model
            self.model.set_submodule(module, layer)
        self.active_adapter = name

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the adapter the model computes with (None: the plain base model). A merged adapter is
        unmerged first, as peft does."""
        if name is not None:
            self._get(name)
        if self.merged:
            warnings.warn(f"adapter {self.active_adapter!r} is merged; unmerging it before switching", stacklevel=2)
            self.unmerge_adapter()
        self._install(name)

    # ------------------------------------------------------------------ merging
    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (forward then runs the plain layers); undo with
        `unmerge_adapter()`. A failure leaves nothing merged."""
        if self.active_adapter is None:
            raise LitftError("no active adapter to merge; call set_adapter(name) first")
        if self.merged:
            raise LitftError(f"adapter {self.active_adapter!r} is merged already")
        try:
            merge_adapters(self.model)
        except (ValueError, TypeError, RuntimeError) as e:
            raise LitftError(f"cannot merge adapter {self.active_adapter!r}: {e}") from e
        self.merged = True

    def unmerge_adapter(self) -> None:
        """Subtract the merged adapter again: the base weights come back up to fp32 rounding."""
        if not self.merged:
            raise LitftError("no adapter is merged; nothing to unmerge")
        unmerge_adapters(self.model)
        self.merged = False

    def unload(self) -> nn.Module:
        """The plain base model back (unmerging first if needed); every adapter is dropped."""
        if self.merged:
            self.unmerge_adapter()
        self._install(None)
        self._adapters.clear()
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """The base model with the active adapter merged in and no wrappers left; every adapter is dropped (the
        base weights changed under them). A head tied to the embedding gets its own merged copy."""
        if self.active_adapter is not None and not self.merged:
            try:
                merge_adapters(self.model, untie=True)  # all or nothing: rolls back if one layer cannot merge
            except (ValueError, TypeError, RuntimeError) as e:
                raise LitftError(f"cannot merge adapter {self.active_adapter!r}: {e}") from e
        model = unload_adapters(self.model, merge=True)  # only swaps the merged wrappers for their base layers
        self._adapters.clear()
        self._bases.clear()
        self.active_adapter, self.merged = None, False
        return model

    def delete_adapter(self, name: str) -> None:
        """Drop a named adapter. Deleting the active one leaves no adapter active (the base model computes)."""
        self._get(name)
        if name == self.active_adapter:
            if self.merged:
                self.unmerge_adapter()
            self._install(None)
        del self._adapters[name]

    # ------------------------------------------------------------------ combining
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """A new adapter `adapter_name` combining `adapters` with `weights`, as peft's `add_weighted_adapter`
        (see the module docstring for each `combination_type`: linear, cat, svd). Not activated."""
        if not adapters or len(adapters) != len(weights):
            raise LitftError(f"need one weight per adapter; got adapters {adapters} and weights {weights}")
        if combination_type not in COMBINATIONS:
            raise LitftError(f"unknown combination_type {combination_type!r}: use one of {', '.join(COMBINATIONS)}")
        if adapter_name in self._adapters:
            raise LitftError(f"an adapter named {adapter_name!r} exists already; pick another adapter_name")
        sources = [self._get(a) for a in adapters]
        dora = [a for a, s in zip(adapters, sources) if isinstance(next(iter(s.values())), DoRALinear)]
        if dora:
            raise LitftError(f"add_weighted_adapter combines LoRA adapters; {dora} are DoRA (their magnitudes have "
                             "no weighted combination)")
        ranks = [max(w.r for w in s.values()) for s in sources]
        if len(adapters) == 1:
            combination_type = "linear"  # as peft: one adapter is only rescaled
        if combination_type == "linear":
            module_ranks = {w.r for s in sources for w in s.values()}
            if len(module_ranks) != 1:
                raise LitftError(f"combination_type linear needs adapters of equal rank; got "
                                 f"{dict(zip(adapters, ranks))}: use cat or svd")
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        else:
            new_rank = svd_rank or max(ranks)
        first = next(iter(sources[0].values()))
        tensors: dict[str, Tensor] = {}
        for module in self._bases:
            present = [(s[module], float(w)) for s, w in zip(sources, weights) if module in s]
            if not present:
                continue
            with torch.no_grad():
                A, B = _combine(combination_type, present, new_rank)
            tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = A, B
        combined = AdapterWeights(r=new_rank, alpha=float(new_rank), tensors=tensors, use_rslora=first.use_rslora,
                                  dropout=first.dropout)
        self.add_adapter(adapter_name, combined)


def _weighted_sum(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """peft's task_arithmetic, op for op (stack, multiply by an fp32 weight tensor, sum), so the svd input is
    bit-identical and its singular vectors come out the same."""
    stacked = torch.stack(tensors)
    return (stacked * torch.tensor(weights).to(stacked.device).view(-1, *[1] * (stacked.dim() - 1))).sum(0)


def _combine(kind: str, present: list[tuple[LoRALinear, float]], new_rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) of the combined adapter for one module, from its (layer, weight) pairs; see the module docstring."""
    pad = torch.nn.functional.pad
    if kind == "linear":
        scaled = [w * layer.scaling for layer, w in present]
        # sqrt(|weight x scaling|) on both sides, the sign on A only (else two negatives would cancel)
        wa = [math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scaled]
        wb = [math.sqrt(abs(s)) for s in scaled]
        return (_weighted_sum([layer.lora_A.detach() for layer, _ in present], wa),
                _weighted_sum([layer.lora_B.detach() for layer, _ in present], wb))
    if kind == "cat":
        A = torch.cat([layer.lora_A.detach() * w * layer.scaling for layer, w in present])
        B = torch.cat([layer.lora_B.detach() for layer, _ in present], dim=1)
        extra = new_rank - A.shape[0]  # a module some adapters skip: zero rows / columns up to the rank
        return pad(A, (0, 0, 0, extra)), pad(B, (0, extra))
    # svd
    delta = _weighted_sum([layer.delta_weight() for layer, _ in present], [w for _, w in present])
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    k = min(new_rank, S.shape[0])  # a rank above min(out, in) keeps everything; the rest is zero padding
    B, A = U[:, :k] @ torch.diag(S[:k]), Vh[:k]
    return pad(A, (0, 0, 0, new_rank - k)), pad(B, (0, new_rank - k))
