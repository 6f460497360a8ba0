"""DPO on several devices: two DDP processes (gloo, CPU) train the adapter one process trains on the same global
batch (each rank's summed loss is divided by the global number of pairs, all-reduced, as one process divides by
its accumulated pairs; the per-pair mean itself is checked against TRL in test_dpo.py)."""
from __future__ import annotations

import pytest
import torch

from tests.test_dpo import PAIRS, write_pairs
from tests.test_train import litft_cmd, load_state_dict_file

pytestmark = pytest.mark.slow


def test_dpo_ddp_two_processes_matches_one(ckpt, tmp_path):
    path = write_pairs(tmp_path / "pairs.json", PAIRS, n=4)
    args = ["finetune", "dpo", "--checkpoint_dir", str(ckpt), "--data", "Preference", "--data.json_path", str(path),
            "--data.prompt_style", "plain", "--data.val_json_path", str(path), "--dropout", "0.0", "--lr", "0.01",
            "--train.max_steps", "3", "--train.global_batch_size", "8", "--eval.interval", "0",
            "--eval.final_validation", "false", "--eval.exact_match_samples", "0", "--logger_name", "none"]
    one = litft_cmd(*args, "--out_dir", str(tmp_path / "one"), "--train.micro_batch_size", "4")
    assert one.returncode == 0, one.stderr[-2000:]
    two = litft_cmd(*args, "--out_dir", str(tmp_path / "two"), "--train.micro_batch_size", "4", "--devices", "2",
                    "--strategy", "ddp")
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_state_dict_file(tmp_path / "one" / "final" / "adapter.safetensors")
    b = load_state_dict_file(tmp_path / "two" / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("lora_B") and a[k].abs().max() > 0 for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
