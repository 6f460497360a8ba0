"""NEFTune (litft.methods.neft): per-sample lengths, the noise's bound and scale (statistically), no noise
in eval, the hook gone after every step, deterministic generation after training, bad alpha."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from litft.generate import generate
from litft.methods.run_dir import load_method
from litft.methods.neft import NEFT, neftune_noise, sample_lengths
from litft.utils import LitftError
from tests.helpers import make_task

IGNORE = -100


def padded_batch() -> dict[str, torch.Tensor]:
    """Right-padded like litft's collate: a masked prompt, then targets, then ignore-labelled padding."""
    labels = torch.full((3, 8), IGNORE)
    labels[0, 2:8] = 1  # real length 8 (no padding)
    labels[1, 3:5] = 1  # real length 5
    labels[2, 1:2] = 1  # real length 2
    return {"input_ids": torch.zeros(3, 8, dtype=torch.long), "labels": labels}


def test_sample_lengths_padded_and_packed():
    L = sample_lengths(padded_batch()).squeeze(-1)
    assert L.tolist() == [[8] * 8, [5] * 5 + [0] * 3, [2] * 2 + [0] * 6]
    packed = {"labels": torch.zeros(2, 7, dtype=torch.long),
              "segment_ids": torch.tensor([[1, 1, 1, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]])}
    assert sample_lengths(packed).squeeze(-1).tolist() == [[3, 3, 3, 2, 2, 1, 0], [7] * 7]


def test_noise_bound_and_scale_match_the_formula():
    """noise = alpha / sqrt(L·d) * U(-1, 1): every element within the bound, the bound reached, mean 0,
    variance bound^2 / 3, per sample length; none on padding."""
    torch.manual_seed(0)
    d, alpha = 256, 5.0
    emb = nn.Embedding(50, d).train()
    labels = torch.full((3, 400), IGNORE)
    labels[0, :] = 1
    labels[1, 10:100] = 1  # L = 100
    labels[2, 5:20] = 1  # L = 20
    ids = torch.randint(0, 50, (3, 400))
    lengths = sample_lengths({"labels": labels})
    with torch.no_grad(), neftune_noise(emb, alpha, lengths):
        noise = emb(ids) - emb.weight[ids]
    for row, L in ((0, 400), (1, 100), (2, 20)):
        bound = alpha / math.sqrt(L * d)
        n = noise[row, :L]
        assert n.abs().max() <= bound * (1 + 1e-6)
        assert n.abs().max() >= 0.99 * bound
        assert abs(n.mean().item()) < 0.02 * bound
        assert n.var().item() == pytest.approx(bound**2 / 3, rel=0.05)
        assert torch.all(noise[row, L:] == 0)
    assert not emb._forward_hooks


def test_zero_in_eval_and_hook_removed_even_on_error():
    emb = nn.Embedding(10, 8).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad(), neftune_noise(emb, 5.0, torch.full((1, 10, 1), 10.0)):
        assert torch.equal(emb(ids), emb.weight[ids])
    with pytest.raises(ValueError), neftune_noise(emb.train(), 5.0, torch.full((1, 10, 1), 10.0)):
        raise ValueError("inside a training step")
    assert not emb._forward_hooks


def block_input_noise(method: NEFT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What NEFT's training_step feeds the first block, minus the clean embedding."""
    seen = []
    handle = method.model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        method.training_step(batch)
    finally:
        handle.remove()
    return seen[0] - method.model.embed.weight[batch["input_ids"]].detach()


def test_method_adds_noise_in_training_steps_only(ckpt):
    method = NEFT(checkpoint_dir=ckpt, neftune_alpha=5.0)
    method.configure_model()
    batch = padded_batch()
    batch["input_ids"] = torch.randint(0, 320, (3, 8))
    noise = block_input_noise(method.train(), batch)
    d = method.model.config.n_embd
    assert noise[1, :5].abs().max() > 0 and noise[1, :5].abs().max() <= 5.0 / math.sqrt(5 * d) * (1 + 1e-6)
    assert torch.all(noise[1, 5:] == 0) and torch.all(noise[2, 2:] == 0)  # padding
    assert torch.all(block_input_noise(method.eval(), batch) == 0)  # eval mode: none
    assert not method.model.embed._forward_hooks


@pytest.mark.parametrize("alpha", [-5.0, 0.0])
def test_bad_alpha_is_a_clear_error(ckpt, alpha):
    with pytest.raises(LitftError, match="neftune_alpha must be > 0"):
        NEFT(checkpoint_dir=ckpt, neftune_alpha=alpha)


def test_training_then_generation_is_deterministic(ckpt, tmp_path):
    from litft.data import JSON
    from litft.train import EvalArgs, TrainArgs, finetune

    method = NEFT(checkpoint_dir=ckpt, r=8, alpha=16, dropout=0.0, lr=1e-2, warmup_steps=0)
    data = JSON(json_path=make_task(tmp_path / "task.json", n=96), prompt_style="plain")
    metrics = finetune(method, data, tmp_path / "out", TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=12),
                       EvalArgs(interval=0, initial_validation=True, max_new_tokens=4), logger_name="none")
    assert metrics["val_loss"] < metrics["val_loss_before"]
    assert not method.model.embed._forward_hooks
    prompt = torch.randint(0, 320, (6,))
    method.eval()
    first = generate(method.model, prompt, 8)
    assert torch.equal(generate(method.model, prompt, 8), first)
    reloaded = load_method(tmp_path / "out" / "final").eval()  # the saved adapter, no noise anywhere
    assert torch.equal(generate(reloaded.model, prompt, 8), first)
