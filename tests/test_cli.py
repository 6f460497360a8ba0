"""The command line: every config in config_hub parses, --help documents every option, typos are named."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from litft.cli import check_config_keys, commands, main, run
from litft.utils import LitftError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "config_hub" / "finetune").glob("*/*.yaml"))


def test_config_hub_covers_every_family():
    dirs = {p.parent.name for p in CONFIGS}
    for family in ("llama-2-7b", "llama-3.2-1b", "mistral-7b", "qwen2.5-0.5b", "smollm2-135m", "tinyllama-1.1b",
                   "phi-3-mini", "gemma-2b", "pythia-160m", "demo"):
        assert family in dirs
        for method in ("lora", "full", "qlora"):
            assert (REPO / "config_hub" / "finetune" / family / f"{method}.yaml").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path, capsys):
    method = path.stem
    check_config_keys(yaml.safe_load(path.read_text()), commands()["finetune"][method], str(path))
    with pytest.raises(SystemExit) as exit_info:
        run(["finetune", method, "--config", str(path), "--train.max_steps", "3", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 3


# the options each command adds to the base module's: a method's own flags must show in its --help
METHOD_OPTIONS = {"lora": ("--quantize",), "qlora": ("--quantize",), "full": (),
                  "dora": ("--loraplus_lr_ratio", "--quantize", "--neftune_alpha"),
                  "lora_plus": ("--loraplus_lr_ratio", "--quantize"),
                  "neft": ("--loraplus_lr_ratio", "--quantize", "--neftune_alpha"),
                  "vera": ("--projection_seed", "--d_initial", "--quantize", "--neftune_alpha"),
                  "pissa": ("--pissa_niter", "--quantize", "--loraplus_lr_ratio", "--neftune_alpha"),
                  "dpo": ("--beta", "--loss_type", "--label_smoothing", "--use_dora", "--loraplus_lr_ratio", "--quantize",
                          "--init_adapter"),
                  "lora_fa": ("--lorafa_optimizer", "--quantize", "--neftune_alpha"),
                  "delta_lora": ("--delta_update_ratio", "--delta_start_step", "--loraplus_lr_ratio", "--neftune_alpha")}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_help_documents_every_option(method, capsys):
    assert set(METHOD_OPTIONS) == set(commands()["finetune"]) - {"_help"}  # every command is covered
    with pytest.raises(SystemExit):
        run(["finetune", method, "--help"])
    out = capsys.readouterr().out
    fn = commands()["finetune"][method]
    for name in inspect.signature(fn).parameters:
        assert f"--{name}" in out
    for line in fn.__doc__.split("Args:")[1].strip().splitlines():
        assert line.split(":", 1)[1].strip(), f"undocumented option: {line}"
    for option in METHOD_OPTIONS[method]:
        assert option in out


def test_config_typo_did_you_mean(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(LitftError, match="Did you mean 'train.max_steps'"):
        run(["finetune", "lora", "--config", str(bad)])
    bad.write_text("lora_r: 3\n")
    with pytest.raises(LitftError, match="unknown key 'lora_r'"):
        run(["finetune", "lora", "--config", str(bad)])


@pytest.mark.parametrize("method", ["lora", "full", "qlora", "dora", "lora_plus", "neft", "lora_fa", "delta_lora"])
def test_each_method_describes_itself(method, capsys):
    """A method class's own docstring is its description, never one inherited from Lightning."""
    from litft.cli import _finetune_methods

    cls_doc = {"lora": "LoRA:", "full": "Full fine-tuning:", "qlora": "QLoRA:", "dora": "DoRA:",
               "lora_plus": "LoRA+:", "neft": "NEFTune:",
               "lora_fa": "LoRA-FA:", "delta_lora": "Delta-LoRA:"}[method]
    assert commands()["finetune"][method].__doc__.startswith(cls_doc)
    with pytest.raises(SystemExit):
        run(["finetune", method, "--help"])
    out = capsys.readouterr().out
    assert cls_doc in out and "Hooks to be used" not in out
    with pytest.raises(SystemExit):
        run(["finetune", "--help"])
    assert "Hooks" not in capsys.readouterr().out
    assert _finetune_methods()["_help"]


def test_data_help_is_complete(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["finetune", "lora", "--data.help", "JSON"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    summary = next(line for line in out.splitlines() if line.startswith("Instruction data"))
    assert not summary.rstrip(":").endswith(("like", "of", "a", "the")), summary  # a whole sentence
    assert "(instruction, input, output)" in summary and "--data.json_path" in out


def test_parse_errors_are_one_line_and_help_stays_complete(capsys):
    """jsonargparse's errors: one LitftError (main prints it as one line), no usage block; --help unchanged."""
    with pytest.raises(LitftError, match=r"^unknown option --train.max_stpes. Did you mean --train.max_steps\?"):
        run(["finetune", "lora", "--train.max_stpes", "5"])
    with pytest.raises(LitftError, match="Did you mean --train.max_steps"):  # an abbreviation is not taken
        run(["finetune", "lora", "--train.max_step", "5"])
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "lora", "--r", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err == "litft: error: invalid value for --r: expected int, got 'x' (see `litft finetune lora --help`)\n"
    with pytest.raises(SystemExit) as exit_info:
        run(["finetune", "lora", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: litft") and "--train.max_steps" in out
    assert len(out.splitlines()) > 100  # the whole help, every option documented (see above)
