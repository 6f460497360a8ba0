"""litft.cpu_kernels: the fp32 CPU matmuls of the hand-written autograd functions (oneDNN or torch), checked
against float64 products, for every layout those functions pass (transposed views, the swapped path)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litft import cpu_kernels as matmul

ONEDNN_OK = matmul._onednn_works()


@pytest.fixture(params=[False, pytest.param(True, marks=pytest.mark.skipif(not ONEDNN_OK, reason="no oneDNN op"))],
                ids=["torch", "onednn"])
def backend(request, monkeypatch):
    monkeypatch.setattr(matmul, "ONEDNN", request.param)
    monkeypatch.setattr(matmul, "MIN_MACS", 0)  # these small products would otherwise stay in torch
    return request.param


def _close(got, a, b, bias=None):
    ref = a.double() @ b.double() + (0 if bias is None else bias.double())
    assert got.shape == ref.shape and got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("layout", ["plain", "a transposed", "b transposed", "both transposed", "a sliced"])
def test_mm_matches_float64(backend, layout):
    torch.manual_seed(0)
    m, k, n = 37, 53, 29
    a = torch.randn(k, m).t() if "a transposed" in layout or "both" in layout else torch.randn(m, k)
    b = torch.randn(n, k).t() if "b transposed" in layout or "both" in layout else torch.randn(k, n)
    if layout == "a sliced":
        a = torch.randn(m, 2 * k)[:, ::2]
    _close(matmul.mm(a, b), a, b)


@pytest.mark.parametrize("big_input_transposed", [False, True])
def test_linear_matches_float64(backend, big_input_transposed):
    """x W^T (+ b); a transposed x with a smaller weight takes the swapped (W x^T)^T path."""
    torch.manual_seed(0)
    x = torch.randn(64, 300).t() if big_input_transposed else torch.randn(300, 64)
    w = torch.randn(8, 64)
    _close(matmul.linear(x, w), x, w.t())
    if not big_input_transposed:
        bias = torch.randn(8)
        _close(matmul.linear(x, w, bias), x, w.t(), bias)


def test_other_dtypes_and_empty_inputs_take_torch(backend):
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    assert torch.equal(matmul.mm(a, b), a @ b)
    e = matmul.mm(torch.randn(0, 7), torch.randn(7, 3))
    assert e.shape == (0, 3)


def test_env_override_is_validated():
    code = "import litft.cpu_kernels; print(litft.cpu_kernels.onednn_enabled())"
    env = dict(os.environ, LITFT_CPU_MATMUL="fast")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "LITFT_CPU_MATMUL='fast'" in p.stderr and "'onednn' or 'torch'" in p.stderr
    for choice, expect in [("torch", "False"), ("onednn", str(ONEDNN_OK))]:
        env["LITFT_CPU_MATMUL"] = choice
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert p.stdout.strip() == expect, p.stderr


def test_bad_env_value_is_one_cli_error_line(tmp_path):
    """Checked when the command starts (not at import), so the CLI reports it as one line (no traceback)
    and writes nothing."""
    env = dict(os.environ, LITFT_CPU_MATMUL="fast")
    cmd = [sys.executable, "-m", "litft.cli", "finetune", "lora", "--config", "config_hub/finetune/demo/lora.yaml",
           "--out_dir", str(tmp_path / "out")]
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "litft: error: LITFT_CPU_MATMUL='fast'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_small_products_stay_in_torch(monkeypatch):
    """Below MIN_MACS (oneDNN's per-shape kernel compilation would not pay off) it is torch's own matmul."""
    monkeypatch.setattr(matmul, "ONEDNN", True)
    a, b = torch.randn(64, 48), torch.randn(48, 40)
    assert 64 * 48 * 40 < matmul.MIN_MACS
    assert torch.equal(matmul.mm(a, b), torch.mm(a, b))


def _proc_cpuinfo(field: str) -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return ""


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or not _proc_cpuinfo("vendor_id"),
                    reason="checked against Linux x86's /proc/cpuinfo")
def test_torch_cpu_detection_agrees_with_proc_cpuinfo():
    """litft reads the CPU vendor and bf16 units from torch (any OS); on Linux x86 they agree with the kernel's
    /proc/cpuinfo, which litft parsed before (so the oneDNN choice and the bf16 note are unchanged here)."""
    from litft.train import cpu_bf16_units

    vendor = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(_proc_cpuinfo("vendor_id"))
    if vendor is not None:
        assert matmul.cpu_vendor() == vendor
    assert cpu_bf16_units() == bool({"avx512_bf16", "amx_bf16"} & set(_proc_cpuinfo("flags").split()))
