"""Files from others are data, never code: hostile run directories, configs, PEFT folders, tokenizers, pickles and
damaged safetensors are each refused with one clear error, and the payload they carry never runs.

Every payload here would create `MARKER` if it ran; each test checks that it does not exist afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from litft.checkpoint import METHOD_CONFIG, iter_safetensors, load_model
from litft.cli import main
from litft.methods.lora import LoRA
from litft.methods.run_dir import load_method
from litft.tokenizer import Tokenizer
from litft.utils import LitftError


class Payload:
    """Unpickling this runs `touch <marker>` (what a hostile .bin / .pt carries)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class MyLoRA(LoRA):
    """A researcher's own method, defined (imported) by their code: loadable by its class path."""


@pytest.fixture(scope="module")
def run(ckpt, tmp_path_factory) -> Path:
    """A finished LoRA run directory (final/) on the tiny checkpoint; B randomised so the adapter matters."""
    method = LoRA(checkpoint_dir=ckpt, r=4, alpha=8, dropout=0.0, targets=["q", "v"])
    method.configure_model()
    with torch.no_grad():
        for n, p in method.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    d = tmp_path_factory.mktemp("run") / "final"
    d.mkdir()
    method.save_final(d)
    return d


def copy_run(run: Path, dest: Path, **method_config) -> Path:
    shutil.copytree(run, dest)
    if method_config:
        cfg = yaml.safe_load((dest / METHOD_CONFIG).read_text())
        cfg.update(method_config)
        (dest / METHOD_CONFIG).write_text(yaml.safe_dump(cfg))
    return dest


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must exit 1 with exactly one `litft: error:` line and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("litft: error:"), err
    return err


HOSTILE_CLASSES = [
    ("subprocess.Popen", {"args": "touch MARKER", "shell": True}),
    ("os.system", {"command": "touch MARKER"}),
    ("builtins.exec", {"source": "open('MARKER', 'w')"}),
    ("litft.cli.os.system", {"command": "touch MARKER"}),  # reached through a litft module
    ("litft.methods.lora.LoRAButNot", {}),  # looks like litft's, is not
    ("evil_litft_method.Method", {}),  # a module planted beside the run (see the test)
]


@pytest.mark.parametrize("class_path,init_args", HOSTILE_CLASSES, ids=[c for c, _ in HOSTILE_CLASSES])
def test_method_config_naming_other_code_is_refused(run, tmp_path, monkeypatch, capsys, class_path, init_args):
    init_args = {k: v.replace("MARKER", str(tmp_path / "MARKER")) if isinstance(v, str) else v
                 for k, v in init_args.items()}
    bad = copy_run(run, tmp_path / "final", class_path=class_path, init_args=init_args)
    (tmp_path / "evil_litft_method.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w')\nclass Method: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # an importable module named by the file: must not be imported
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LitftError, match="never imports code because a file names it"):
        load_method(bad)
    err = cli_error(capsys, "merge_lora", str(bad))
    assert class_path in err
    cli_error(capsys, "generate", str(run.parent), "--adapter_dir", str(bad), "--max_new_tokens", "2")
    assert not (tmp_path / "MARKER").exists()
    assert "evil_litft_method" not in sys.modules


@pytest.mark.parametrize("init_args,message", [
    ({"r": "many"}, "init_args do not fit"),
    ({"r": [1, 2]}, "init_args do not fit"),
    ({"rank": 4}, "rank"),  # not a LoRA option
    ({"optimizer_args": "x"}, "init_args do not fit"),
    ({"targets": {"class_path": "os.system", "init_args": {"command": "touch MARKER"}}}, "init_args do not fit"),
])
def test_method_config_with_wrong_init_args_is_refused(run, tmp_path, init_args, message):
    cfg = yaml.safe_load((run / METHOD_CONFIG).read_text())
    bad = copy_run(run, tmp_path / "final", init_args={**cfg["init_args"], **init_args})
    with pytest.raises(LitftError, match=message):
        load_method(bad)
    assert not Path("MARKER").exists()


