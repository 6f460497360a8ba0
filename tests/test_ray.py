"""`--launcher ray`: the Fabric loop in Ray Train workers on a local CPU cluster trains the weights of the 2-process
DDP run; without Ray installed it is one clear error."""
from __future__ import annotations

import sys

import pytest

from litft.cli import run
from tests.test_fsdp import assert_same_weights, litft_here, train_args, trained


@pytest.mark.slow
def test_two_ray_workers_equal_two_ddp_processes(shared_runs, tmp_path):
    ray = pytest.importorskip("ray")
    ddp = shared_runs.train("lora", "--devices", "2", "--strategy", "ddp")  # conftest.py: shared with test_fsdp
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        run([*train_args(shared_runs.ckpt, shared_runs.task, tmp_path / "ray", "lora", 3), "--launcher", "ray",
             "--ray.num_workers", "2"])
    finally:
        ray.shutdown()
    assert_same_weights(trained(ddp, "lora"), trained(tmp_path / "ray", "lora"))
    # final/ written once, by rank 0, through the atomic swap: the files of any run, no temp directory left
    assert sorted(p.name for p in (tmp_path / "ray" / "final").iterdir()) == sorted(
        p.name for p in (ddp / "final").iterdir())
    assert not list((tmp_path / "ray").glob(".*"))


@pytest.mark.parametrize("case", ["no_ray", "too_many_workers", "bad_launcher"])
def test_ray_bad_input_is_one_clear_error(case, ckpt, task, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [*train_args(ckpt, task, out, "lora", 1), "--launcher", "ray"]
    if case == "no_ray":  # as on a machine without the extra: importing ray fails
        monkeypatch.setitem(sys.modules, "ray", None)
        code, stderr = litft_here(monkeypatch, capsys, *args)
        expect = 'pip install "litft[ray]"'
    elif case == "too_many_workers":
        code, stderr = litft_here(monkeypatch, capsys, *args, "--ray.num_workers", "10000")
        expect = "--ray.num_workers 10000: the local Ray cluster has"
    else:
        code, stderr = litft_here(monkeypatch, capsys, *args[:-1], "rya")
        expect = "unknown launcher 'rya': use fabric or ray"
    assert code == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("litft: error:")]
    assert len(lines) == 1 and expect in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not out.exists()
