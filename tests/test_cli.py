"""The command line: every config in config_hub parses, --help documents every option, typos are named."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from litft.cli import check_config_keys, commands, run
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
                  "neft": ("--loraplus_lr_ratio", "--quantize", "--neftune_alpha")}


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
