"""DPO on several devices: two DDP processes (gloo, CPU) train the adapter one process trains on the same global
batch (each rank's summed loss is divided by the global number of pairs, all-reduced, as one process divides by
its accumulated pairs; the per-pair mean itself is checked against TRL in test_dpo.py)."""
from __future__ import annotations

import pytest
from tests.test_dpo import PAIRS, write_pairs
from tests.test_train import ddp_matches_one_process

pytestmark = pytest.mark.slow


def test_dpo_ddp_two_processes_matches_one(ckpt, tmp_path):
    path = write_pairs(tmp_path / "pairs.json", PAIRS, n=4)
    args = ["finetune", "dpo", "--checkpoint_dir", str(ckpt), "--data", "Preference", "--data.json_path", str(path),
            "--data.prompt_style", "plain", "--data.val_json_path", str(path), "--dropout", "0.0", "--lr", "0.01",
            "--train.max_steps", "3", "--train.global_batch_size", "8", "--eval.interval", "0",
            "--eval.final_validation", "false", "--eval.exact_match_samples", "0", "--logger_name", "none"]
    a = ddp_matches_one_process(lambda out: [*args, "--out_dir", str(out), "--train.micro_batch_size", "4"], tmp_path)
    assert any(k.endswith("lora_B") and a[k].abs().max() > 0 for k in a)
