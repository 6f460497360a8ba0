"""Delta-LoRA (arXiv 2309.02411): LoRA whose frozen W also moves by λ·s·(B_t A_t - B_{t-1} A_{t-1}) after each
optimizer step t >= K, with no gradient and no optimizer state for W.

The layer and the saved format (a dense `lora_delta` per adapted layer beside lora_A / lora_B in
adapter.safetensors) are `litft/adapters/delta_lora.py`. This module swaps the layer in and moves W from the
training loop's `after_optimizer_step(step)` hook. B_{t-1} A_{t-1} is the (A, B) the layers remember after the
previous step, after loading (resume, init_adapter) and at the start, so a resumed run moves W exactly as the
uninterrupted one would. At t = K the first update uses B_{K-1} A_{K-1} (the product the step changed), not the
initial one: steps before K move nothing.

`litft merge_lora` and `litft generate --adapter_dir` read the run like any LoRA run (the merge folds
W + lora_delta + s·B·A); `litft export_peft` refuses it: a PEFT LoRA adapter cannot carry a moved W (merge it,
then `litft convert_from_litft` the merged model). Composes with LoRA+ (`--loraplus_lr_ratio`), NEFTune
(`--neftune_alpha`), `--use_rslora`, `--init_adapter` (a LoRA-family run; a Delta-LoRA run's lora_delta comes
along) and several devices (every rank makes the same update from the same all-reduced step). Refuses a
quantized base (its packed weight cannot move) and dropout.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from litft.adapters.delta_lora import DeltaLoRALinear
from litft.adapters.inject import adapter_modules, load_adapter_state_dict
from litft.checkpoint import iter_safetensors
from litft.methods.lora import LoRA
from litft.methods.lora_plus import LoRAPlusGroups
from litft.methods.neft import NEFTuneNoise
from litft.utils import LitftError


class DeltaLoRA(LoRAPlusGroups, NEFTuneNoise, LoRA):
    """Delta-LoRA: LoRA whose frozen base weight also moves by the change of s·B·A (x update_ratio) each step."""

    def __init__(self, dropout: float = 0.0, delta_update_ratio: float = 2.0, delta_start_step: int = 0,
                 **kwargs: Any) -> None:
        """
        Args:
            dropout: must be 0 (the paper's update assumes the undropped input).
            delta_update_ratio: λ: W moves by λ·s·(B_t A_t - B_{t-1} A_{t-1}) after each step t >= delta_start_step
                (2 in the paper).
            delta_start_step: K: W starts moving after optimizer step K (steps are counted from 1; 0 or 1: from the
                first step), so that B·A settles first.
        """
        if kwargs.get("quantize"):
            raise LitftError(f"Delta-LoRA moves the base weights, which a quantized base ({kwargs['quantize']}) cannot "
                             "do: drop --quantize (or use lora / qlora)")
        if dropout:
            raise LitftError(f"Delta-LoRA needs --dropout 0 (got {dropout}): its update of W is the change of B·A, "
                             "derived for the undropped input")
        if isinstance(delta_update_ratio, bool) or not isinstance(delta_update_ratio, (int, float)) \
                or not delta_update_ratio >= 0:
            raise LitftError(f"delta_update_ratio (λ) must be a number >= 0, got {delta_update_ratio!r}: e.g. 2")
        if isinstance(delta_start_step, bool) or not isinstance(delta_start_step, int) or delta_start_step < 0:
            raise LitftError(f"delta_start_step (K) must be an integer >= 0, got {delta_start_step!r}")
        super().__init__(dropout=dropout, **kwargs)
        self.delta_update_ratio, self.delta_start_step = float(delta_update_ratio), delta_start_step

    def make_adapter(self, name: str, linear: nn.Module) -> nn.Module:
        return DeltaLoRALinear(linear, self.r, self.alpha, self.dropout, self.use_rslora)

    def delta_layers(self) -> list[DeltaLoRALinear]:
        return [m for _, m in adapter_modules(self.model) if isinstance(m, DeltaLoRALinear)]

    def configure_model(self) -> None:
        if self.model is not None:
            return
        init, self.init_adapter = self.init_adapter, None  # loaded below: a plain LoRA run has no lora_delta
        try:
            super().configure_model()
        finally:
            self.init_adapter = init
        if init is not None:
            state_dict = dict(iter_safetensors(init / self.weights_file))
            for name, m in adapter_modules(self.model):  # W unmoved where the file has no lora_delta
                state_dict.setdefault(f"{name}.lora_delta", torch.zeros_like(m.lora_delta))
            try:
                load_adapter_state_dict(self.model, state_dict)
            except ValueError as e:
                raise LitftError(f"init_adapter {init}: {e}") from e
        for m in self.delta_layers():
            m.remember_product()

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state_dict(state_dict)
        for m in self.delta_layers():  # a resumed run's B_{t-1} A_{t-1} is the loaded one
            m.remember_product()

    def after_optimizer_step(self, step: int) -> None:
        """Move every adapted W by λ·s·(B_t A_t - B_{t-1} A_{t-1}) once step t >= K."""
        for m in self.delta_layers():
            m.move_weight(self.delta_update_ratio, apply=step >= self.delta_start_step)
