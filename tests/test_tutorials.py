"""The tutorials' code runs (on a tiny checkpoint) and does what it says."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from litft.data import JSON
from litft.train import EvalArgs, TrainArgs, finetune
from tests.helpers import make_checkpoint, make_task

REPO = Path(__file__).resolve().parents[1]


def load_tutorial(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tutorials" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_method_subclass_trains_with_its_own_loss(tmp_path):
    tutorial = load_tutorial("custom_method")
    ckpt = make_checkpoint(tmp_path / "ckpt")
    method = tutorial.SmoothedLoRA(checkpoint_dir=ckpt, smoothing=0.1, z_loss=0.0, dropout=0.0, lr=1e-2)
    method.configure_model()
    batch = {"input_ids": torch.randint(0, 320, (2, 9)), "labels": torch.randint(0, 320, (2, 9))}
    batch["labels"][:, :3] = -100
    with torch.no_grad():  # the override computes exactly label-smoothed CE (summed)
        logits = method.model(batch["input_ids"])[:, :-1]
        ref = F.cross_entropy(logits.reshape(-1, 320), batch["labels"][:, 1:].reshape(-1), label_smoothing=0.1,
                              reduction="sum")
        assert torch.allclose(method.training_step(batch), ref, rtol=1e-5)
    data = JSON(json_path=make_task(tmp_path / "task.json"), prompt_style="plain")
    metrics = finetune(method, data, tmp_path / "out", TrainArgs(global_batch_size=8, micro_batch_size=8, max_steps=15),
                       EvalArgs(interval=0, initial_validation=True, max_new_tokens=2), logger_name="none")
    assert metrics["val_loss"] < metrics["val_loss_before"]
    assert (tmp_path / "out" / "final" / "adapter.safetensors").is_file()