@pytest.mark.parametrize("text", ["[1, 2", "- a list\n- not a mapping\n", "class_path: [1]\n",
                                  "!!python/object/apply:os.system ['touch MARKER']\n"])
def test_method_config_that_is_not_plain_data_is_refused(run, tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    bad = copy_run(run, tmp_path / "final")
    (bad / METHOD_CONFIG).write_text(text)
    with pytest.raises(LitftError, match=METHOD_CONFIG):
        load_method(bad)
    assert not (tmp_path / "MARKER").exists()


def test_adapter_hyperparameters_are_type_checked(run, tmp_path):
    from litft.adapters.multi import AdapterModel

    cfg = yaml.safe_load((run / METHOD_CONFIG).read_text())
    for key, value in [("r", "4"), ("alpha", [8]), ("use_rslora", "yes"), ("r", 0)]:
        bad = copy_run(run, tmp_path / f"{key}-{value}", init_args={**cfg["init_args"], key: value})
        with pytest.raises(LitftError, match=f"init_args.{key}|r must be >= 1"):
            AdapterModel(load_model(cfg["init_args"]["checkpoint_dir"])).load_adapter(bad, "x")


def test_own_method_class_loads_when_the_user_imported_it_or_passes_it(run, tmp_path):
    method = MyLoRA(checkpoint_dir=yaml.safe_load((run / METHOD_CONFIG).read_text())["init_args"]["checkpoint_dir"],
                    r=4, alpha=8, dropout=0.0, targets=["q", "v"])
    method.configure_model()
    d = tmp_path / "mine"
    d.mkdir()
    method.save_final(d)
    assert type(load_method(d)) is MyLoRA  # this module defines (imports) MyLoRA: the user's own choice
    # a run made by a class this process never imported: refused unless the caller names the class
    copy_run(d, tmp_path / "other", class_path="my_research.methods.MyLoRA")
    with pytest.raises(LitftError, match="pass method_class"):
        load_method(tmp_path / "other")
    assert type(load_method(tmp_path / "other", method_class=MyLoRA)) is MyLoRA


def test_run_directory_works_from_any_working_directory(run, tmp_path, monkeypatch):
    recorded = yaml.safe_load((run / METHOD_CONFIG).read_text())["init_args"]["checkpoint_dir"]
    assert Path(recorded).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert load_method(run).checkpoint_dir == Path(recorded)
    cfg = yaml.safe_load((run / METHOD_CONFIG).read_text())
    moved = copy_run(run, tmp_path / "moved", init_args={**cfg["init_args"], "checkpoint_dir": "gone/base"})
    with pytest.raises(LitftError, match="--checkpoint_dir"):
        load_method(moved)
    assert load_method(moved, checkpoint_dir=recorded).checkpoint_dir == Path(recorded)


def test_config_file_naming_a_foreign_class_is_refused_before_import(ckpt, task, tmp_path, monkeypatch, capsys):
    (tmp_path / "evil_data.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w')\nclass Data: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for data in ({"class_path": "evil_data.Data"}, {"class_path": "os.system", "init_args": {"command": "touch M"}}):
        cfg = tmp_path / "downloaded.yaml"
        cfg.write_text(yaml.safe_dump({"checkpoint_dir": str(ckpt), "data": data, "out_dir": str(tmp_path / "out")}))
        with pytest.raises(SystemExit) as e:
            main(["finetune", "lora", "--config", str(cfg)])
        assert e.value.code != 0
        assert "not one of litft's DataModules" in capsys.readouterr().err
    assert not (tmp_path / "MARKER").exists() and "evil_data" not in sys.modules
    assert not (tmp_path / "out").exists()


def test_optimizer_args_must_be_the_optimizers_own(ckpt):
    with pytest.raises(LitftError, match="does not take these options"):  # refused before any model loads
        LoRA(checkpoint_dir=ckpt, optimizer_args={"class_path": "os.system", "init_args": {"command": "x"}})
    with pytest.raises(LitftError, match="unknown optimizer"):
        LoRA(checkpoint_dir=ckpt, optimizer="os.system")
    method = LoRA(checkpoint_dir=ckpt, optimizer="Adam", optimizer_args={"eps": 1e-6})
    method.configure_model()
    assert method.configure_optimizers()[0].defaults["eps"] == 1e-6


def test_pickle_with_a_payload_is_refused(ckpt, run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    hf = tmp_path / "hf"
    main(["convert_from_litft", str(ckpt), str(hf)])
    (hf / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, hf / "pytorch_model.bin")
    err = cli_error(capsys, "convert_to_litft", str(hf), "--out_dir", str(tmp_path / "out"))
    assert "refused" in err and "pytorch_model.bin" in err
    # a PEFT adapter folder with a pickled adapter_model.bin
    peft = tmp_path / "peft"
    main(["export_peft", str(run), str(peft)])
    (peft / "adapter_model.safetensors").unlink()
    torch.save({"x": Payload(marker)}, peft / "adapter_model.bin")
    err = cli_error(capsys, "import_peft", str(peft), "--checkpoint_dir", str(ckpt))
    assert "refused" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_peft_config_with_unexpected_fields_is_refused(ckpt, run, tmp_path, capsys):
    peft = tmp_path / "peft"
    main(["export_peft", str(run), str(peft)])
    capsys.readouterr()
    cfg = json.loads((peft / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(ckpt).resolve())  # not null
    for extra in ({"modules_to_save": ["lm_head"]}, {"trust_remote_code": True}, {"peft_type": "os.system"},
                  {"layer_replication": [[0, 1]]}):
        (peft / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
        err = cli_error(capsys, "import_peft", str(peft), "--checkpoint_dir", str(ckpt))
        assert next(iter(extra)) in err or "os.system" in err
    (peft / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json" in cli_error(capsys, "import_peft", str(peft), "--checkpoint_dir", str(ckpt))
    assert not (peft / "litft").exists()


def test_chat_template_in_tokenizer_config_is_never_run(ckpt, tmp_path, capsys):
    """litft renders no template yet (prompt styles are Python): a tokenizer_config with a template that reaches
    Python internals loads, encodes and generates without its code ever running."""
    marker = tmp_path / "MARKER"
    hostile = shutil.copytree(ckpt, tmp_path / "ckpt")
    cfg = json.loads((hostile / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
                            "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    (hostile / "tokenizer_config.json").write_text(json.dumps(cfg))
    (hostile / "chat_template.jinja").write_text(cfg["chat_template"])
    tok = Tokenizer(hostile)
    assert tok.decode(tok.encode("Repeat the letter"), skip_special_tokens=True).strip() == "Repeat the letter"
    main(["generate", str(hostile), "--prompt", "Repeat", "--max_new_tokens", "3", "--prompt_style", "chatml"])
    assert not marker.exists()


def flip_bit(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "bit flip in a tensor", "bit flip in the header"])
def test_damaged_adapter_file_is_refused(run, tmp_path, capsys, damage):
    bad = copy_run(run, tmp_path / "final")
    path = bad / "adapter.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "bit flip in a tensor":
        flip_bit(path, 3)  # the last tensor's data: only the checksum can tell
    else:
        data = bytearray(path.read_bytes())
        data[12] = ord("}")  # breaks the JSON header
        path.write_bytes(bytes(data))
    with pytest.raises(LitftError, match="adapter.safetensors"):
        load_method(bad)
    err = cli_error(capsys, "merge_lora", str(bad))
    assert "adapter.safetensors" in err
    assert not (bad / "merged").exists()


def test_bit_flip_in_a_checkpoint_is_refused(ckpt, tmp_path):
    damaged = shutil.copytree(ckpt, tmp_path / "ckpt")
    flip_bit(damaged / "model.safetensors", 5)
    with pytest.raises(LitftError, match="checksum"):
        load_model(damaged)
    with pytest.raises(LitftError, match="checksum"):
        dict(iter_safetensors(damaged / "model.safetensors"))
    load_model(ckpt)  # the undamaged original still loads
