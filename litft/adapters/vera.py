"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, arXiv 2310.11454).

    y = base(x) + lambda_b * (B (lambda_d * (A dropout(x))))

``A`` (r x in_max) and ``B`` (out_max x r) are ONE pair of frozen random matrices shared by every adapted
layer, sized for the largest adapted layer: a layer uses ``A[:, :in]`` and ``B[:out, :]``. Only the two
vectors ``lambda_d`` (r) and ``lambda_b`` (out) train, per layer: r + out numbers instead of LoRA's
r * (in + out), so the rank is typically large (256). No scaling (alpha): the lambdas are the scale.

Init as peft's ``VeraConfig``: lambda_d = d_initial (0.1), lambda_b = 0 (a fresh layer computes exactly the
base layer), and A, B drawn by `vera_projections` from a CPU generator seeded with ``projection_seed``
(peft's ``projection_prng_key``; A first, then B, each kaiming-uniform with bound sqrt(6 / fan_in)). The
projections are never saved: they are regenerated from the seed, and a run stores a fingerprint of them
(`projection_fingerprint`) that is checked on every load, so a torch whose generator draws differently is
an error instead of a silently different model.

`VeRAProjections` holds the shared pair as non-persistent buffers; every `VeRALinear` keeps the *same*
module object as a child, so ``model.to(device)`` moves the pair once and the layers keep sharing it
(a per-layer copy would cost (r x in_max + out_max x r) numbers per layer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litft.adapters.lora import _features

__all__ = ["VeRAProjections", "VeRALinear", "vera_projections", "projection_fingerprint", "is_vera_param",
           "VERA_PARAMS", "FINGERPRINT_KEY"]

VERA_PARAMS = ("vera_lambda_d", "vera_lambda_b")  # the trainable tensors of a layer (peft's names too)
FINGERPRINT_KEY = "vera_projections.fingerprint"  # stored beside the lambdas in a run's adapter.safetensors


def is_vera_param(name: str) -> bool:
    """A VeRA layer's trainable vector (the predicate inject.py's state-dict functions take)."""
    return name.rsplit(".", 1)[-1] in VERA_PARAMS


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """peft's `_kaiming_init`: uniform(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, in_max: int, out_max: int, seed: int) -> tuple[Tensor, Tensor]:
    """The shared frozen pair (A (r, in_max), B (out_max, r)), fp32 on CPU, exactly as peft draws them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = _kaiming_uniform((r, in_max), g)
    B = _kaiming_uniform((out_max, r), g)
    return A, B


def projection_fingerprint(A: Tensor, B: Tensor) -> Tensor:
    """Four fp64 numbers that change when any projection value does (sums and sums of squares): what a run
    stores instead of the projections, to check the regenerated ones are the trained-with ones."""
    a, b = A.detach().double().cpu(), B.detach().double().cpu()
    return torch.stack([a.sum(), a.square().sum(), b.sum(), b.square().sum()])


class VeRAProjections(nn.Module):
    """The shared frozen pair, as non-persistent buffers (regenerated from `seed`, never in a state dict)."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int = 0, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.r, self.seed = r, seed
        A, B = vera_projections(r, in_max, out_max, seed)
        self.register_buffer("vera_A", A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", B.to(device=device, dtype=dtype), persistent=False)

    def fingerprint(self) -> Tensor:
        return projection_fingerprint(self.vera_A, self.vera_B)

    def extra_repr(self) -> str:
        return f"r={self.r}, in_max={self.vera_A.shape[1]}, out_max={self.vera_B.shape[0]}, seed={self.seed}"


class VeRALinear(nn.Module):
    """A frozen ``base_layer`` plus ``lambda_b * B (lambda_d * A x)`` with the shared frozen A, B."""

    method = "VeRA"

    def __init__(self, base_layer: nn.Module, projections: VeRAProjections, dropout: float = 0.0,
                 d_initial: float = 0.1) -> None:
        super().__init__()
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"VeRA dropout must satisfy 0 <= dropout < 1, got {dropout!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = _features(base_layer)
        A, B = projections.vera_A, projections.vera_B
        if A.shape[1] < self.in_features or B.shape[0] < self.out_features:
            raise ValueError(f"VeRA projections ({B.shape[0]} x {A.shape[1]}) are smaller than this layer "
                             f"({self.out_features} x {self.in_features}); size them for the largest adapted layer")
        self.projections = projections  # the same module object in every layer (see the module docstring)
        self.r = projections.r
        self.lora_dropout: nn.Module | None = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        weight = getattr(base_layer, "weight", None)
        device = weight.device if weight is not None else None
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), float(d_initial), device=device, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))

    def sliced(self) -> tuple[Tensor, Tensor]:
        """This layer's views of the shared pair: A[:, :in] (r, in), B[:out, :] (out, r)."""
        return (self.projections.vera_A[:, : self.in_features], self.projections.vera_B[: self.out_features])

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        A, B = self.sliced()
        h = x.to(self.vera_lambda_d.dtype)
        if self.lora_dropout is not None:
            h = self.lora_dropout(h)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, A.to(h.dtype)), B.to(h.dtype))
        return result + update.to(result.dtype)

    # -------------------------------------------------------------------- merge
    def delta_weight(self) -> Tensor:
        """(lambda_b B)(lambda_d A) as an (out, in) fp32 tensor."""
        A, B = self.sliced()
        return (self.vera_lambda_b.float()[:, None] * B.float()) @ (self.vera_lambda_d.float()[:, None] * A.float())

    def _weight(self) -> Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if weight is None or type(weight) not in (nn.Parameter, Tensor) or not weight.is_floating_point():
            raise TypeError(f"cannot merge VeRA into {type(self.base_layer).__name__}: merging requires a plain "
                            "floating-point Linear weight (dequantize quantized bases first)")
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("VeRA layer is already merged; call unmerge() first")
        weight = self._weight()
        weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("VeRA layer is not merged; nothing to unmerge")
        weight = self._weight()
        weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        dropout = self.lora_dropout.p if self.lora_dropout is not None else 0.0
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"dropout={dropout:g}, merged={self.merged}")


