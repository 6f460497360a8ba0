"""One LightningModule per fine-tuning method. `METHODS` maps the command line's names to them: a new method
is a module here plus one entry in METHOD_TABLE."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from litft.methods.base import Finetune

    METHODS: dict[str, type[Finetune]]

# name -> ("module:Class", the first line of the class's own docstring). Strings, so that `litft finetune --help`
# and a mistyped method name are answered without importing torch and Lightning (~5-10 s); tests/test_startup.py
# checks every summary against its class. METHODS, the classes themselves, is built from it on first use.
METHOD_TABLE: dict[str, tuple[str, str]] = {
    "lora": ("litft.methods.lora:LoRA",
             "LoRA: a frozen base with trainable low-rank updates B·A on the chosen Linear layers."),
    "full": ("litft.methods.full:Full",
             "Full fine-tuning: all weights train; the result is a complete litft checkpoint."),
    "qlora": ("litft.methods.qlora:QLoRA", "QLoRA: LoRA adapters in full precision on a frozen, quantized base "
                                           "(4-bit NF4 with double quantization by default)."),
    "dora": ("litft.methods.dora:DoRA",
             "DoRA: weight-decomposed LoRA (a trainable magnitude per output row x a LoRA-updated direction)."),
    "lora_plus": ("litft.methods.lora_plus:LoRAPlus",
                  "LoRA+: LoRA with lora_B trained at loraplus_lr_ratio x lr (default 16)."),
    "neft": ("litft.methods.neft:NEFT",
             "NEFTune: LoRA with uniform noise on the token embeddings in training (alpha 5 by default)."),
    "vera": ("litft.methods.vera:VeRA",
             "VeRA: shared frozen random projections A, B; per layer only lambda_d (r) and lambda_b (out) train."),
    "dpo": ("litft.methods.dpo:DPO", "DPO and its variants (ipo, hinge, cDPO, SimPO) on a LoRA or DoRA adapter, "
                                     "over a full or quantized base."),
    "pissa": ("litft.methods.pissa:PiSSA",
              "PiSSA: LoRA initialised from the principal singular triplets of each weight, the residual frozen."),
    "lora_fa": ("litft.methods.lora_fa:LoRAFA",
                "LoRA-FA: LoRA with A frozen at its random init (only B trains); backward keeps x·A^T, not x."),
    "delta_lora": ("litft.methods.delta_lora:DeltaLoRA", "Delta-LoRA: LoRA whose frozen base weight also moves by "
                                                         "the change of s·B·A (x update_ratio) each step."),
}

__all__ = ["METHODS", "METHOD_TABLE", "Finetune", "LoRA", "Full", "QLoRA", "DoRA", "LoRAPlus", "NEFT", "VeRA",
           "PiSSA", "DPO", "LoRAFA", "DeltaLoRA"]


def load_object(path: str) -> Any:
    """What a "module:name" path from one of litft's own tables names (never a path read from a file or option)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    """`METHODS` and the classes (`from litft.methods import LoRA`), imported on first use (PEP 562): importing
    any module of this package (`litft.methods.base`) runs this file, which therefore imports nothing heavy."""
    if name == "METHODS":
        methods = {method: load_object(path) for method, (path, _) in METHOD_TABLE.items()}
        globals()["METHODS"] = methods  # one dict for the process, as the eager one was
        return methods
    classes = {path.split(":")[1]: path for path, _ in METHOD_TABLE.values()}
    classes["Finetune"] = "litft.methods.base:Finetune"
    if name in classes:
        return load_object(classes[name])
    raise AttributeError(f"module 'litft.methods' has no attribute {name!r}")
