"""The training stack: LoRA vs peft on litft's own model, training, resume, DDP, merge, bad input."""
from __future__ import annotations

import math

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litft.adapters.inject import inject_adapters
from litft.adapters.lora import LoRALinear
from litft.checkpoint import load_model, load_state_dict
from litft.cli import run
from litft.data import JSON
from litft.methods.lora import LoRA
from litft.methods.run_dir import load_method
from litft.train import EvalArgs, TrainArgs, finetune
from tests.helpers import hf_module_of

REPO = Path(__file__).resolve().parents[1]


def common_args(ckpt: Path, task: Path, out: Path, steps: int = 6, method: str = "lora") -> list[str]:
    return ["finetune", method, "--checkpoint_dir", str(ckpt), "--data", "JSON", "--data.json_path", str(task),
            "--data.prompt_style", "plain", "--out_dir", str(out), "--train.max_steps", str(steps),
            "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--lr", "3e-3",
            "--eval.interval", "0", "--eval.max_new_tokens", "4", "--logger_name", "none"]


def test_lora_on_litft_model_matches_peft(tmp_path):
    """litft's GPT + LoRALinear vs transformers + peft, same base weights (converted) and same A, B."""
    from peft import LoraConfig, get_peft_model

    from litft.convert import convert_to_litft
    from tests.test_model import make_hf_model

    hf = make_hf_model("llama3", tmp_path / "hf")
    convert_to_litft(tmp_path / "hf", tmp_path / "lit")
    model = load_model(tmp_path / "lit").eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)).eval()
    names = inject_adapters(model, targets, lambda name, lin: LoRALinear(lin, r=4, alpha=8))
    peft_modules = dict(peft_model.named_modules())
    torch.manual_seed(0)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            layer.lora_B.normal_(0, 0.1)  # nonzero B: the adapter path really contributes
            p = peft_modules["base_model.model." + hf_module_of(model.config, name)]
            p.lora_A["default"].weight.copy_(layer.lora_A)
            p.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randint(0, 160, (2, 12))
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x).logits
        base = load_model(tmp_path / "lit")(x)
        assert (ours - base).abs().max() > 1e-3
        assert (ours - theirs).abs().max() <= 1e-5
        for name in names:
            model.get_submodule(name).merge()
        assert (model(x) - theirs).abs().max() <= 1e-5


def test_lora_trains_only_adapters_and_loss_falls(ckpt, task, tmp_path):
    method = LoRA(checkpoint_dir=ckpt, r=8, alpha=16, dropout=0.0, lr=1e-2, warmup_steps=2)
    data = JSON(json_path=task, prompt_style="plain")
    metrics = finetune(method, data, tmp_path / "out", TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=30),
                       EvalArgs(interval=0, initial_validation=True, max_new_tokens=4), logger_name="tensorboard")
    assert metrics["val_loss"] < 0.7 * metrics["val_loss_before"]
    base = load_state_dict(ckpt)
    for name, p in method.model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            continue
        assert not p.requires_grad
        key = name.replace(".base_layer", "")
        assert torch.equal(p.detach(), base[key]), f"base weight {key} changed"
    final = tmp_path / "out" / "final"
    assert (final / "adapter.safetensors").stat().st_size < 200_000  # adapter only, not the base model
    assert (final / "run_config.yaml").is_file() and (tmp_path / "out" / "config.yaml").is_file()
    assert list((tmp_path / "out" / "logs" / "tensorboard").glob("version_*/events.out.tfevents.*"))


@pytest.mark.parametrize("method,precision", [("lora", "bf16-true"), ("lora", "bf16-mixed"), ("dora", "bf16-mixed"),
                                              ("full", "bf16-mixed")])
def test_low_precision_runs_train(method, precision, ckpt, task, tmp_path):
    """The hand-written autograd functions (LoRA/DoRA layers, RoPE, SwiGLU, RMSNorm, the fused loss) work
    in bf16 and under autocast: the run finishes and its validation loss falls."""
    args = common_args(ckpt, task, tmp_path / "out", steps=8, method=method)
    metrics = run([*args, "--precision", precision, "--eval.initial_validation", "true"])
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] < metrics["val_loss_before"]


