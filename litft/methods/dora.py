"""DoRA (arXiv 2402.09353): LoRA whose adapted layers learn a magnitude and a direction separately.

The math lives in `litft/adapters/dora.py`; this module only swaps the adapter layer. It takes
LoRA+ (`--loraplus_lr_ratio 16`) and NEFTune (`--neftune_alpha 5`) as options, and, like every
LoRA subclass, a quantized base (`--quantize`), so all of them compose in one run.
"""
from __future__ import annotations

from torch import nn

from litft.adapters.dora import DoRALinear
from litft.methods.lora import LoRA
from litft.methods.lora_plus import LoRAPlusGroups
from litft.methods.neft import NEFTuneNoise


class DoRA(LoRAPlusGroups, NEFTuneNoise, LoRA):
    """DoRA: weight-decomposed LoRA (a trainable magnitude per output row x a LoRA-updated direction)."""

    def make_adapter(self, name: str, linear: nn.Module) -> nn.Module:
        return DoRALinear(linear, self.r, self.alpha, self.dropout, self.use_rslora)
