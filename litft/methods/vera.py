"""VeRA (arXiv 2310.11454): one shared pair of frozen random matrices, two trainable vectors per layer.

The math lives in `litft/adapters/vera.py`. This module builds the shared projections for the largest
adapted layer (as peft does), wraps the targets, and saves only the lambdas (plus a fingerprint of the
projections, checked on load: they are regenerated from `projection_seed`, never stored).

It is its own module on `Finetune`, not a LoRA subclass: VeRA has no alpha / rsLoRA scaling and no A, B that
train, so those LoRA options (and LoRA+, which speeds up B) do not exist here and the command line refuses
them as unknown options. It takes a quantized base (`--quantize`, the lambdas train in fp32 on top), NEFTune
(`--neftune_alpha`), bias modes and `init_adapter` (a VeRA run of the same r, seed and targets).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from litft.adapters.inject import (BIAS_MODES, adapter_state_dict, inject_adapters, load_adapter_state_dict,
                                   mark_only_adapters_trainable, resolve_targets, unload_adapters)
from litft.adapters.quantize import check_quantize, dequantize_model, load_quantized_model
from litft.adapters.vera import FINGERPRINT_KEY, VeRALinear, VeRAProjections, is_vera_param
from litft.checkpoint import iter_safetensors, read_method_config, safetensors_header, save_safetensors
from litft.methods.base import METHOD_CONFIG, Finetune
from litft.methods.neft import NEFTuneNoise
from litft.models.gpt import GPT
from litft.tokenizer import copy_tokenizer_files
from litft.utils import LitftError, atomic_write_text


class VeRA(NEFTuneNoise, Finetune):
    """VeRA: shared frozen random projections A, B; per layer only lambda_d (r) and lambda_b (out) train."""

    weights_file = "adapter.safetensors"

    def __init__(
        self,
        r: int = 256,
        d_initial: float = 0.1,
        projection_seed: int = 0,
        dropout: float = 0.0,
        targets: list[str] = ["all-linear"],
        bias: str = "none",
        quantize: str | None = None,
        quantize_skip: list[str] = ["lm_head"],
        quantize_embedding: bool = False,
        init_adapter: Path | None = None,
        **kwargs: Any,
    ) -> None:
        """VeRA hyperparameters (the base module's options apply too).

        Args:
            r: rank of the shared random projections (large: 256 in the paper; the trainable count is r + out
                per layer whatever r is).
            d_initial: initial value of every lambda_d entry (0.1, as peft; lambda_b starts at 0).
            projection_seed: seed the shared A, B are drawn from (peft's projection_prng_key).
            dropout: dropout on the adapter's input.
            targets: layers to adapt: any of q, k, v, o, gate, up, down, lm_head, or all-linear (all but lm_head).
            bias: which biases also train: none, all, or lora_only (biases of adapted layers).
            quantize: load the frozen base quantized (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8); null:
                full precision.
            quantize_skip: Linear layers kept in full precision when quantizing (names or globs).
            quantize_embedding: with quantize, also quantize the token embedding.
            init_adapter: start from the lambdas of an earlier VeRA run (its final/ or step-N/ directory); its r,
                projection_seed and targets must equal this run's.
        """
        super().__init__(**kwargs)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise LitftError(f"r (the VeRA rank) must be an integer >= 1, got {r!r}: e.g. --r 256")
        if isinstance(projection_seed, bool) or not isinstance(projection_seed, int):
            raise LitftError(f"projection_seed must be an integer, got {projection_seed!r}")
        if not 0 <= dropout < 1:
            raise LitftError(f"dropout must satisfy 0 <= dropout < 1, got {dropout!r}: e.g. --dropout 0.0")
        if bias not in BIAS_MODES:
            raise LitftError(f"unknown bias {bias!r}: use one of {', '.join(BIAS_MODES)}")
        try:
            self.targets = resolve_targets(targets)
        except (ValueError, TypeError) as e:
            raise LitftError(f"--targets: {e}") from None
        if quantize is not None:
            check_quantize(quantize)
        if quantize_embedding and not quantize:
            raise LitftError("quantize_embedding applies to a quantized base only: also pass a quantize mode (e.g. "
                             "--quantize bnb.nf4-dq)")
        self.r, self.d_initial, self.projection_seed = r, float(d_initial), projection_seed
        self.dropout, self.bias = dropout, bias
        self.quantize, self.quantize_skip, self.quantize_embedding = quantize, list(quantize_skip), quantize_embedding
        self.init_adapter = self._check_init_adapter(Path(init_adapter)) if init_adapter is not None else None

    def _check_init_adapter(self, run_dir: Path) -> Path:
        """Fail before any model loads if `run_dir` is not a VeRA run these lambdas can continue."""
        weights = run_dir / self.weights_file
        if not (run_dir / METHOD_CONFIG).is_file() or not weights.is_file():
            raise LitftError(f"init_adapter {run_dir}: expected {METHOD_CONFIG} and {self.weights_file} there (the "
                             "final/ directory of a VeRA run)")
        args = read_method_config(run_dir)["init_args"]
        if FINGERPRINT_KEY not in safetensors_header(weights)[0]:
            raise LitftError(f"init_adapter {run_dir} is not a VeRA run (no {FINGERPRINT_KEY} in {weights.name}); "
                             "VeRA continues VeRA runs only")
        try:
            theirs = {"r": args.get("r"), "projection_seed": args.get("projection_seed"),
                      "targets": sorted(resolve_targets(args.get("targets") or "all-linear"))}
        except (ValueError, TypeError) as e:
            raise LitftError(f"init_adapter {run_dir}: unreadable {METHOD_CONFIG} ({e})") from None
        mine = {"r": self.r, "projection_seed": self.projection_seed, "targets": sorted(self.targets)}
        differ = [f"{k}: {theirs[k]} there, {mine[k]} here" for k in mine if theirs[k] != mine[k]]
        if differ:
            raise LitftError(f"init_adapter {run_dir} does not fit this run ({'; '.join(differ)}): pass the same "
                             f"values (see its {METHOD_CONFIG})")
        return run_dir

    # -- model ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.quantize:
            self.model = load_quantized_model(self.checkpoint_dir, self.quantize, self.quantize_skip,
                                              quantize_embedding=self.quantize_embedding)
            self.model.gradient_checkpointing = self.hparams.gradient_checkpointing
        else:
            super().configure_model()
        self.model.requires_grad_(False)
        # the shared pair is sized for the largest adapted Linear (peft's _find_dim), in the adapters' dtype
        linears = [m for n, m in self.model.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in self.targets]
        weight = self.model.embed.weight if not self.quantize else None
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = next(self.model.parameters()).device
        self.projections = VeRAProjections(self.r, max((m.in_features for m in linears), default=1),
                                           max((m.out_features for m in linears), default=1),
                                           self.projection_seed, device, dtype)
        inject_adapters(self.model, self.targets,
                        lambda name, linear: VeRALinear(linear, self.projections, self.dropout, self.d_initial))
        mark_only_adapters_trainable(self.model, self.bias, is_adapter_param=is_vera_param)
        if self.init_adapter is not None:
            self.load_trainable_state_dict(dict(iter_safetensors(self.init_adapter / self.weights_file)),
                                           source=f"init_adapter {self.init_adapter}")

    # -- what checkpoints hold ------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {**adapter_state_dict(self.model, self.bias, is_adapter_param=is_vera_param),
                FINGERPRINT_KEY: self.projections.fingerprint()}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "VeRA weights") -> None:
        state_dict = dict(state_dict)
        stored = state_dict.pop(FINGERPRINT_KEY, None)
        mine = self.projections.fingerprint()
        if stored is None or stored.shape != mine.shape or not torch.allclose(stored.double(), mine, rtol=1e-9,
                                                                              atol=1e-9):
            raise LitftError(f"{source}: the shared VeRA projections regenerated from projection_seed "
                             f"{self.projection_seed} are not the ones these lambdas were trained with (fingerprint "
                             f"{None if stored is None else stored.tolist()} vs {mine.tolist()}): a torch whose random "
                             "generator draws differently, or not a VeRA run of this r and seed")
        try:
            load_adapter_state_dict(self.model, state_dict, is_adapter_param=is_vera_param)
        except ValueError as e:
            raise LitftError(f"{source}: {e}") from None

    def save_final(self, out_dir: Path) -> None:
        """The lambdas and the projections' fingerprint (a few KB; the projections come back from the seed)."""
        save_safetensors(self.trainable_state_dict(), out_dir / self.weights_file, {"method": type(self).__name__})
        copy_tokenizer_files(self.checkpoint_dir, out_dir)
        atomic_write_text(out_dir / METHOD_CONFIG, yaml.safe_dump(self.method_config(), sort_keys=False))

    def merged_model(self, into: str = "original") -> GPT:
        """The base model with (lambda_b B)(lambda_d A) folded into each adapted weight (see LoRA.merged_model
        for `into` on a quantized base)."""
        if self.quantize and into == "original":
            trained = self.trainable_state_dict()
            self.model, self.quantize = None, None
            self.configure_model()
            self.load_trainable_state_dict(trained)
        elif self.quantize and into == "dequantized":
            dequantize_model(self.model)
        elif self.quantize:
            raise LitftError(f"unknown merge target {into!r}: use original or dequantized")
        return unload_adapters(self.model, merge=True)

