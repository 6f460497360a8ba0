"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314): LoRA on a frozen 4-bit NF4 base.

Everything is LoRA's (`litft/methods/lora.py`) with `quantize` on; the quantized loading, the
choice of layers and the dequantization for merging live in `litft/adapters/quantize.py`. Any
other adapter method subclassing LoRA gets the same `--quantize` option.
"""
from __future__ import annotations

from litft.methods.lora import LoRA
from litft.utils import LitftError


class QLoRA(LoRA):
    """QLoRA: LoRA adapters in full precision on a frozen, quantized base (4-bit NF4 with double quantization by default)."""

    def __init__(self, quantize: str = "bnb.nf4-dq", **kwargs) -> None:
        """QLoRA takes every LoRA option; only the default of `quantize` differs.

        Args:
            quantize: how the frozen base is quantized: bnb.nf4-dq (NF4 + double quantization, as in the
                paper), bnb.nf4, bnb.fp4, bnb.fp4-dq or bnb.int8.
        """
        if not quantize:
            raise LitftError("qlora needs a quantize mode (e.g. bnb.nf4-dq); for a full-precision base use "
                             "`litft finetune lora`")
        super().__init__(quantize=quantize, **kwargs)