def vera_to_peft(tensors: dict[str, Tensor], r: int, seed: int, d_initial: float, dropout: float,
                 hf_names: dict[str, tuple[list[str], str | None]], shapes: dict[str, tuple[int, int]],
                 source: str) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json dict, tensors) of the peft VeRA adapter equal to a litft VeRA run's `tensors`
    (<module>.vera_lambda_d / vera_lambda_b and the projections' fingerprint). `hf_names`: HF module -> (its
    litft modules, join) (`models.hf.hf_modules`); `shapes`: litft module -> (out, in). The projections are
    regenerated, checked against the fingerprint and written too (peft's save_projection=True), so peft needs
    no generator of its own to agree."""
    prefix = "base_model.model."
    adapted = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors if is_vera_param(k)))
    others = [k for k in tensors if not is_vera_param(k) and k != FINGERPRINT_KEY]
    if others:
        raise ValueError(f"{source}: tensors peft's VeRA cannot hold: {others[:3]} (trained biases change the base "
                         "model itself: merge the run with `litft merge_lora` instead)")
    missing = [m for m in adapted if m not in shapes]
    if missing:
        raise ValueError(f"{source}: the adapter adapts {missing[:3]}, which this base model does not have")
    in_max = max(shapes[m][1] for m in adapted)
    out_max = max(shapes[m][0] for m in adapted)
    A, B = vera_projections(r, in_max, out_max, seed)
    stored = tensors.get(FINGERPRINT_KEY)
    if stored is None or not torch.allclose(stored.double(), projection_fingerprint(A, B), rtol=1e-9, atol=1e-9):
        raise ValueError(f"{source}: the projections drawn from projection_seed {seed} are not the ones this run "
                         "trained with (fingerprint differs): this torch's random generator draws differently")
    out: dict[str, Tensor] = {"base_model.vera_A": A.contiguous(), "base_model.vera_B": B.contiguous()}
    adapted_hf: set[str] = set()
    for hf_name, (parts, _) in hf_names.items():
        mine = [p for p in parts if p in adapted]
        if not mine:
            continue
        if len(parts) > 1:  # one HF Linear holds several litft ones: peft would share one lambda_d over them
            raise ValueError(f"{source}: {', '.join(mine)} live in the fused HF module {hf_name}; peft's VeRA "
                             "would give that whole module one lambda_d and one slice of B, which this adapter's "
                             "per-part lambdas cannot be written as. Merge the run (`litft merge_lora`) instead, "
                             "or train VeRA without the fused projections in --targets")
        for leaf in VERA_PARAMS:
            out[f"{prefix}{hf_name}.{leaf}"] = tensors[f"{parts[0]}.{leaf}"].contiguous()
        adapted_hf.add(hf_name)
    leaves = {n.rsplit(".", 1)[-1] for n in adapted_hf}  # leaf names, unless they would select more modules
    selected = {n for n in hf_names if n.rsplit(".", 1)[-1] in leaves}
    targets = sorted(leaves) if selected == adapted_hf else sorted(adapted_hf)
    config = {"peft_type": "VERA", "task_type": "CAUSAL_LM", "r": r, "target_modules": targets,
              "projection_prng_key": seed, "save_projection": True, "vera_dropout": dropout, "d_initial": d_initial,
              "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_weights": True,
              "layers_to_transform": None, "layers_pattern": None, "inference_mode": True}
    return config, out
