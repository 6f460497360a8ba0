"""Start-up: a CLI call imports only the command it names. `litft --help`, `litft finetune --help` and the errors
that need no command (unknown command or method, a missing --config file) import neither torch nor Lightning;
`litft plot` never imports torch. The summaries that stand in for the commands not imported match their docstrings.
(Which modules a call imports is checked, never how long it takes: timings are benchmarks/startup.py's.)"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse import CLI

from litft.cli import COMMANDS, FINETUNE_HELP, _Parser, commands, run
from litft.methods import METHOD_TABLE, load_object
from litft.utils import LitftError

REPO = Path(__file__).resolve().parents[1]

# argv -> the heavy modules that must not be imported; the call's exit code and a piece of its output
CASES = [
    ([], ("torch", "lightning"), 1, "`litft` needs a command"),
    (["--help"], ("torch", "lightning"), 0, "convert_from_litft"),
    (["fnetune"], ("torch", "lightning"), 1, "unknown command 'fnetune'. Did you mean finetune?"),
    (["finetune"], ("torch", "lightning"), 1, "`litft finetune` needs a command"),
    (["finetune", "--help"], ("torch", "lightning"), 0, "delta_lora"),
    (["finetune", "lra", "--help"], ("torch", "lightning"), 1, "unknown command 'lra'. Did you mean lora?"),
    (["finetune", "lora", "--config", "no-such.yaml"], ("torch", "lightning"), 1,
     "no-such.yaml: config file not found"),
    (["plot", "--help"], ("torch", "lightning"), 0, "--tag"),
    (["convert_to_litft", "--help"], ("lightning",), 0, "--dtype"),
    (["generate", "--help"], ("lightning",), 0, "--adapter_dir"),
]

PROBE = """
import sys
from litft.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("EXIT", e.code)
print("IMPORTED", *[m for m in ("torch", "lightning") if m in sys.modules])
"""


@pytest.mark.parametrize("argv,absent,code,shown", CASES, ids=[" ".join(c[0]) or "(none)" for c in CASES])
def test_call_imports_only_what_it_needs(argv, absent, code, shown):
    p = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100"))
    lines = p.stdout.splitlines()
    assert f"EXIT {code}" in lines and shown in p.stdout + p.stderr, p.stdout + p.stderr
    imported = lines[-1].split()[1:]
    assert not set(absent) & set(imported), f"`litft {' '.join(argv)}` imported {imported}"


def test_summaries_match_the_docstrings():
    """The tables' summaries are what `litft --help` / `litft finetune --help` show: each is its function's or
    class's docstring's first line (as jsonargparse reads it), so the lazy help cannot drift from the code."""
    for name, (path, summary) in COMMANDS.items():
        assert summary == inspect.getdoc(load_object(path)).splitlines()[0], name
    from litft.methods import METHODS

    assert list(METHODS) == list(METHOD_TABLE)
    for name, (path, summary) in METHOD_TABLE.items():
        cls = METHODS[name]
        assert f"{cls.__module__}:{cls.__name__}" == path
        assert summary == inspect.cleandoc(vars(cls)["__doc__"]).splitlines()[0], name


def help_text(capsys, call) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "--help"]])
def test_lazy_help_is_the_full_help(argv, capsys, monkeypatch):
    """`litft --help` from the stand-ins prints exactly what the tree of real commands prints."""
    monkeypatch.setenv("COLUMNS", "100")
    lazy = help_text(capsys, lambda: run(argv))
    full = help_text(capsys, lambda: CLI(commands(), args=argv, parser_class=_Parser, prog="litft",
                                         allow_abbrev=False, exit_on_error=False))
    assert lazy == full and FINETUNE_HELP in full


def test_only_the_named_command_is_real():
    tree = commands(["plot", "--help"])
    assert tree["plot"] is load_object(COMMANDS["plot"][0])
    assert tree["merge_lora"].__module__ == "litft.cli"  # a stand-in
    assert list(tree) == list(commands()) and list(tree["finetune"]) == list(commands()["finetune"])


def test_an_option_of_another_command_is_named():
    """The stand-ins have no options: a misplaced option's "it is an option of ..." builds the full tree."""
    with pytest.raises(LitftError, match=r"^unknown option --prompt for `litft merge_lora`: it is an option of "
                                         r"generate \(see `litft merge_lora --help`\)$"):
        run(["merge_lora", "--prompt", "x"])
    with pytest.raises(LitftError, match=r"^unknown option --nope \(see `litft plot --help`\)$"):
        run(["plot", "--nope"])
