"""A trained LoRA / DoRA adapter as plain data, and the run directory (`out_dir/final`) that holds it.

`AdapterWeights` is what `litft export_peft` / `import_peft` (peft_format.py) and the named adapters of
multi.py exchange: the hyperparameters plus the tensors under litft's names

    <module>.lora_A  (r, in)      <module>.lora_B  (out, r)      <module>.lora_magnitude  (out,)  DoRA only

Reading one needs no base model, so exporting a QLoRA run never loads (or quantizes) its base. A PiSSA run
(its layers also hold their start, `lora_A0` / `lora_B0`) reads as the equal rank-2r LoRA against the original
base (`adapters/pissa.py`); a VeRA run is no LoRA adapter and is refused here (its own export: `adapters/vera.py`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from litft.adapters.pissa import pissa_as_lora
from litft.checkpoint import (METHOD_CONFIG, WEIGHTS, check_checkpoint_dir, iter_safetensors, linear_shapes,
                              read_method_config, read_tensor, safetensors_header, save_safetensors)
from litft.models.config import Config
from litft.tokenizer import TOKENIZER_FILES, copy_tokenizer_files
from litft.utils import LitftError, atomic_write_text, write_dir_atomically

ADAPTER_FILE = "adapter.safetensors"  # = LoRA.weights_file
SUFFIXES = ("lora_A", "lora_B", "lora_magnitude")
METHOD_CLASSES = {False: "litft.methods.lora.LoRA", True: "litft.methods.dora.DoRA"}  # keyed by DoRA or not


@dataclass
class AdapterWeights:
    """One adapter: every adapted module has the same r, alpha and scaling (as a litft run has)."""

    r: int
    alpha: float
    tensors: dict[str, Tensor]  # litft names, see the module docstring
    use_rslora: bool = False
    dropout: float = 0.0

    @property
    def dora(self) -> bool:
        return any(k.endswith(".lora_magnitude") for k in self.tensors)

    def modules(self) -> list[str]:
        """The adapted modules, in the order of the tensors."""
        return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in self.tensors))

    def targets(self) -> list[str]:
        """Leaf names (q_proj, ..., lm_head): what a litft method's `targets` option takes."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules()})


def check_tensors(tensors: dict[str, Tensor], source: str) -> None:
    """Every key is <module>.lora_A / lora_B / lora_magnitude, each module has A and B, ranks agree."""
    others = [k for k in tensors if k.rsplit(".", 1)[-1] not in SUFFIXES]
    if others:
        hint = (" This run also trained biases (bias=all / lora_only): they change the base model itself, which a "
                "separate adapter cannot carry; merge it with `litft merge_lora` instead."
                if all(k.endswith(".bias") for k in others) else
                " This is a Delta-LoRA run: it moved the base weights (lora_delta), which a LoRA adapter cannot carry; "
                "merge it with `litft merge_lora` instead." if any(k.endswith(".lora_delta") for k in others) else "")
        raise LitftError(f"{source}: not LoRA/DoRA adapter tensors: {others[:3]}.{hint}")
    for module in dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors):
        A, B = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LitftError(f"{source}: {module} needs lora_A (r, in) and lora_B (out, r); got "
                             f"{None if A is None else tuple(A.shape)} and {None if B is None else tuple(B.shape)}")


def read_adapter_dir(run_dir: Path | str) -> tuple[AdapterWeights, dict]:
    """The adapter of a litft run directory and the run's method config (class_path, init_args)."""
    run_dir = Path(run_dir)
    method_config = read_method_config(run_dir)
    args = method_config["init_args"]
    if "projection_seed" in args:  # VeRA: shared random projections and lambdas, no A / B of its own
        raise LitftError(f"{run_dir}: a VeRA run is not a LoRA adapter (its layers share random projections and "
                         "train only scaling vectors): use it with `litft merge_lora`, `litft generate --adapter_dir` "
                         "or `litft export_peft` (a peft VeRA adapter)")
    if "r" not in args or "alpha" not in args:
        raise LitftError(f"{run_dir}: a {method_config['class_path']} run is not an adapter run (full "
                         "fine-tuning writes a whole model: use `litft convert_from_litft` on it)")
    source = run_dir / METHOD_CONFIG
    r, alpha = _check_type(args, "r", int, source), _check_type(args, "alpha", (int, float), source)
    use_rslora = _check_type(args, "use_rslora", bool, source, False)
    dropout = _check_type(args, "dropout", (int, float), source, 0.0)
    if r < 1 or not 0 <= dropout < 1:
        raise LitftError(f"{source}: r must be >= 1 and 0 <= dropout < 1 (got r={r}, dropout={dropout})")
    path = run_dir / ADAPTER_FILE
    if not path.is_file():
        raise LitftError(f"{run_dir}: {ADAPTER_FILE} is missing (was the run interrupted before it finished?)")
    tensors = dict(iter_safetensors(path))
    if any(k.endswith(".lora_A0") for k in tensors):  # PiSSA: the equal rank-2r LoRA against the original base
        tensors, r, alpha = pissa_as_lora(tensors, r, alpha, use_rslora)
    check_tensors(tensors, str(path))
    adapter = AdapterWeights(r=r, alpha=float(alpha), tensors=tensors, use_rslora=use_rslora, dropout=float(dropout))
    return adapter, method_config


