"""LoRA (arXiv 2106.09685): frozen base, a trainable low-rank update B·A on chosen Linear layers."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import yaml

from litft.adapters.inject import (BIAS_MODES, adapter_state_dict, inject_adapters, load_adapter_state_dict,
                                   mark_only_adapters_trainable, resolve_targets, unload_adapters)
from litft.adapters.lora import LoRALinear
from litft.adapters.quantize import check_quantize, dequantize_model, load_quantized_model
from litft.checkpoint import iter_safetensors, read_method_config, save_safetensors
from litft.methods.base import METHOD_CONFIG, Finetune
from litft.models.gpt import GPT
from litft.tokenizer import copy_tokenizer_files
from litft.utils import LitftError, atomic_write_text


class LoRA(Finetune):
    """LoRA: a frozen base with trainable low-rank updates B·A on the chosen Linear layers."""

    weights_file = "adapter.safetensors"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        targets: list[str] = ["all-linear"],
        bias: str = "none",
        use_rslora: bool = False,
        quantize: str | None = None,
        quantize_skip: list[str] = ["lm_head"],
        quantize_embedding: bool = False,
        init_adapter: Path | None = None,
        **kwargs,
    ) -> None:
        """LoRA hyperparameters (the base module's options apply too).

        Args:
            r: LoRA rank.
            alpha: LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
            dropout: dropout on the adapter's input.
            targets: layers to adapt: any of q, k, v, o, gate, up, down, lm_head, or all-linear (all but lm_head).
            bias: which biases also train: none, all, or lora_only (biases of adapted layers).
            use_rslora: rank-stabilised scaling alpha / sqrt(r) (arXiv 2312.03732).
            quantize: load the frozen base quantized (QLoRA), on CPU or CUDA: bnb.nf4, bnb.nf4-dq (double
                quantization), bnb.fp4, bnb.fp4-dq or bnb.int8; null: full precision. See litft/adapters/quantize.py.
            quantize_skip: Linear layers kept in full precision when quantizing: names (lm_head, down_proj, down)
                or globs on full names (blocks.0.*). Norms are never quantized; the embedding only with
                quantize_embedding.
            quantize_embedding: with quantize, also quantize the token embedding (and a head tied to it, which is the
                embedding) in the same mode: worth it where the vocabulary is large next to the rest (SmolLM2-135M:
                nf4-dq base 0.415x -> 0.259x of bf16). Needs n_embd divisible by 64.
            init_adapter: start from trained adapter weights instead of B = 0: the `final/` (or `step-N/`)
                directory of an earlier run, or what `litft import_peft` wrote. Its r, alpha, use_rslora and
                targets must equal this run's.
        """
        super().__init__(**kwargs)
        # every option is checked here, before any model loads (the adapter layers check again, for library use)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise LitftError(f"r (the LoRA rank) must be an integer >= 1, got {r!r}: e.g. --r 8")
        if not alpha > 0:
            raise LitftError(f"alpha must be > 0, got {alpha!r}: e.g. --alpha 16 (the update is scaled by alpha / r)")
        if not 0 <= dropout < 1:
            raise LitftError(f"dropout must satisfy 0 <= dropout < 1, got {dropout!r}: e.g. --dropout 0.05")
        if bias not in BIAS_MODES:
            raise LitftError(f"unknown bias {bias!r}: use one of {', '.join(BIAS_MODES)}")
        try:
            self.targets = resolve_targets(targets)
        except (ValueError, TypeError) as e:
            raise LitftError(f"--targets: {e}") from None
        self.r, self.alpha, self.dropout, self.bias, self.use_rslora = r, alpha, dropout, bias, use_rslora
        if quantize is not None:  # mode and bitsandbytes version checked now, before any model loads
            check_quantize(quantize)
        if quantize_embedding and not quantize:
            raise LitftError("quantize_embedding applies to a quantized base only: also pass a quantize mode (e.g. "
                             "--quantize bnb.nf4-dq), or use `litft finetune qlora`")
        self.quantize, self.quantize_skip, self.quantize_embedding = quantize, list(quantize_skip), quantize_embedding
        self.init_adapter = self._check_init_adapter(Path(init_adapter)) if init_adapter is not None else None

    def _check_init_adapter(self, run_dir: Path) -> Path:
        """Fail before any model loads if the adapter to start from cannot fit this run's adapters."""
        cfg_path, weights = run_dir / METHOD_CONFIG, run_dir / self.weights_file
        if not cfg_path.is_file() or not weights.is_file():
            raise LitftError(f"init_adapter {run_dir}: expected {METHOD_CONFIG} and {self.weights_file} there (the final/ "
                             "directory of a LoRA-family run, or the output of `litft import_peft`)")
        try:  # a file from elsewhere: any content must end in one clear error
            args = read_method_config(run_dir)["init_args"]
            theirs = {"r": args.get("r"), "alpha": float(args.get("alpha", 0)),
                      "use_rslora": args.get("use_rslora", False),
                      "targets": sorted(resolve_targets(args.get("targets") or "all-linear"))}
        except (LitftError, ValueError, TypeError) as e:
            raise LitftError(f"init_adapter {run_dir}: unreadable {METHOD_CONFIG} ({' '.join(str(e).split())[:200]}); "
                             "pass the final/ directory of a LoRA-family run") from None
        mine = {"r": self.r, "alpha": float(self.alpha), "use_rslora": self.use_rslora, "targets": sorted(self.targets)}
        differ = [f"{k}: {theirs[k]} there, {mine[k]} here" for k in mine if theirs[k] != mine[k]]
        if differ:
            raise LitftError(f"init_adapter {run_dir} does not fit this run ({'; '.join(differ)}): pass the same values "
                             f"(see its {METHOD_CONFIG})")
        return run_dir

    def make_adapter(self, name: str, linear: nn.Module) -> nn.Module:
        return LoRALinear(linear, self.r, self.alpha, self.dropout, self.use_rslora)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.quantize:  # QLoRA: the frozen base is quantized while it streams in, on the training device
            self.model = load_quantized_model(self.checkpoint_dir, self.quantize, self.quantize_skip,
                                              quantize_embedding=self.quantize_embedding)
            self.model.gradient_checkpointing = self.hparams.gradient_checkpointing
        else:
            super().configure_model()
        self.model.requires_grad_(False)
        inject_adapters(self.model, self.targets, self.make_adapter)
        mark_only_adapters_trainable(self.model, self.bias)
        if self.init_adapter is not None:
            try:
                load_adapter_state_dict(self.model, dict(iter_safetensors(self.init_adapter / self.weights_file)))
            except ValueError as e:  # another method's adapter (DoRA magnitudes), another base model
                raise LitftError(f"init_adapter {self.init_adapter}: {e}") from e

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model, self.bias)

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        load_adapter_state_dict(self.model, state_dict)

    def save_final(self, out_dir: Path) -> None:
        """Adapter weights (a few MB) + how to rebuild the method; the base model stays where it is."""
        save_safetensors(self.trainable_state_dict(), out_dir / self.weights_file, {"method": type(self).__name__})
        copy_tokenizer_files(self.checkpoint_dir, out_dir)
        atomic_write_text(out_dir / METHOD_CONFIG, yaml.safe_dump(self.method_config(), sort_keys=False))

    def merged_model(self, into: str = "original") -> GPT:
        """The base model with B·A folded into its weights and the wrappers removed.

        With a quantized base, `into` picks the weights that receive the update: "original" rebuilds this
        method on the full-precision base from checkpoint_dir (the usual practice: the merged model does
        not inherit the quantization error), "dequantized" merges into the dequantized weights the
        adapter was trained against."""
        if self.quantize and into == "original":
            adapters = self.trainable_state_dict()
            self.model, self.quantize = None, None  # free the quantized model first; then reload unquantized
            self.configure_model()
            self.load_trainable_state_dict(adapters)
        elif self.quantize and into == "dequantized":
            dequantize_model(self.model)
        elif self.quantize:
            raise LitftError(f"unknown merge target {into!r}: use original or dequantized")
        return unload_adapters(self.model, merge=True)
