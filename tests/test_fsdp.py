"""Several processes: DDP and FSDP2 (2 gloo CPU processes) train the weights of one process with the same global batch;
FSDP checkpoints are per-rank shards that resume exactly (kill -9 included), final/ is consolidated; QLoRA under DDP;
what cannot run is one clear error."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from litft.cli import run
from litft.train import read_resume_checkpoint, step_dirs
from tests.test_train import REPO, common_args, litft_main, load_state_dict_file

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
WEIGHTS = {"lora": "adapter.safetensors", "dora": "adapter.safetensors", "qlora": "adapter.safetensors",
           "full": "model.safetensors"}


def litft(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litft.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=REPO)


def litft_here(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`litft *args` through the console entry point, but in this process: (exit code, stderr). For an error that
    stops the run before any process or worker starts (a subprocess would spend seconds on imports to print one
    line); a run that gets as far as starting fails the test rather than launch processes from inside pytest."""
    import litft.train

    def started(*_, **__) -> None:
        raise AssertionError("the run started: nothing stopped it")

    monkeypatch.setattr(litft.train, "run_fabric", started)
    monkeypatch.setattr(litft.train, "launch_ray", started)
    code, _, err = litft_main(capsys, *args)
    return code, err


def trained(out: Path, method: str) -> dict[str, torch.Tensor]:
    return load_state_dict_file(out / "final" / WEIGHTS[method])


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max().item())


def train_args(ckpt: Path, task: Path, out: Path, method: str, steps: int = 3, *extra: str) -> list[str]:
    args = [*common_args(ckpt, task, out, steps=steps, method=method), "--eval.final_validation", "false", *extra]
    return args if method == "full" else [*args, "--dropout", "0.0"]


# -- N processes == 1 process ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("lora", ()),
    ("dora", ("--loraplus_lr_ratio", "4")),  # LoRA+ groups through DoRA; DoRA's magnitudes sharded as well
    ("full", ("--gradient_checkpointing", "true")),  # blocks recomputed in backward, inside their FSDP group
])
def test_ddp_and_fsdp_on_two_processes_equal_one_process(method, extra, shared_runs):
    """Same seed, same global batch of 8: 1 process (2 accumulation steps of 4), and 2 gloo processes under DDP
    (replicated) and FSDP2 (sharded) give the same trained weights, and final/ holds the same files. (The runs are
    shared_runs' (conftest.py): test_train, test_ray and test_multinode compare against the LoRA ones too.)"""
    one = shared_runs.train(method, *extra)
    for strategy in ("ddp", "fsdp"):
        out = shared_runs.train(method, *extra, "--devices", "2", "--strategy", strategy)
        assert_same_weights(trained(one, method), trained(out, method))
        assert sorted(p.name for p in (out / "final").iterdir()) == sorted(p.name for p in (one / "final").iterdir())


@pytest.mark.slow
def test_fsdp_equals_ddp_with_dropout_and_neftune(ckpt, task, tmp_path):
    """Noise drawn on each rank from the same seeded stream: FSDP2 and DDP must draw it identically (NEFTune on the
    embedding output, dropout on the adapters' input)."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        r = litft(*common_args(ckpt, task, out, steps=3, method="dora"), "--eval.final_validation", "false",
                  "--dropout", "0.1", "--neftune_alpha", "5", "--devices", "2", "--strategy", strategy)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[strategy] = trained(out, "dora")
    assert_same_weights(runs["ddp"], runs["fsdp"])


@pytest.mark.slow
def test_qlora_under_ddp_equals_one_process(tmp_path, task):
    """The 4-bit base is quantized identically on each rank (it is replicated, only the adapters' gradients are
    averaged): 2 DDP processes train the adapters of 1 process."""
    pytest.importorskip("bitsandbytes")
    from tests.helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", n_embd=128, intermediate_size=256)
    run(train_args(ckpt, task, tmp_path / "one", "qlora", 3))  # in this process: no imports to pay
    two = litft(*train_args(ckpt, task, tmp_path / "two", "qlora", 3), "--devices", "2", "--strategy", "ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(trained(tmp_path / "one", "qlora"), trained(tmp_path / "two", "qlora"))


# -- sharded checkpoints -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_kill_9_after_a_save_resumes_to_the_uninterrupted_weights(ckpt, task, tmp_path):
    """Each rank writes its shard into step-N/sharded/; kill -9 of the whole 2-process run once step-2 is complete,
    `--resume true` finishes with exactly the weights of the run that was never stopped (optimizer, scheduler,
    RNG for dropout, data position restored). Resuming with another world size or strategy is one clear error."""
    steps = 5
    args = lambda out: [*common_args(ckpt, task, out, steps=steps), "--eval.final_validation", "false",  # noqa: E731
                        "--dropout", "0.1", "--train.save_interval", "1", "--devices", "2", "--strategy", "fsdp"]
    straight = litft(*args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "straight" / "step-2").iterdir()) == ["method_config.yaml", "sharded"]
    assert sorted(p.name for p in (tmp_path / "straight" / "step-2" / "sharded").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # one shard file per rank

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "litft.cli", *args(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while proc.poll() is None and not (out / "step-2").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it launched
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it was killed: the test needs more steps"
    for d in step_dirs(out):
        read_resume_checkpoint(d, "adapter.safetensors", sharded=True)  # every step-N there is complete

    other_world = litft(*args(out), "--resume", "true", "--devices", "1")
    assert other_world.returncode == 1 and "Traceback" not in other_world.stderr, other_world.stderr[-3000:]
    assert "written by 2 process(es) and this run has 1" in other_world.stderr, other_world.stderr[-3000:]
    ddp = litft(*args(out)[:-1], "ddp", "--resume", "true")
    assert ddp.returncode == 1 and "with --strategy fsdp: resume it with the strategy" in ddp.stderr, ddp.stderr[-3000:]
    assert not (out / "final").exists()

    resumed = litft(*args(out), "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    a, b = trained(tmp_path / "straight", "lora"), trained(out, "lora")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- what cannot run -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["fsdp_qlora", "fsdp_lora_quantize", "too_many_devices", "fsdp_variant_on_cpu"])
def test_what_fsdp_cannot_serve_is_one_clear_error(case, ckpt, task, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    extra, expect = {
        "fsdp_qlora": (["--strategy", "fsdp", "--devices", "2"], "Use --strategy ddp"),
        "fsdp_lora_quantize": (["--strategy", "fsdp", "--quantize", "bnb.nf4"], "cannot shard a quantized base"),
        "too_many_devices": (["--strategy", "ddp", "--devices", str(len(os.sched_getaffinity(0)) + 1)], "CPU core(s)"),
        "fsdp_variant_on_cpu": (["--strategy", "fsdp_cpu_offload"], "needs CUDA GPUs"),
    }[case]
    method = "qlora" if case == "fsdp_qlora" else "lora"
    code, stderr = litft_here(monkeypatch, capsys, *common_args(ckpt, task, out, method=method), *extra)
    assert code == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("litft: error:")]
    assert len(lines) == 1 and expect in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not out.exists()
