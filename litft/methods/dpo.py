"""DPO (arXiv 2305.18290): preference tuning of a LoRA-family adapter, with its loss variants.

A batch holds pairs (prompt, chosen, rejected) as 2B rows: the B chosen sequences, then the B rejected ones
(`litft.data.Preference` builds them; `is_chosen` marks the rows). Both halves go through the model in one
forward. Each row's log-probability log pi(y|x) is summed over its completion tokens only (the prompt is masked
with -100, as in SFT). With pc, pr the policy's and rc, rr the reference's log-probs of chosen and rejected:

    h = (pc - rc) - (pr - rr)                                      (the implicit reward margin / beta)
    sigmoid  (DPO, default):  loss = -log sigmoid(beta h)
    label_smoothing = e > 0 (conservative DPO, cDPO):
                              loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    hinge    (SLiC):          loss = max(0, 1 - beta h)
    ipo      (arXiv 2310.12036, eq. 17): loss = (h' - 1 / (2 beta))^2, with h' the same margin from log-probs
                              averaged over each completion's tokens (as TRL does, with the IPO authors)
    simpo    (arXiv 2405.14734, reference-free): h = pc / |yc| - pr / |yr| - gamma / beta (length-averaged
                              log-probs, a target margin gamma = simpo_gamma); loss as sigmoid (label
                              smoothing applies), no reference forward at all.
    rewards: chosen = beta (pc - rc), rejected = beta (pr - rr) (simpo: beta pc / |yc|, beta pr / |yr|);
    margins = chosen - rejected; accuracy = share of pairs with chosen > rejected. Also logged: logps/chosen,
    logps/rejected, and preference_accuracy = share of pairs with pc > pr (the policy's own choice, reference-free:
    ~chance for a model that cannot tell the two apart).

The reference policy, without a second copy of the base:
  * a fresh adapter (B = 0, the usual start): the same model with its adapter layers taken out
    (`adapters_disabled`, litft/adapters/inject.py): exactly the base, no extra memory.
  * `--init_adapter` (an SFT run's final/) or trained biases (`--bias all/lora_only`): the adapter starts at the
    SFT weights and keeps training; the reference is the model with its trainable tensors at their starting
    values: a frozen copy of only those tensors (the adapter's size, a few MB) swapped in for the reference
    forward (`swapped_parameters`). The saved adapter is then the whole SFT + DPO adapter on the original
    base, so `generate --adapter_dir`, `merge_lora` and `export_peft` read it like any LoRA run.
  * `cache_reference: true`: each pair's reference log-probs are kept after their first forward (keyed by the
    pair's index in its dataset) and reused in later epochs: the reference never changes, so this only saves
    compute.
The reference forward runs in eval mode (no adapter dropout) and without gradients.

Any LoRA-family adapter: `use_dora: true` trains DoRA layers, `--quantize bnb.nf4` a QLoRA base,
`--loraplus_lr_ratio` LoRA+ groups; a new adapter method gets DPO as `class MyDPO(Preference, MyMethod)`.
Full fine-tuning is refused: it would need a full second copy of the model as its reference.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from litft.adapters.dora import DoRALinear
from litft.adapters.inject import adapter_modules, adapters_disabled
from litft.methods.full import Full
from litft.methods.lora import LoRA
from litft.methods.lora_plus import LoRAPlusGroups
from litft.utils import LitftError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, loss_type: str = "sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (the module docstring has the formulas).

    The inputs are per-sequence log-probs, (B,) each, already length-averaged for ipo and simpo;
    ref_* are ignored (may be None) for simpo."""
    if loss_type == "simpo":
        chosen_ratio, rejected_ratio = policy_chosen, policy_rejected
        h = chosen_ratio - rejected_ratio - simpo_gamma / beta
    else:
        chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        h = chosen_ratio - rejected_ratio
    if loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise LitftError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 512,
                   ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of log p(labels[t+1] | ..t) over the target positions, and each row's number of targets.

    hidden: (N, T, C) from `GPT(..., output="hidden")`; labels aligned with the inputs (position t predicts
    labels[t + 1]). Only target positions go through the head, in chunks whose logits are recomputed in
    backward, so at most one chunk x vocab of fp32 logits is alive at a time (as `chunked_cross_entropy`)."""
    targets = labels[:, 1:]
    keep = targets != ignore_index
    rows = keep.nonzero()[:, 0]
    h, t = hidden[:, :-1][keep], targets[keep]

    def chunk_logps(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(head(h_chunk).float(), t_chunk, reduction="none")

    parts = []
    for i in range(0, len(t), chunk_size):
        if torch.is_grad_enabled():
            parts.append(checkpoint(chunk_logps, h[i:i + chunk_size], t[i:i + chunk_size], use_reentrant=False))
        else:
            parts.append(chunk_logps(h[i:i + chunk_size], t[i:i + chunk_size]))
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    return sums + hidden.sum() * 0.0, keep.sum(1)  # the zero term keeps the graph connected (DDP) when no targets


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class Preference:
    """Mixin: DPO's training and validation steps over any adapter method. Put it first in the bases
    (`class DPO(Preference, LoRAPlusGroups, LoRA)`) so its steps win."""

    reports_perplexity = False  # the loop's val ppl is exp(token loss); a preference loss has none
    preference_pairs = True  # takes litft.data.Preference batches (the loop checks the data fits)

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, cache_reference: bool = False, **kwargs: Any) -> None:
        """Preference-tuning options (the adapter method's options apply too).

        Args:
            beta: strength of the pull towards the reference (DPO's beta; IPO's tau; SimPO's reward scale, ~2).
            loss_type: sigmoid (DPO), ipo, hinge, or simpo (reference-free, length-normalised, margin simpo_gamma).
            label_smoothing: conservative DPO: the assumed share of flipped labels, 0 <= e < 0.5 (sigmoid, simpo).
            simpo_gamma: SimPO's target reward margin.
            cache_reference: keep each pair's reference log-probs after their first forward and reuse them in
                later epochs (the reference never changes; this saves a forward per pair and epoch).
        """
        if isinstance(self, Full):
            raise LitftError("DPO with full fine-tuning is not supported: its reference would be a second full copy "
                             "of the model. Train an adapter instead: `litft finetune dpo` (LoRA; --use_dora true "
                             "for DoRA, --quantize bnb.nf4 for a QLoRA base)")
        super().__init__(**kwargs)
        if loss_type not in LOSS_TYPES:
            raise LitftError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
        if not beta > 0:
            raise LitftError(f"beta must be > 0, got {beta!r}: e.g. --beta 0.1")
        if not 0 <= label_smoothing < 0.5:
            raise LitftError(f"label_smoothing must satisfy 0 <= label_smoothing < 0.5, got {label_smoothing!r}")
        if label_smoothing and loss_type not in ("sigmoid", "simpo"):
            raise LitftError(f"label_smoothing applies to the sigmoid and simpo losses, not {loss_type}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.simpo_gamma, self.cache_reference = simpo_gamma, cache_reference
        self.reference_params: dict[str, torch.Tensor] | None = None  # set in configure_model when needed
        self.reference_cache: dict[tuple[str, int], torch.Tensor] = {}
        self.metric_sums: dict[str, torch.Tensor] = {}

    # -- the reference ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if getattr(self, "init_adapter", None) is not None or getattr(self, "bias", "none") != "none":
            # the reference is the model as it starts: keep only its trainable tensors (adapter-sized)
            self.reference_params = {n: p.detach().clone() for n, p in self.model.named_parameters()
                                     if p.requires_grad}
        elif not adapter_modules(self.model):  # nothing to switch off: the "reference" would be the policy itself
            raise LitftError(f"{type(self).__name__}: DPO needs adapter layers (its reference is the model without "
                             "them); this model has none. Use `litft finetune dpo` (LoRA / DoRA)")

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The reference policy: the same module, its adapters off or its trainable tensors at their start."""
        with torch.no_grad(), eval_mode(self.model):
            if self.reference_params is None:
                with adapters_disabled(self.model):
                    yield self.model
            else:
                with swapped_parameters(self.model, self.reference_params):
                    yield self.model

    def sequence_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (summed log-prob over completion tokens, number of completion tokens)."""
        hidden = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                       segment_ids=batch.get("segment_ids"), output="hidden")
        return sequence_logps(model.lm_head, hidden, batch["labels"])

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cached = None
        if self.cache_reference:
            keys = [(split, int(i)) for split, i in zip(("train" if self.training else "val",) * len(batch["pair_index"]),
                                                       batch["pair_index"].tolist())]
            if all(k in self.reference_cache for k in keys):
                cached = torch.stack([self.reference_cache[k] for k in keys]).to(batch["input_ids"].device)
        if cached is not None:
            return cached.t().reshape(-1)  # (B, 2) -> chosen rows, then rejected rows
        with self.reference_model() as ref:
            logps, _ = self.sequence_logps(ref, batch)
        if self.cache_reference:
            pairs = logps.view(2, -1).t().cpu()
            self.reference_cache.update({k: v for k, v in zip(keys, pairs)})
        return logps

    # -- steps -------------------------------------------------------------------------------------
    def preference_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed per-pair loss of the batch; adds the summed rewards to `metric_sums`."""
        if "is_chosen" not in batch:
            raise LitftError("DPO needs preference data: use --data litft.data.Preference (records with a prompt, "
                             "a chosen and a rejected response)")
        logps, counts = self.sequence_logps(self.model, batch)
        if self.loss_type in ("ipo", "simpo"):
            logps = logps / counts.clamp(min=1)
        ref = None
        if self.loss_type != "simpo":
            ref = self.reference_logps(batch)
            if self.loss_type == "ipo":
                ref = ref / counts.clamp(min=1)
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2) if ref is not None else (None, None)
        losses, chosen, rejected = preference_loss(pc, pr, rc, rr, self.loss_type, self.beta, self.label_smoothing,
                                                   self.simpo_gamma)
        for name, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                            ("rewards/margins", chosen - rejected), ("rewards/accuracy", (chosen > rejected).float()),
                            ("logps/chosen", pc.detach()), ("logps/rejected", pr.detach()),
                            ("preference_accuracy", (pc > pr).float())):  # the policy's own choice, no reference
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value.sum().detach()
        return losses.sum()

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.preference_step(batch)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.preference_step(batch), len(batch["input_ids"]) // 2

    def loss_count(self, batch: dict[str, torch.Tensor]) -> int:
        """The loop divides the summed loss (and the metrics) by this, summed over the global batch: pairs."""
        return len(batch["input_ids"]) // 2

    def pop_metric_sums(self) -> dict[str, torch.Tensor]:
        sums, self.metric_sums = self.metric_sums, {}
        return sums


@contextmanager
def swapped_parameters(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """`model` with some parameters' values replaced (by name), then restored: for no-grad forwards only."""
    params = dict(model.named_parameters())
    saved = {name: params[name].data for name in values}
    try:
        for name, value in values.items():
            params[name].data = value.to(params[name].device, params[name].dtype)
        yield
    finally:
        for name, data in saved.items():
            params[name].data = data


class DPO(Preference, LoRAPlusGroups, LoRA):
    """DPO and its variants (ipo, hinge, cDPO, SimPO) on a LoRA or DoRA adapter, over a full or quantized base."""

    def __init__(self, use_dora: bool = False, **kwargs: Any) -> None:
        """Which adapter DPO trains (all LoRA options apply: r, alpha, targets, quantize, init_adapter, ...).

        Args:
            use_dora: train DoRA layers (magnitude x direction) instead of plain LoRA.
        """
        super().__init__(**kwargs)
        self.use_dora = use_dora

    def make_adapter(self, name: str, linear: nn.Module) -> nn.Module:
        if self.use_dora:
            return DoRALinear(linear, self.r, self.alpha, self.dropout, self.use_rslora)
        return super().make_adapter(name, linear)
