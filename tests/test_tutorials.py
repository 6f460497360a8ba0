"""The tutorials' code runs (on a tiny checkpoint) and the pages say what is true: every `litft ...` and
`python tutorials/custom_method.py ...` command they show parses, writes only under ignored directories,
every repository path they name exists, and numbers they quote from another file are in that file."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from litft.cli import commands, run
from litft.data import JSON
from litft.train import EvalArgs, TrainArgs, finetune
from litft.utils import LitftError
from tests.helpers import make_checkpoint, make_task

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "tutorials").glob("*.md"))]
CUSTOM_METHOD = REPO / "tutorials" / "custom_method.py"
FINETUNE_METHODS = sorted(set(commands()["finetune"]) - {"_help"})


def load_tutorial(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tutorials" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_method_subclass_trains_with_its_own_loss(tmp_path):
    tutorial = load_tutorial("custom_method")
    ckpt = make_checkpoint(tmp_path / "ckpt")
    method = tutorial.SmoothedLoRA(checkpoint_dir=ckpt, smoothing=0.1, z_loss=0.0, dropout=0.0, lr=1e-2)
    method.configure_model()
    batch = {"input_ids": torch.randint(0, 320, (2, 9)), "labels": torch.randint(0, 320, (2, 9))}
    batch["labels"][:, :3] = -100
    with torch.no_grad():  # the override computes exactly label-smoothed CE (summed)
        logits = method.model(batch["input_ids"])[:, :-1]
        ref = F.cross_entropy(logits.reshape(-1, 320), batch["labels"][:, 1:].reshape(-1), label_smoothing=0.1,
                              reduction="sum")
        assert torch.allclose(method.training_step(batch), ref, rtol=1e-5)
    data = JSON(json_path=make_task(tmp_path / "task.json"), prompt_style="plain")
    metrics = finetune(method, data, tmp_path / "out", TrainArgs(global_batch_size=8, micro_batch_size=8, max_steps=15),
                       EvalArgs(interval=0, initial_validation=True, max_new_tokens=2), logger_name="none")
    assert metrics["val_loss"] < metrics["val_loss_before"]
    assert (tmp_path / "out" / "final" / "adapter.safetensors").is_file()


# ------------------------------------------------------------------------------------------ reading the pages
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return FENCE.findall(text)


def inline_spans(text: str) -> list[str]:
    """Inline code outside fenced blocks, whitespace collapsed (a span may wrap over two lines)."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", FENCE.sub("", text))]


def shell_commands(body: str) -> list[list[str]]:
    """The command lines of a shell block as words: continuations joined, comments dropped, `a && b` split,
    and the body of a `for VAR in A B C; do ... done` loop repeated once per value."""
    found, loop = [], None
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "for" and words[2] == "in":
            loop = (words[1], [w.rstrip(";") for w in words[3:] if w != "do"])
        elif words[0] == "done":
            loop = None
        elif loop:
            found += [[w.replace("$" + loop[0], value) for w in words] for value in loop[1]]
        else:  # `a && b`: each its own command
            found += [list(g) for is_and, g in itertools.groupby(words, lambda w: w == "&&") if not is_and]
    return found


def expand(words: list[str]) -> list[list[str]]:
    """Make a documented command line concrete: drop `...` ("your other options"), unwrap an optional
    `[--flag value]`, and expand `a|b` alternatives and `<method>` into one command each."""
    words = [w for i, w in enumerate(words) if w != "..." or words[i - 1].startswith("--")]  # keep --prompt "..."
    unwrapped, opened = [], False
    for w in words:
        if w.startswith("[-"):
            w, opened = w[1:], True
        if opened and w.endswith("]"):
            w, opened = w[:-1], False
        unwrapped.append(w)
    options = [FINETUNE_METHODS if w == "<method>" else w.split("|") if "|" in w else [w] for w in unwrapped]
    return [list(c) for c in itertools.product(*options)]


# A word a page uses for "your value here": HF_DIR, RUN/final, out_dir/config.yaml (JSON is a real value).
PLACEHOLDER = re.compile(r"(^|/)([A-Z][A-Z_]*|out_dir)(/|$)")


def is_fragment(words: list[str]) -> bool:
    """A mention, not a command line: a placeholder in it, or just a command's name (`litft plot`)."""
    return any(PLACEHOLDER.search(w) and w != "JSON" for w in words) or all(w.isidentifier() for w in words)


