"""A probe of the command line with hostile or broken inputs: each must end in ONE `litft: error:` line
naming the problem and the fix, a non-zero exit, no traceback, and nothing written to out_dir.

The cases run in-process through `litft.cli.main` (a subprocess costs ~5 s of imports each); one
subprocess checks the real entry point. To add a case: append (args, expected substring) to CASES;
`{base}`, `{out}`, `{tmp}`, `{hf}` and the `{bad_*}` names below are filled in per test (a literal brace
is doubled: `{{`).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning  # noqa: F401  (imported now, so its log handler binds to pytest's stderr, not one test's capsys)
import pytest
import torch

from litft.cli import main
from tests.helpers import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "litft" / "demo" / "base"
DEMO = str(REPO / "config_hub" / "finetune" / "demo" / "lora.yaml")
# a tiny, quiet demo run: any case that wrongly passes validation trains for one step only
FT = ["finetune", "lora", "--config", DEMO, "--checkpoint_dir", "{base}", "--out_dir", "{out}",
      "--data.json_path", str(REPO / "litft/demo/data/train.json"),
      "--data.val_json_path", str(REPO / "litft/demo/data/test.json"), "--train.max_steps", "1",
      "--eval.initial_validation", "false", "--eval.final_validation", "false", "--eval.exact_match_samples", "0",
      "--logger_name", "none"]
GEN = ["generate", "{base}", "--max_new_tokens", "2"]

CASES: list = [  # (args, expected substring), or a pytest.param of one
    # method options (issue 14's list)
    (FT + ["--r", "0"], "r (the LoRA rank) must be an integer >= 1"),
    (FT + ["--r", "-1"], "--r 8"),
    (FT + ["--alpha", "-3"], "alpha must be > 0"),
    (FT + ["--dropout", "1.5"], "0 <= dropout < 1"),
    (FT + ["--dropout", "-0.1"], "0 <= dropout < 1"),
    (FT + ["--targets", "[q_prj]"], "Did you mean 'q_proj'"),
    (FT + ["--targets", "[]"], "no adapter targets"),
    (FT + ["--bias", "some"], "use one of none, all, lora_only"),
    (FT + ["--lr", "-1"], "lr > 0"),
    (FT + ["--optimizer", "os.system"], "unknown optimizer"),
    (FT + ["--quantize", "nf4"], "bnb.nf4"),
    (FT + ["--init_adapter", "{tmp}/nope"], "init_adapter"),
    (FT + ["--init_adapter", "{adapter_bad_yaml}"], "unreadable method_config.yaml"),
    (FT + ["--init_adapter", "{adapter_list}"], "unreadable method_config.yaml"),
    (FT + ["--init_adapter", "{adapter_int_args}"], "unreadable method_config.yaml"),
    (FT + ["--init_adapter", "{adapter_bad_alpha}"], "unreadable method_config.yaml"),
    (FT + ["--optimizer_args", '{{"foo": 1}}'], "unexpected keyword argument 'foo'"),
    (FT + ["--optimizer_args", '{{"lr": 1}}'], "use --lr"),
    (FT + ["--betas", "[0.9, 2]"], "Invalid beta parameter"),
    # run options
    (FT + ["--precision", "bf17"], "unknown precision 'bf17'"),
    # --strategy fsdp itself runs on CPU (FSDP2 over gloo: tests/test_fsdp.py); Lightning's FSDP1 variants do not
    pytest.param((FT + ["--strategy", "fsdp_cpu_offload"], "needs CUDA GPUs"),
                 id="finetune lora --strategy fsdp_cpu_offload (CPU)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fsdp is a valid strategy on GPUs")),
    (FT + ["--strategy", "fsdp", "--quantize", "bnb.nf4"], "cannot shard a quantized base"),
    (FT + ["--num_nodes", "0"], "num_nodes must be an integer >= 1"),
    (FT + ["--launcher", "slurm"], "unknown launcher 'slurm'"),
    (FT + ["--strategy", "nonsense"], "unknown strategy 'nonsense'"),
    (FT + ["--devices", "0"], "devices must be an integer >= 1"),
    (FT + ["--devices", "-1"], "devices must be an integer >= 1"),
    (FT + ["--logger_name", "mlflow"], "use tensorboard, csv, wandb"),
    (FT + ["--seed", "-1"], "seed must be an integer"),
    (FT + ["--train.log_interval", "0"], "train.log_interval must be >= 1"),
    (FT + ["--train.max_steps", "null", "--train.epochs", "0"], "train.epochs must be >= 1"),
    (FT + ["--train.save_interval", "-2"], "train.save_interval must be >= 1"),
    (FT + ["--eval.interval", "-1"], "eval.interval must be >= 0"),
    (FT + ["--train.max_norm", "-1"], "train.max_norm must be > 0"),
    (FT + ["--train.max_seq_length", "-5"], "train.max_seq_length must be >= 1"),
    (FT + ["--eval.exact_match_samples", "-1"], "eval.exact_match_samples >= 0"),
    (FT + ["--min_lr_ratio", "2"], "min_lr_ratio"),
    (FT + ["--resume", "{tmp}/nope"], "not a resumable checkpoint"),
    (FT + ["--data", "os.system"], "invalid value for --data: 'os.system'"),
    (FT + ["--data", "Nope"], "use e.g. --data JSON"),
    (FT + ["--train.micro_batch_size", "0"], "train.micro_batch_size"),
    (FT + ["--train.global_batch_size", "3"], "multiple of"),
    (FT + ["--eval.max_iters", "0"], "eval.max_iters >= 1"),
    (FT + ["--eval.max_new_tokens", "-1"], "eval.max_new_tokens must be >= 1"),
    (FT + ["--out_dir", "{tmp}/a_file"], "is a file, not a directory"),
    # wrong types and misspelt options: one line, not ~45 lines of usage
    (FT + ["--r", "abc"], "invalid value for --r: expected int, got 'abc'"),
    (FT + ["--train.max_steps", "x"], "invalid value for --train.max_steps"),
    (FT + ["--betas", "[0.9]"], "tuple with 2 elements"),
    (FT + ["--use_rslora", "maybe"], "expected bool"),
    (FT + ["--train.max_step", "5"], "Did you mean --train.max_steps?"),  # no abbreviations
    (FT + ["--train.max_stpes", "5"], "Did you mean --train.max_steps?"),
    (FT + ["--loraplus_lr_ratio", "3"], "it is an option of dora, lora_plus, neft"),
    (FT + ["--data.json_pat", "x"], "Did you mean --data.json_path?"),
    (["finetune", "lora"], "missing required argument(s) --checkpoint_dir, --data"),
    (["finetune", "lorra"], "Did you mean lora?"),
    (["finetune"], "`litft finetune` needs a command: one of lora"),
    ([], "`litft` needs a command"),
    (["export_peft", "{tmp}/nope"], "missing required argument(s) OUT_DIR"),
    (["finetune", "lora", "--config", "{tmp}/nope.yaml"], "config file not found"),
    (["finetune", "lora", "--config", "{tmp}/broken.yaml"], "invalid YAML"),
    (["finetune", "lora", "--config", "{tmp}/binary.yaml"], "invalid YAML"),
    (["finetune", "lora", "--config", "{tmp}/train5.yaml"], "train must be a mapping of its settings"),
    (FT + ["--train", "5"], "set its fields one by one (--train.NAME VALUE)"),
    (["finetune", "lora", "--config", "{tmp}/data5.yaml", "--checkpoint_dir", "{base}"],
     "invalid value for --data: '5'"),
    # the base model's files
    (FT + ["--checkpoint_dir", "{tmp}/nope"], "checkpoint directory not found"),
    (FT + ["--checkpoint_dir", "{bad_field}"], "unknown model config key 'n_layers'. Did you mean 'n_layer'?"),
    (FT + ["--checkpoint_dir", "{bad_family}"], "unknown family 'llamaa'. Did you mean 'llama'?"),
    (FT + ["--checkpoint_dir", "{bad_yaml}"], "model_config.yaml: not a valid YAML file"),
    (FT + ["--checkpoint_dir", "{bad_type}"], "n_layer must be int, got 'four'"),
    (FT + ["--checkpoint_dir", "{bad_size}"], "n_head must be an integer >= 1"),
    (FT + ["--checkpoint_dir", "{no_tokenizer}"], "No tokenizer found"),
    (FT + ["--checkpoint_dir", "{truncated}"], "truncated or corrupt"),
    (["generate", "{truncated}"], "truncated or corrupt"),
    # data
    (FT + ["--data.json_path", "{tmp}/empty.json"], "contains no samples"),
    (FT + ["--data.json_path", "{tmp}/missing.json"], "does not exist"),
    (FT + ["--data.json_path", "{tmp}/broken.yaml"], "not valid JSON"),
    (FT + ["--data.prompt_style", "nope"], "Unknown prompt style"),
    # generate (top_p 2 and temperature -1 were silently accepted)
    (GEN + ["--top_p", "2"], "top_p must be in (0, 1]"),
    (GEN + ["--top_p", "0"], "top_p must be in (0, 1]"),
    (GEN + ["--temperature", "-1"], "temperature must be >= 0"),
    (GEN + ["--max_new_tokens", "-1"], "max_new_tokens must be >= 1"),
    (GEN + ["--top_k", "0"], "top_k must be >= 1"),
    (GEN + ["--precision", "bf17"], "unknown precision 'bf17'"),
    (GEN + ["--top_k", "zz"], "invalid value for --top_k"),
    (["generate", "{bad_family}"], "unknown family"),
    (GEN + ["--adapter_dir", "{tmp}/nope"], "method_config.yaml"),
    # convert / download
    (["convert_to_litft", "{hf}", "--dtype", "fp8", "--out_dir", "{out}"], "unknown dtype 'fp8': use one of float32"),
    (["convert_to_litft", "{tmp}/nope", "--out_dir", "{out}"], "directory not found"),
    (["convert_to_litft", "{hf}", "--out_dir", "{tmp}/a_file"], "is a file, not a directory"),
    (["convert_from_litft", "{bad_family}", "{out}"], "unknown family"),
    (["convert_from_litft", "{base}", "{tmp}/a_file"], "is a file, not a directory"),
    (["download", "{tmp}/a_file", "--checkpoint_dir", "{out}"], "neither a local directory nor a Hugging Face repo id"),
    (["download", "{base}", "--checkpoint_dir", "{out}", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["merge_lora", "{tmp}/nope", "--out_dir", "{out}"], "method_config.yaml"),
    (["merge_lora", "{tmp}/a_file", "--out_dir", "{out}"], "method_config.yaml"),
    (["merge_lora", "{run}", "--out_dir", "{tmp}/a_file"], "is a file, not a directory"),
    # an adapter trained on the demo base, used with another base model
    (["merge_lora", "{run}", "--checkpoint_dir", "{other}", "--out_dir", "{out}"], "trained on as --checkpoint_dir"),
    (["generate", "{other}", "--adapter_dir", "{run}", "--max_new_tokens", "2"], "adapter weights do not fit"),
    (["export_peft", "{tmp}/a_file", "{out}"], "litft import_peft"),
    (["import_peft", "{tmp}/a_file", "--checkpoint_dir", "{base}", "--out_dir", "{out}"], "not found"),
    (["plot", "{tmp}/a_file", "--out", "{out}/plot.png"], "val/loss"),
]


def _case_id(case: tuple[list[str], str]) -> str | None:
    args = case[0]
    if not isinstance(args, list):  # a pytest.param carries its own id
        return None
    prefix = next((p for p in (FT, GEN) if args[:len(p)] == p), [])
    words = args[:1 + (prefix == FT)] + args[len(prefix):] if prefix else args
    return " ".join(Path(w).name if "/" in w else w for w in words)[:60] or "(nothing)"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The broken inputs: base models with a damaged model_config.yaml, data files, an HF checkpoint."""
    from litft.convert import convert_from_litft

    tmp = tmp_path_factory.mktemp("probe")
    good = (BASE / "model_config.yaml").read_text()
    names = {}
    for name, text in {"bad_field": good.replace("n_layer:", "n_layers:"),
                       "bad_family": good.replace("family: llama", "family: llamaa"),
                       "bad_yaml": "a: [1, 2\n: :", "bad_type": good.replace("n_layer: 4", "n_layer: four"),
                       "bad_size": good.replace("n_head: 6", "n_head: 0")}.items():
        assert text != good or name == "bad_yaml"
        shutil.copytree(BASE, tmp / name)
        (tmp / name / "model_config.yaml").write_text(text)
        names[name] = str(tmp / name)
    shutil.copytree(BASE, tmp / "no_tokenizer")
    (tmp / "no_tokenizer" / "tokenizer.json").unlink()
    shutil.copytree(BASE, tmp / "truncated")
    (tmp / "truncated" / "model.safetensors").write_bytes((BASE / "model.safetensors").read_bytes()[:1000])
    names.update(no_tokenizer=str(tmp / "no_tokenizer"), truncated=str(tmp / "truncated"))
    for name, text in {"adapter_bad_yaml": "a: [1,\n: :", "adapter_list": "- 1\n", "adapter_int_args": "init_args: 5\n",
                       "adapter_bad_alpha": "init_args: {r: 16, alpha: lots}\n"}.items():
        (tmp / name).mkdir()
        (tmp / name / "method_config.yaml").write_text(text)
        (tmp / name / "adapter.safetensors").write_text("x")
        names[name] = str(tmp / name)
    (tmp / "empty.json").write_text("[]")
    (tmp / "broken.yaml").write_text("{not: [yaml")
    (tmp / "a_file").write_text("x")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00 not text")
    (tmp / "data5.yaml").write_text("data: 5\n")
    (tmp / "train5.yaml").write_text("train: 5\n")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        convert_from_litft(BASE, tmp / "hf")
        main([a.format(base=BASE, out=tmp / "run") for a in FT] + ["--r", "2"])  # a real adapter run, one step
    make_checkpoint(tmp / "other")  # another base model (other shapes)
    return {"tmp": str(tmp), "base": str(BASE), "hf": str(tmp / "hf"), "run": str(tmp / "run" / "final"),
            "other": str(tmp / "other"), **names}