def _check_type(args: dict, key: str, types: type | tuple[type, ...], source: Path, default: Any = None) -> Any:
    """args[key] (or `default`) if it is of `types` (a bool is no number here), else one clear error."""
    types = types if isinstance(types, tuple) else (types,)
    value = args.get(key, default)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise LitftError(f"{source}: init_args.{key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
    return value


def write_adapter_dir(adapter: AdapterWeights, out_dir: Path | str, checkpoint_dir: Path | str) -> Path:
    """A run directory like `final/` (adapter.safetensors + method_config.yaml + tokenizer files) that
    `load_method`, `litft merge_lora` and `litft generate --adapter_dir` read. Written under a temp name and
    renamed, so a failure leaves nothing half-written."""
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    check_tensors(adapter.tensors, "adapter")
    init_args = {"checkpoint_dir": str(Path(checkpoint_dir).resolve()), "r": adapter.r, "alpha": adapter.alpha,
                 "dropout": adapter.dropout, "targets": adapter.targets(), "bias": "none",
                 "use_rslora": adapter.use_rslora}
    method_config = {"class_path": METHOD_CLASSES[adapter.dora], "init_args": init_args}

    def write(d: Path) -> None:
        save_safetensors(adapter.tensors, d / ADAPTER_FILE, metadata={"method": METHOD_CLASSES[adapter.dora]})
        copy_tokenizer_files(checkpoint_dir, d)
        atomic_write_text(d / METHOD_CONFIG, yaml.safe_dump(method_config, sort_keys=False))

    return write_dir_atomically(Path(out_dir), write, {ADAPTER_FILE, METHOD_CONFIG, *TOKENIZER_FILES})


def base_weight_reader(checkpoint_dir: Path | str) -> Callable[[str], Tensor]:
    """module name -> its base weight (out, in) read from the checkpoint file, one tensor at a time (DoRA
    needs a few base row norms; loading the whole model for them would be wasteful)."""
    path = check_checkpoint_dir(checkpoint_dir) / WEIGHTS

    def read(module: str) -> Tensor:
        name = f"{module}.weight"
        if module == "lm_head" and name not in safetensors_header(path)[0]:
            name = "embed.weight"  # a tied head is stored as the embedding
        return read_tensor(path, name)

    return read


FIX_BASE = "it was made for another base model: pass the checkpoint_dir of the model it was trained on"


def check_module_fits(module: str, out: int, in_: int, A: Tensor | None, B: Tensor | None, m: Tensor | None,
                      source: str) -> None:
    """lora_A (r, in), lora_B (out, r) and a DoRA magnitude (out,) fit a Linear of (out, in); else one clear error."""
    if (A is None or B is None or (A.dim(), B.dim()) != (2, 2) or A.shape[1] != in_ or B.shape[0] != out
            or A.shape[0] != B.shape[1] or (m is not None and tuple(m.shape) != (out,))):
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        raise LitftError(f"{source}: {module} is ({out}, {in_}) (out, in) in this base model but the adapter has "
                         f"lora_A {shape(A)} and lora_B {shape(B)}; {FIX_BASE}")


def check_fits(adapter: AdapterWeights, config: Config, source: str) -> None:
    """Every adapted module exists in this base model and has the adapter's shapes; else one clear error."""
    shapes = linear_shapes(config)
    for module in adapter.modules():
        if module not in shapes:
            raise LitftError(f"{source}: the adapter adapts {module}, which this {config.family} model "
                             f"({config.n_layer} layers) does not have; {FIX_BASE}")
        t = adapter.tensors
        check_module_fits(module, *shapes[module], t[f"{module}.lora_A"], t[f"{module}.lora_B"],
                          t.get(f"{module}.lora_magnitude"), source)