def page_commands(program: tuple[str, ...]) -> list[tuple[str, list[str], bool]]:
    """(where, words, complete) of every command line of `program` the pages show; `complete` is
    false for an inline mention (`litft merge_lora RUN/final`, `litft plot`): see is_fragment."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(REPO)
        for lang, body in fenced_blocks(text):
            if lang in ("bash", "sh", ""):
                found += [(f"{name}: {shlex.join(w)}", w, True) for c in shell_commands(body) for w in expand(c)
                          if tuple(w[:len(program)]) == program]
        for span in inline_spans(text):
            try:
                words = shlex.split(span)
            except ValueError:
                continue
            if tuple(words[:len(program)]) == program:
                found += [(f"{name}: `{shlex.join(w)}`", w, not is_fragment(w)) for w in expand(words)]
    return found


LITFT_COMMANDS = page_commands(("litft",))
CUSTOM_METHOD_COMMANDS = page_commands(("python", "tutorials/custom_method.py")) + [
    (f"custom_method.py docstring: {shlex.join(w)}", w, True)
    for c in shell_commands(load_tutorial("custom_method").__doc__) if c[:2] == ["python", "tutorials/custom_method.py"]
    for w in expand(c)]


def ignored_roots() -> set[str]:
    """The top-level directories .gitignore ignores (`/out/` -> out)."""
    lines = (REPO / ".gitignore").read_text().split()
    return {line.strip("/") for line in lines if line.startswith("/") and line.endswith("/")}


def assert_writes_only_ignored(config: dict, where: str) -> None:
    roots = ignored_roots()
    for key in ("out_dir", "out"):
        target = config.get(key)
        if target is not None:
            assert Path(target).parts[0] in roots, f"{where}: {key} {target} is not under an ignored directory {roots}"


def capture(fn, *args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        fn(*args)
    assert exit_.value.code == 0, out.getvalue()
    return out.getvalue()


_OPTIONS: dict[tuple[str, ...], set[str]] = {}
SUBCLASS_EXAMPLE = {"--data": ("JSON", "Conversations", "HF")}  # a subclass-typed option documents its keys per class: --data.help JSON
_SUBCLASS_OPTIONS: dict[tuple[str, str, str], set[str]] = {}  # (option, its base class, example): the keys documented


def options(path: tuple[str, ...]) -> set[str]:
    """Every option `litft <path> --help` documents, spelt out (argparse would also take an abbreviation)."""
    if path not in _OPTIONS:
        text = capture(run, [*path, "--help"])
        names = set(re.findall(r"--[\w.]+", text))
        for option, examples in SUBCLASS_EXAMPLE.items():
            if f"{option}.help" in names:
                # `--data.help JSON` documents JSON's keys, the same under every command whose --data takes that
                # base class: asked once per base class (each ask rebuilds the whole CLI, ~0.3 s)
                base = re.search(rf"{re.escape(option)}\.help .*?subclass of\s+(\w+)", text, re.S).group(1)
                for example in examples:
                    key = (option, base, example)
                    if key not in _SUBCLASS_OPTIONS:
                        _SUBCLASS_OPTIONS[key] = set(re.findall(r"--[\w.]+",
                                                                capture(run, [*path, f"{option}.help", example])))
                    names |= _SUBCLASS_OPTIONS[key]
        _OPTIONS[path] = names
    return _OPTIONS[path]


def command_path(argv: list[str]) -> tuple[str, ...]:
    node, path = commands(), []
    for word in argv:
        if not isinstance(node, dict):
            break
        assert word in node, f"{word!r} is not a litft command here; commands: {sorted(node)}"
        node, path = node[word], path + [word]
    assert callable(node), f"`litft {' '.join(path)}` is not a complete command"
    return tuple(path)


# ------------------------------------------------------------------------------------------ the commands
def test_the_pages_show_commands():
    """The extraction itself: a regression in it would otherwise pass every test below vacuously."""
    shown = {w[1] for _, w, _ in LITFT_COMMANDS}
    assert {"finetune", "merge_lora", "generate", "export_peft", "import_peft", "convert_from_litft", "plot",
            "download", "convert_to_litft"} <= shown
    assert {w[2] for _, w, _ in LITFT_COMMANDS if w[1] == "finetune"} >= set(FINETUNE_METHODS)
    assert sum(complete for *_, complete in LITFT_COMMANDS) >= 30
    assert len(CUSTOM_METHOD_COMMANDS) >= 3


@pytest.mark.parametrize("where, argv, complete", LITFT_COMMANDS, ids=[c[0] for c in LITFT_COMMANDS])
def test_every_litft_command_on_the_pages_parses(where, argv, complete):
    """Every option a command shows is one its --help documents, spelt in full; a complete command parses as
    typed (`--print_config`: parsed and validated, nothing run) and writes only under an ignored directory."""
    argv = argv[1:]
    path = command_path(argv)
    for word in argv:
        flag = word.split("=")[0]
        if flag.startswith("--"):
            assert flag in options(path), f"{where}: `litft {' '.join(path)}` has no option {flag}"
    if not complete:
        return
    if any(w == "--help" or w.endswith(".help") for w in argv):
        capture(run, argv)
        return
    config = yaml.safe_load(capture(run, [*argv, "--print_config"]))
    assert_writes_only_ignored(config, where)


def test_the_methods_tutorial_runs_every_run_of_its_table():
    """Each row of the results table (and so each curve of the PNG) is a run its commands make."""
    text = (REPO / "tutorials" / "methods.md").read_text()
    table = text.split("### Results on the demo")[1].split("![")[0]
    rows = [line.split("|")[1].split("(")[0].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    runs = {argv[argv.index("--out_dir") + 1] for where, argv, _ in LITFT_COMMANDS
            if where.startswith("tutorials/methods.md") and "--out_dir" in argv}
    for row in rows:
        name = "composed" if "+" in row else row
        assert f"out/methods/{name}" in runs, f"methods.md's table has {row!r} but no command writes out/methods/{name}"


def test_the_dpo_tutorial_is_one_chain_of_runs():
    """tutorials/dpo.md: the DPO config starts from the adapter its SFT command writes, and the plot reads the
    DPO run's directory."""
    cmds = [argv for where, argv, _ in LITFT_COMMANDS if where.startswith("tutorials/dpo.md: litft")]
    sft = next(a for a in cmds if a[1:3] == ["finetune", "lora"])
    dpo = next(a for a in cmds if a[1:3] == ["finetune", "dpo"])
    config = yaml.safe_load((REPO / dpo[dpo.index("--config") + 1]).read_text())
    assert config["init_adapter"] == sft[sft.index("--out_dir") + 1] + "/final"
    plots = [a for a in cmds if a[1] == "plot"]
    assert plots and all(config["out_dir"] in a for a in plots)