def _snapshot(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")} if d.exists() else set()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_one_line(case, files, tmp_path, capsys, one_thread):
    args, expected = case
    out = tmp_path / "out"
    argv = [a.format(out=out, **files) for a in args]
    tmp = Path(files["tmp"])
    before = _snapshot(tmp)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code not in (0, None)
    assert lines and lines[-1].startswith("litft: error:"), err[-2000:]
    assert "Traceback" not in err and "usage:" not in err
    assert expected in lines[-1], lines[-1]
    assert not out.exists() or not any(out.iterdir()), f"wrote {sorted(_snapshot(out))}"
    assert _snapshot(tmp) == before  # nothing written next to the inputs either (no model_config rewrite, ...)


def test_download_without_network_or_repo_is_one_line_without_retries(tmp_path, capsys):
    """Offline here (retried 5 times, ~25 s, then a 107-line traceback before); with a network, the Hub
    answers that the repository does not exist, which is never retried."""
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "litft-tests/no-such-model-xyz", "--checkpoint_dir", str(tmp_path)])
    elapsed = time.perf_counter() - t0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("litft: error:") and "litft-tests/no-such-model-xyz" in lines[0]
    assert "Hugging Face Hub" in lines[0]  # "cannot reach the Hugging Face Hub" or "no model repository ... on the"
    assert elapsed < 10, f"took {elapsed:.0f} s: retried?"
    assert not any(tmp_path.iterdir())


def test_hub_errors_name_cause_and_fix():
    """The Hub's own error classes (built as huggingface_hub raises them) map to one line each."""
    import httpx2  # huggingface_hub's HTTP library
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    from litft.convert import hub_error_line

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/a/b"))
    assert "no model repository 'a/b'" in hub_error_line("a/b", RepositoryNotFoundError("404", response=response))
    assert "accept its terms" in hub_error_line("a/b", GatedRepoError("403", response=response))
    assert "HF_HUB_OFFLINE" in hub_error_line("a/b", OfflineModeIsEnabled("offline"))
    assert "cannot reach" in hub_error_line("a/b", httpx2.ConnectError("Name or service not known"))
    with pytest.raises(KeyError):  # a bug is not dressed up as a user error
        hub_error_line("a/b", KeyError("x"))


def test_entry_point_prints_one_line(tmp_path):
    """The real console entry point (a subprocess: what a user sees): no usage block above the error."""
    args = ["finetune", "lora", "--config", DEMO, "--train.max_stpes", "5"]
    proc = subprocess.run([sys.executable, "-m", "litft.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("litft: error:") and "Did you mean" in proc.stderr
    assert not any(tmp_path.iterdir())