@pytest.mark.parametrize("group_by_length", ["true", "false"])
def test_resume_reproduces_uninterrupted_run(ckpt, task, tmp_path, group_by_length):
    """Stop after step 3 (state saved), resume in a fresh process: same adapter and loss as straight through,
    with length-grouped batches (the default) and with plain random ones."""
    grouping = ["--train.group_by_length", group_by_length]
    args = common_args(ckpt, task, tmp_path / "a") + ["--train.save_interval", "3", "--dropout", "0.1", *grouping]
    full = run(args)
    resumed = run(common_args(ckpt, task, tmp_path / "b") + ["--dropout", "0.1", *grouping,
                                                              "--resume", str(tmp_path / "a" / "step-3")])
    a = load_state_dict_file(tmp_path / "a" / "final" / "adapter.safetensors")
    b = load_state_dict_file(tmp_path / "b" / "final" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["loss"] == resumed["loss"]


def test_thread_switching_between_steps_changes_no_bit(ckpt, task, tmp_path):
    """A single CPU process times its steps and switches between all threads and one (litft/threads.py: with two
    threads the first probe runs step 1 on two and step 2 on one): the adapter and the loss equal, bit for bit, those
    of a run on one thread throughout."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        switching = run(common_args(ckpt, task, tmp_path / "a"))
        torch.set_num_threads(1)
        one = run(common_args(ckpt, task, tmp_path / "b"))
    finally:
        torch.set_num_threads(threads)
    a = load_state_dict_file(tmp_path / "a" / "final" / "adapter.safetensors")
    b = load_state_dict_file(tmp_path / "b" / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert switching["loss"] == one["loss"]


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def litft_main(capsys, *args: str) -> tuple[int, str, str]:
    """`litft *args` (one process) through the console entry point, in this process: (exit code, stdout, stderr). A
    `litft` subprocess would spend seconds re-importing Lightning to print one error line."""
    from litft.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def litft_cmd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "litft.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same tensor names, each equal to fp32 reduction-order noise (<= 1e-5 + 1e-4 relative)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def ddp_matches_one_process(args_for, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Run `litft *args_for(out_dir)` on one process and on two DDP processes (gloo): the final adapters must be
    equal (<= 1e-5); returns the one-process adapter for the caller's own checks (that it trained). The one-process
    run is in this process (a `litft` subprocess would spend seconds re-importing Lightning just to start)."""
    run([str(a) for a in args_for(tmp_path / "one")])
    two = litft_cmd(*args_for(tmp_path / "two"), "--devices", "2", "--strategy", "ddp")
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_state_dict_file(tmp_path / "one" / "final" / "adapter.safetensors")
    b = load_state_dict_file(tmp_path / "two" / "final" / "adapter.safetensors")
    assert_same_adapter(a, b)
    return a


def test_ddp_two_processes_matches_one(shared_runs):
    """LoRA on 2 DDP processes trains the adapter of 1 process: the runs of shared_runs (conftest.py), which
    test_fsdp, test_ray and test_multinode compare against too."""
    a = load_state_dict_file(shared_runs.train("lora") / "final" / "adapter.safetensors")
    b = load_state_dict_file(shared_runs.train("lora", "--devices", "2", "--strategy", "ddp") / "final" /
                             "adapter.safetensors")
    assert_same_adapter(a, b)
    assert any(k.endswith("lora_B") and a[k].abs().max() > 0 for k in a)  # it trained


def test_merge_lora_gives_same_logits(ckpt, task, tmp_path):
    run(common_args(ckpt, task, tmp_path / "out") + ["--targets", "[all-linear, lm_head]"])
    final = tmp_path / "out" / "final"
    method = load_method(final)
    x = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        unmerged = method.model.eval()(x)
    run(["merge_lora", str(final), "--out_dir", str(tmp_path / "merged")])
    merged = load_model(tmp_path / "merged").eval()
    assert not merged.config.tie_embeddings  # lm_head was adapted: no longer the embedding
    with torch.no_grad():
        assert (merged(x) - unmerged).abs().max() <= 1e-5


def test_full_finetune_writes_a_complete_checkpoint(ckpt, task, tmp_path, capsys):
    run(["finetune", "full", *common_args(ckpt, task, tmp_path / "out")[2:], "--lr", "1e-3"])
    model = load_model(tmp_path / "out" / "final")
    assert not torch.equal(model.embed.weight, load_model(ckpt).embed.weight)
    final = tmp_path / "out" / "final"
    code, _, stderr = litft_main(capsys, "generate", final, "--prompt", "a", "--max_new_tokens", "5")
    assert code == 0, stderr[-2000:]


@pytest.mark.parametrize("case", ["unknown_key", "missing_ckpt", "empty_data", "malformed_data", "too_long", "nan"])
def test_bad_input_is_one_clear_error(case, ckpt, task, tmp_path, capsys):
    out = tmp_path / "out"
    args = common_args(ckpt, task, out)
    expect = {"unknown_key": "max_stpes", "missing_ckpt": "checkpoint directory not found",
              "empty_data": "empty", "malformed_data": "line", "too_long": "max_seq_length",
              "nan": "loss became"}[case]
    if case == "unknown_key":
        args += ["--train.max_stpes", "3"]
    elif case == "missing_ckpt":
        args[args.index("--checkpoint_dir") + 1] = str(tmp_path / "nope")
    elif case in ("empty_data", "malformed_data"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("" if case == "empty_data" else '{"instruction": "x", "output": "y"}\n{"instruction": \n')
        args[args.index("--data.json_path") + 1] = str(bad)
    elif case == "too_long":
        args += ["--train.max_seq_length", "4"]
    elif case == "nan":
        args += ["--lr", "1e38", "--optimizer", "SGD", "--train.max_norm", "null", "--train.save_interval", "1"]
    code, _, stderr = litft_main(capsys, *args)
    assert code != 0
    assert expect in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (out / "final").exists()
    if case == "nan":  # steps before the NaN saved fine; the failing step left nothing
        assert not list(out.glob(".*tmp"))


@pytest.mark.parametrize("quantize_embedding", [False, True])
def test_qlora_counts_the_parameters_of_the_model_not_of_its_packed_storage(quantize_embedding, tmp_path):
    """A Params4bit stores two 4-bit weights per byte, (n/2, 1) uint8; the start line counts n, as the model has."""
    pytest.importorskip("bitsandbytes")
    from litft.methods.qlora import QLoRA
    from litft.train import count_parameters
    from tests.helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", n_embd=128, intermediate_size=256)
    method = QLoRA(checkpoint_dir=ckpt, quantize_embedding=quantize_embedding)
    method.configure_model()
    assert {type(p).__name__ for p in method.parameters()} >= {"Params4bit"}
    n_lora = sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert count_parameters(method) == sum(p.numel() for p in load_model(ckpt).parameters()) + n_lora