@pytest.mark.parametrize("where, argv, complete", CUSTOM_METHOD_COMMANDS, ids=[c[0] for c in CUSTOM_METHOD_COMMANDS])
def test_custom_method_commands_parse(where, argv, complete, monkeypatch):
    """The tutorial's own command line (jsonargparse over `main`) takes every flag the pages show."""
    monkeypatch.setattr(sys, "argv", [str(CUSTOM_METHOD), *argv[2:], "--print_config"])
    config = yaml.safe_load(capture(runpy.run_path, str(CUSTOM_METHOD), None, "__main__"))
    assert_writes_only_ignored(config, where)


def test_custom_method_cli_documents_its_options(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(CUSTOM_METHOD), "--help"])
    text = capture(runpy.run_path, str(CUSTOM_METHOD), None, "__main__")
    for flag in ("--checkpoint_dir", "--json_path", "--val_json_path", "--out_dir", "--max_steps", "--smoothing",
                 "--z_loss", "--precision"):
        assert flag in text
    assert "label smoothing epsilon" in text  # help from main's docstring


def test_custom_method_passes_precision_to_finetune(tmp_path):
    """`--precision` reaches the Fabric launcher: an invalid one is refused before any step runs."""
    tutorial = load_tutorial("custom_method")
    with pytest.raises(LitftError, match="no-such-precision"):
        tutorial.main(checkpoint_dir=make_checkpoint(tmp_path / "ckpt"), json_path=make_task(tmp_path / "t.json", n=16),
                      val_json_path=None, out_dir=tmp_path / "out", max_steps=1, precision="no-such-precision")


