"""PiSSA (arXiv 2404.02948): LoRA started from the top-r singular triplets of each weight, over the residual.

The math lives in `litft/adapters/pissa.py`. Here: load the base in full precision, decompose every target
(`pissa_niter` for peft's fast randomized SVD), write the residual W - s B0 A0 into the weight, quantize it
if asked (QPiSSA: `--quantize`; decomposing first keeps the principal part out of the quantization error),
then wrap the targets with `PiSSALinear`. Everything else is LoRA's, and LoRA+ / NEFTune compose as mixins.

What a run saves (`final/adapter.safetensors`): the trained `lora_A`, `lora_B` and the start `lora_A0`,
`lora_B0` of every adapted layer, never the residual base: it is rebuilt from the original base and A0, B0
(no SVD on load, so it is the very residual the run trained on). `load_method` / `generate --adapter_dir`
rebuild exactly the trained model (a QPiSSA run on its quantized residual); `merge_lora` folds the adapter
into the residual (= W + s(BA - B0A0)); `export_peft` and named adapters read it as the equal rank-2r LoRA
against the original base (`pissa_as_lora`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from litft.adapters.inject import inject_adapters, load_adapter_state_dict, mark_only_adapters_trainable
from litft.adapters.lora import lora_scaling
from litft.adapters.pissa import PISSA_BUFFERS, PiSSALinear, pissa_decompose
from litft.adapters.quantize import quantize_model
from litft.checkpoint import iter_safetensors, linear_shapes, safetensors_header
from litft.methods.base import Finetune
from litft.methods.lora import LoRA
from litft.methods.lora_plus import LoRAPlusGroups
from litft.methods.neft import NEFTuneNoise
from litft.models.config import Config
from litft.utils import LitftError

Start = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A0, B0)


class PiSSA(LoRAPlusGroups, NEFTuneNoise, LoRA):
    """PiSSA: LoRA initialised from the principal singular triplets of each weight, the residual frozen."""

    def __init__(self, dropout: float = 0.0, pissa_niter: int | None = None, **kwargs: Any) -> None:
        """PiSSA takes the LoRA options (r, alpha, targets, use_rslora, quantize for QPiSSA, ...).

        Args:
            dropout: dropout on the adapter's input (0 in the paper).
            pissa_niter: null: exact SVD of each weight; N: randomized SVD with N subspace iterations (peft's
                init_lora_weights="pissa_niter_N"; much faster on large weights, and random: it uses the run's seed).
        """
        super().__init__(dropout=dropout, **kwargs)
        if pissa_niter is not None and (isinstance(pissa_niter, bool) or not isinstance(pissa_niter, int)
                                        or pissa_niter < 0):
            raise LitftError(f"pissa_niter must be null (exact SVD) or an integer >= 0, got {pissa_niter!r}")
        self.pissa_niter = pissa_niter
        config = Config.from_checkpoint(self.checkpoint_dir)
        if "lm_head" in self.targets and config.tie_embeddings:
            raise LitftError("pissa cannot adapt lm_head of this model: its head is tied to the token embedding, "
                             "and the residual W - sBA would change the embedding too. Drop lm_head from --targets")
        too_small = sorted({f"{n.rsplit('.', 1)[-1]} {shape}" for n, shape in linear_shapes(config).items()
                            if n.rsplit(".", 1)[-1] in self.targets and min(shape) < self.r})
        if too_small:
            raise LitftError(f"pissa rank r={self.r} exceeds min(out, in) of {', '.join(too_small)}: a weight has no "
                             "more singular triplets than that; lower --r")
        self._start: Start | None = None  # A0, B0 once decomposed: rebuilding the model reuses them, never re-SVDs

    def _check_init_adapter(self, run_dir: Path) -> Path:
        run_dir = super()._check_init_adapter(run_dir)
        names = safetensors_header(run_dir / self.weights_file)[0]
        if not any(k.endswith(".lora_A0") for k in names):
            raise LitftError(f"init_adapter {run_dir} is not a PiSSA run (no lora_A0 / lora_B0 in it): a PiSSA "
                             "adapter continues only a PiSSA run, whose residual base it was trained against")
        return run_dir

    def configure_model(self) -> None:
        if self.model is not None:
            return
        init = dict(iter_safetensors(self.init_adapter / self.weights_file)) if self.init_adapter else None
        if init is not None and self._start is None:
            self._start = {k.rsplit(".", 1)[0]: (init[k], init[k[:-2] + "B0"]) for k in init if k.endswith(".lora_A0")}
        Finetune.configure_model(self)  # full precision: decompose first, quantize the residual after
        self.model.requires_grad_(False)
        targets = {n: m for n, m in self.model.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in self.targets}
        scaling = self._scaling()
        start: Start = {}
        with torch.no_grad():
            for name, linear in targets.items():
                if self._start is not None and name in self._start:
                    A0, B0 = (t.float() for t in self._start[name])
                else:
                    A0, B0 = pissa_decompose(linear.weight, self.r, scaling, self.pissa_niter)
                W = linear.weight
                W.copy_((W.float() - scaling * (B0.to(W.device) @ A0.to(W.device))).to(W.dtype))
                start[name] = (A0, B0)
        self._start = start
        if self.quantize:
            quantize_model(self.model, self.quantize, self.quantize_skip, quantize_embedding=self.quantize_embedding)
        inject_adapters(self.model, self.targets, lambda name, linear: PiSSALinear(
            linear, self.r, self.alpha, *start[name], dropout=self.dropout, use_rslora=self.use_rslora))
        mark_only_adapters_trainable(self.model, self.bias)
        if init is not None:
            try:
                load_adapter_state_dict(self.model, init)
            except ValueError as e:
                raise LitftError(f"init_adapter {self.init_adapter}: {e}") from e

    def _scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The run's adapter, and its A0 / B0: if they are not the ones this model was decomposed into (another
        machine's SVD may differ in sign or rounding), the residual base is rebuilt from the file's first."""
        files = {k.rsplit(".", 1)[0] for k in state_dict if k.rsplit(".", 1)[-1] in PISSA_BUFFERS}
        own = {n: m for n, m in self.model.named_modules() if isinstance(m, PiSSALinear)}
        if files and files <= own.keys() and any(
                not torch.equal(state_dict[f"{n}.{b}"].to(getattr(own[n], b).dtype), getattr(own[n], b).cpu())
                for n in files for b in PISSA_BUFFERS):
            self._start = {n: (state_dict[f"{n}.lora_A0"], state_dict[f"{n}.lora_B0"]) for n in files}
            self.model = None
            self.configure_model()
        super().load_trainable_state_dict(state_dict)
