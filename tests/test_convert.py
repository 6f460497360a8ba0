"""Conversion inputs: sharded / .bin / local download / in place, streaming memory, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from litft.checkpoint import load_model
from litft.convert import convert_to_litft, download
from tests.test_model import V, make_hf_model

REPO = Path(__file__).resolve().parents[1]


def litft_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litft.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)


def logits_equal(hf_model, lit_dir) -> bool:
    x = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        return (load_model(lit_dir).eval()(x) - hf_model(x).logits).abs().max().item() <= 1e-4


def test_sharded_safetensors(tmp_path):
    hf = make_hf_model("llama3", tmp_path / "hf")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    (tmp_path / "sharded" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert_to_litft(tmp_path / "sharded", tmp_path / "lit")
    assert logits_equal(hf, tmp_path / "lit")


def test_pytorch_bin_input(tmp_path):
    hf = make_hf_model("qwen2", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    convert_to_litft(tmp_path / "hf", tmp_path / "lit")
    assert logits_equal(hf, tmp_path / "lit")


def test_download_from_a_local_snapshot_and_in_place(tmp_path):
    hf = make_hf_model("smollm2", tmp_path / "repo")
    (tmp_path / "repo" / "notes.txt").write_text("not part of a model download")
    out = download(str(tmp_path / "repo"), checkpoint_dir=tmp_path / "checkpoints")
    assert out == tmp_path / "checkpoints" / "repo"
    assert not (out / "notes.txt").exists()
    assert logits_equal(hf, out)
    # in place: the directory becomes a litft checkpoint
    convert_to_litft(tmp_path / "repo")
    assert logits_equal(hf, tmp_path / "repo")


def test_conversion_streams_one_copy(tmp_path):
    """Peak memory of converting ~200 MB of fp32 weights stays well below two copies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(cfg)
    size_mb = sum(p.numel() * 4 for p in model.state_dict().values()) / 1e6
    model.save_pretrained(tmp_path / "hf", max_shard_size="60MB")
    del model
    code = ("import resource, sys; from litft.convert import convert_to_litft; import torch;"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"convert_to_litft('{tmp_path / 'hf'}', '{tmp_path / 'lit'}');"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1e3)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    peak_mb = float(out.stdout.strip().splitlines()[-1])
    assert peak_mb < 1.5 * size_mb, f"conversion peak {peak_mb:.0f} MB for {size_mb:.0f} MB of weights"


@pytest.mark.parametrize("case", ["no_weights", "unsupported_arch", "truncated", "shape_mismatch", "not_a_dir"])
def test_bad_input_one_line_error_nothing_written(case, tmp_path):
    hf_dir, out = tmp_path / "hf", tmp_path / "out"
    make_hf_model("llama2", hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    expect = {"no_weights": "no weights found", "unsupported_arch": "unsupported architecture",
              "truncated": "truncated or corrupt", "shape_mismatch": "shape mismatch",
              "not_a_dir": "directory not found"}[case]
    source = hf_dir
    if case == "no_weights":
        (hf_dir / "model.safetensors").unlink()
    elif case == "unsupported_arch":
        cfg.update(model_type="bert", architectures=["BertForMaskedLM"])
    elif case == "truncated":
        data = (hf_dir / "model.safetensors").read_bytes()
        (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "shape_mismatch":
        cfg["intermediate_size"] = 80
    elif case == "not_a_dir":
        source = tmp_path / "missing"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    result = litft_cmd("convert_to_litft", str(source), "--out_dir", str(out))
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], result.stderr[-2000:]
    if case in ("no_weights", "truncated", "shape_mismatch"):
        assert str(hf_dir) in lines[0]  # names the file/directory at fault
    assert not out.exists() or not any(out.iterdir())


def test_convert_from_litft_bad_input(tmp_path):
    result = litft_cmd("convert_from_litft", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode == 1 and "checkpoint directory not found" in result.stderr
    assert not (tmp_path / "out").exists()