# ------------------------------------------------------------------------------------------ paths and numbers
REPO_DIRS = ("litft", "tutorials", "benchmarks", "config_hub", "tests")
LITFT_DIRS = tuple(p.name for p in (REPO / "litft").iterdir() if p.is_dir() and not p.name.startswith("__"))
PATH_TOKEN = re.compile(r"[\w.<>/-]+")


def named_paths(page: Path) -> set[str]:
    """Repository paths a page names in code: `litft/...`, `config_hub/...`, `methods/lora.py` (inside
    litft/), a bare `custom_method.py` next to the page, and images it shows."""
    text = page.read_text(encoding="utf-8")
    code = " ".join(inline_spans(text) + [body for _, body in fenced_blocks(text)])
    names = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    for token in PATH_TOKEN.findall(code):
        token = token.rstrip(".")
        first = token.split("/")[0]
        if first in REPO_DIRS + LITFT_DIRS and "/" in token or re.fullmatch(r"[\w-]+\.(py|md|png|cpp)", token):
            names.update(token.replace("<method>", m) for m in (FINETUNE_METHODS if "<method>" in token else [""]))
    return names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_path_a_page_names_exists(page):
    names = named_paths(page)
    assert names, "no paths found: the extraction is broken"
    bases = [REPO, REPO / "litft", page.parent, *(REPO / "litft" / d for d in LITFT_DIRS)]
    missing = [n for n in sorted(names) if not any((base / n).exists() for base in bases)]
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {missing}"


# (page, its section, the file the numbers come from, the sections of that file they come from); a long
# benchmark file holds many numbers, so each quote is matched only against the sections it quotes
BENCH = "benchmarks/README.md"
QUOTED = [
    ("README.md", "## Speed and memory", BENCH, ["### Current code (third session)", "## DoRA vs LoRA",
                                                 "## Greedy decoding", "## Shared cores", "## Real SFT batches",
                                                 "### bf16 on this CPU",
                                                 "## Issue 21, fifth session",
                                                 "## Issue 21 on the fourth session's machine"]),
    ("README.md", "### QLoRA: a quantized frozen base", "tutorials/qlora.md", ["## Modes", "## How it works", "## Measured"]),
    ("tutorials/methods.md", "### What DoRA costs (benchmark)", BENCH, ["## Machine", "## DoRA vs LoRA"]),
    ("tutorials/qlora.md", "## On the demo task", "tutorials/methods.md", ["### Results on the demo"]),
    ("README.md", "### Preference tuning (DPO)", "tutorials/dpo.md", ["## Measured on the demo"]),
    ("tutorials/dpo.md", "## Memory", BENCH, ["## DPO vs SFT memory"]),
]
# measured-looking numbers: decimals, percentages, and integers of three digits or more (not part of a name)
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+|\d+(?=%)|\d+(?=-\d+%)|\d{3,})(?!\d|\.\d|[A-Za-wyz_])")  # 1.50x, not 135M


def section(text: str, heading: str) -> str:
    start = text.index("\n" + heading) + 1
    level = heading.split()[0]
    end = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.M)
    return text[start:start + len(heading) + end.start()] if end else text[start:]


@pytest.mark.parametrize("page, heading, source, source_headings", QUOTED, ids=[f"{q[0]}{q[1]}" for q in QUOTED])
def test_quoted_numbers_are_in_their_source(page, heading, source, source_headings):
    quoted = set(NUMBER.findall(section((REPO / page).read_text(), heading)))
    assert len(quoted) >= 2, "no numbers found: the section or the pattern is wrong"
    text = "\n".join(section((REPO / source).read_text(), h) for h in source_headings)
    missing = sorted(n for n in quoted if not re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", text))
    assert not missing, f"{page} ({heading}) quotes {missing}, which {source} does not have"


WORD_NUMBERS = "ten|twenty|thirty|forty|fifty|a hundred"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_no_page_counts_a_files_lines(page):
    """A line count drifts with every change (README once sold the ~140-line lora.py as 50 lines): pages say
    what a file holds instead."""
    claims = re.findall(rf"\b(?:\d+|{WORD_NUMBERS}) lines\b", page.read_text(encoding="utf-8"), re.I)
    assert not claims, f"{page.relative_to(REPO)} counts lines: {claims}"
