"""The `litft` command line: jsonargparse builds every option and its help from signatures and docstrings.

`litft finetune <method>` takes the run options of `litft.train.finetune` plus the init args of the
method's module (walking `**kwargs` up to `Finetune`), so a new method class gets its command by
adding one entry to `litft.methods.METHOD_TABLE`.

Start-up: a call imports only the command it names (`litft plot` never imports torch; `litft --help`, a mistyped
command and a missing --config file import nothing heavy); the others stand in as a name and a summary.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from jsonargparse import ArgumentError, ArgumentParser

from litft.methods import METHOD_TABLE, load_object
from litft.utils import LitftError

_RUN_EXCLUDE = ("method",)

# Every command but finetune: name -> ("module:function", the first line of its docstring). Strings, so that a call
# imports only the module of the command it names; tests/test_startup.py checks each summary against the function.
COMMANDS: dict[str, tuple[str, str]] = {
    "merge_lora": ("litft.methods.run_dir:merge_lora",
                   "Merge a trained adapter into its base model and write a plain litft checkpoint."),
    "export_peft": ("litft.adapters.peft_format:export_peft",
                    "Write a litft adapter run as a PEFT adapter (adapter_config.json + adapter_model.safetensors)."),
    "import_peft": ("litft.adapters.peft_format:import_peft", "Turn a PEFT LoRA / rsLoRA / DoRA adapter into a litft "
                                                              "adapter run directory (like a run's `final/`)."),
    "generate": ("litft.generate:main",
                 "Generate text from a litft checkpoint, optionally through a trained (unmerged) adapter."),
    "chat": ("litft.chat:chat",
             "Chat with a model in the terminal: multi-turn, streamed, in the checkpoint's chat template."),
    "evaluate": ("litft.evaluate:evaluate",
                 'Score a litft checkpoint on lm-eval-harness tasks (needs `pip install "litft[eval]"`).'),
    "plot": ("litft.plot:plot",
             "Draw one scalar of several fine-tuning runs into a PNG (e.g. `litft plot out/methods/*`)."),
    "convert_to_litft": ("litft.convert:convert_to_litft",
                         "Convert a Hugging Face checkpoint directory, or a GGUF file, into a litft checkpoint."),
    "convert_from_litft": ("litft.convert:convert_from_litft",
                           "Convert a litft checkpoint into a Hugging Face directory, or into one GGUF file for "
                           "llama.cpp / Ollama."),
    "download": ("litft.convert:download",
                 "Fetch a Hugging Face model repo (safetensors + tokenizer files) and convert it to litft."),
}
FINETUNE_HELP = "Fine-tune a model with one of litft's methods."


def finetune_command(method_cls: type) -> Callable[..., Any]:
    from litft.train import finetune
    from litft.utils import function_docs, init_parameters

    run_sig = inspect.signature(finetune, eval_str=True)
    run_params = [p.replace(kind=p.KEYWORD_ONLY) for n, p in run_sig.parameters.items() if n not in _RUN_EXCLUDE]
    m_params, m_docs = init_parameters(method_cls)
    docs = {**function_docs(finetune), **m_docs}
    run_names = {p.name for p in run_params}

    def command(**kwargs: Any) -> dict[str, float]:
        run_kwargs = {k: v for k, v in kwargs.items() if k in run_names}
        method_kwargs = {k: v for k, v in kwargs.items() if k not in run_names}
        if run_kwargs.get("data") is None:
            raise LitftError("no data: pass --data JSON --data.json_path FILE (or a --config with a data section)")
        return finetune(method_cls(**method_kwargs), **run_kwargs)

    required = [p for p in m_params if p.default is inspect.Parameter.empty]
    optional = [p for p in m_params if p.default is not inspect.Parameter.empty]
    command.__signature__ = inspect.Signature(required + run_params + optional)
    # the class's own docstring: inspect.getdoc would fall back to a base class's (LightningModule's hooks)
    summary = (inspect.cleandoc(vars(method_cls).get("__doc__") or "") or f"Fine-tune with {method_cls.__name__}.")
    summary = summary.split("\n")[0]
    lines = [summary, "", "Args:"]
    for p in command.__signature__.parameters.values():
        lines.append(f"    {p.name}: {' '.join(docs.get(p.name, '').split())}")
    command.__doc__ = "\n".join(lines)
    command.__name__ = method_cls.__name__.lower()
    return command


def stand_in(name: str, summary: str) -> Callable[[], None]:
    """A command this call does not name: its name and summary are all `litft --help` and "unknown command ...
    Choose from" need, so its module is not imported."""
    def command() -> None:  # only a top-level --config naming a subcommand could reach it
        raise LitftError(f"name the command on the command line: `litft {name} ...`")

    command.__doc__ = summary
    return command


def _finetune_methods(real: bool = True) -> dict[str, Any]:
    if not real:
        methods = {name: stand_in(f"finetune {name}", summary) for name, (_, summary) in METHOD_TABLE.items()}
        return {"_help": FINETUNE_HELP, **methods}
    from litft.methods import METHODS

    return {"_help": FINETUNE_HELP, **{name: finetune_command(cls) for name, cls in METHODS.items()}}


def commands(argv: list[str] | None = None) -> dict[str, Any]:
    """The tree jsonargparse parses with: command name -> function (`finetune`: a dict of its methods).

    Given `argv`, only the command it names is real; the rest are stand-ins (`commands([])`: all of them). Naming
    one method makes every method real: a misplaced option's "it is an option of dora" needs their options, their
    classes are imported anyway (litft.train -> litft.methods.run_dir -> METHODS), and their parsers add ~0.3 s to
    Lightning's ~7 s. Without `argv`, every command is real (tests walk the whole tree).
    """
    words = list(argv) if argv is not None else []
    named = next((w for w in words if w == "finetune" or w in COMMANDS), None)
    method = named == "finetune" and any(w in METHOD_TABLE for w in words[words.index("finetune") + 1:])
    return {"finetune": _finetune_methods(real=argv is None or method),
            **{name: load_object(path) if argv is None or name == named else stand_in(name, summary)
               for name, (path, summary) in COMMANDS.items()}}


def check_config_keys(data: Any, fn: Callable, source: str) -> None:
    """Unknown keys in a --config file, named with a "did you mean": jsonargparse reports them
    inside nested subcommands only as a bare KeyError."""
    import dataclasses
    import difflib

    if not isinstance(data, dict):
        raise LitftError(f"{source}: expected a mapping of options, got {type(data).__name__}")
    params = inspect.signature(fn, eval_str=True).parameters
    for key, value in data.items():
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise LitftError(f"{source}: unknown key {key!r}.{hint} Valid keys: {', '.join(params)}")
        annotation = params[key].annotation
        if dataclasses.is_dataclass(annotation) and not isinstance(value, dict):
            fields = [f.name for f in dataclasses.fields(annotation)]
            raise LitftError(f"{source}: {key} must be a mapping of its settings ({', '.join(fields)}), got {value!r}")
        if dataclasses.is_dataclass(annotation):
            fields = [f.name for f in dataclasses.fields(annotation)]
            for sub in value:
                if sub not in fields:
                    close = difflib.get_close_matches(sub, fields, n=1)
                    hint = f" Did you mean '{key}.{close[0]}'?" if close else ""
                    raise LitftError(f"{source}: unknown key '{key}.{sub}'.{hint} Valid: {', '.join(fields)}")


def _config_files(argv: list[str], components: dict[str, Any]) -> list[tuple[Any, Callable, Path]]:
    """Each `--config FILE` given after a complete command: (its YAML, the command, the path). A missing or broken
    file is one LitftError."""
    import yaml

    found = []
    node: Any = components
    for i, arg in enumerate(argv):
        if isinstance(node, dict) and arg in node:
            node = node[arg]
        elif arg == "--config" and i + 1 < len(argv) and callable(node):
            path = Path(argv[i + 1])
            if not path.is_file():
                raise LitftError(f"{path}: config file not found")
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise LitftError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from e
            found.append((data, node, path))
    return found


def run(argv: list[str] | None = None) -> Any:
    """Parse `argv` and run the command; returns its result (tests call this)."""
    from jsonargparse import CLI, capture_parser, set_parsing_settings

    # A config file (perhaps downloaded) names classes by import path (`data: {class_path: ...}`), and importing
    # a module runs its code: values may name litft's own classes only (`litft.*`), never another module.
    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=["litft"])
    argv = list(sys.argv[1:] if argv is None else argv)
    _config_files(argv, commands([]))  # a missing or broken --config file: said before any command is imported
    components = commands(argv)
    argv = _words_to_list(argv, components)
    for data, command, path in _config_files(argv, components):
        check_config_keys(data, command, str(path))
    if "torch" in sys.modules:  # the command runs torch (plot does not): check the CPU switches before any work
        from litft import native
        from litft.cpu_kernels import onednn_enabled

        onednn_enabled()  # validates LITFT_CPU_MATMUL before any work, not at the first matmul
        native.kernels_choice()  # and LITFT_CPU_KERNELS

    def cli(tree: dict[str, Any]) -> Any:  # allow_abbrev=False: `--train.max_step 5` must not mean --train.max_steps
        return CLI(tree, args=argv, parser_class=_Parser, prog="litft", allow_abbrev=False, exit_on_error=False)

    try:
        return cli(components)
    except ArgumentError as e:
        line = parse_error_line(e)
        if line.startswith("unknown option") and "Did you mean" not in line and "it is an option of" not in line:
            # whether another command takes the option ("it is an option of generate") needs every command's
            # options, which the stand-ins lack: only this error pays for building them all (parsing, never running)
            try:
                capture_parser(cli, commands()).parse_args(argv)
            except ArgumentError as full:
                line = parse_error_line(full)
        raise LitftError(line) from None


class _Parser(ArgumentParser):
    """jsonargparse's parser, but a parse error is raised (not printed under ~45 lines of usage) and
    remembers which (sub)command parser found it, so the error line can name that command's options."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        try:
            super().error(message, ex)  # exit_on_error=False: raises ArgumentError
        except ArgumentError as e:
            if not hasattr(e, "parser"):
                e.parser = self
            raise


def parse_error_line(error: Exception) -> str:
    """One line for a jsonargparse error: what is wrong, a "did you mean" where one is close, and where to look."""
    import difflib
    import re

    parsers = []  # the parsers the error passed through, innermost last
    cause: BaseException | None = error
    while cause is not None:
        if getattr(cause, "parser", None) is not None:
            parsers.append(cause.parser)
        cause = cause.__cause__
    commands = [p for p in parsers if p.prog.startswith("litft")]
    command = commands[-1] if commands else None
    where = f" (see `{command.prog.replace(' [options]', '')} --help`)" if command is not None else ""
    message = str(error).strip()

    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown and command is not None:
        option = unknown.group(1).split("=", 1)[0]
        close = difflib.get_close_matches(option, list(command._option_string_actions), n=1, cutoff=0.75)
        if close:
            return f"unknown option {option}. Did you mean {close[0]}?{where}"
        siblings = getattr(getattr(command, "parent_parser", None), "_subcommands_action", None)
        owners = [name for name, p in (siblings._name_parser_map.items() if siblings else [])
                  if option in p._option_string_actions]
        if owners:
            return f"unknown option {option} for `{command.prog.replace(' [options]', '')}`: it is an option of " \
                   f"{', '.join(owners)}{where}"
        return f"unknown option {option}{where}"
    choice = re.match(r"argument subcommand: invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        names = re.findall(r"'([^']*)'", choice.group(2))
        close = difflib.get_close_matches(choice.group(1), names, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        return f"unknown command {choice.group(1)!r}.{hint} Choose from: {', '.join(names)}{where}"
    missing_command = re.match(r'expected "((?:\w+\.)*)subcommand" to be one of', message)
    if missing_command and parsers:
        parser, path = parsers[-1], missing_command.group(1).strip(".").split(".") if missing_command.group(1) else []
        for name in path:
            parser = parser._subcommands_action._name_parser_map[name]
        names = [n for n in parser._subcommands_action._name_parser_map]
        prog = " ".join(["litft", *path])
        return f"`{prog}` needs a command: one of {', '.join(names)} (see `{prog} --help`)"
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [n.strip() for n in required.group(1).split(",")]
        path = names[0].split(".")[:-1]
        parser = parsers[-1] if parsers else None
        for name in path if parser is not None else []:
            parser = parser._subcommands_action._name_parser_map[name]
        positional = {a.dest for a in parser._actions if not a.option_strings} if parser is not None else set()
        shown = ", ".join(n.split(".")[-1].upper() if n.split(".")[-1] in positional else f"--{n.split('.')[-1]}"
                          for n in names)
        prog = " ".join(["litft", *path])
        return f"missing required argument(s) {shown} (see `{prog} --help`)"
    key = re.match(r'Parser key "([^"]+)":', message)
    not_accepted = re.search(r"Option '([^']+)' is not accepted", message)
    if key and not_accepted:  # a misspelt option of a class-typed argument (--data.json_pat)
        options = [o.lstrip("-").split(".")[-1] for p in parsers[len(commands):] for o in p._option_string_actions]
        close = difflib.get_close_matches(not_accepted.group(1), options, n=1)
        hint = f" Did you mean --{key.group(1)}.{close[0]}?" if close else ""
        return f"unknown option --{key.group(1)}.{not_accepted.group(1)}.{hint}{where}"
    not_a_class = re.search(r"Importing '(\S+)' is not allowed|Expected a dot import path string: (\S+)|Import path "
                            r"(\S+) does not correspond to a subclass of \w+|Not a valid subclass of \w+\. Got value: "
                            r"(.*?)(?: Subclass types|$)", " ".join(message.split()))
    if key and not_a_class:  # --data Nope, --data os.system, data: 5 in a config
        given = next(g for g in not_a_class.groups() if g is not None)
        # the import-path policy of run(): a value never makes litft import a module outside litft
        return (f"invalid value for --{key.group(1)}: {given!r} is not one of litft's DataModules (a value may name "
                f"litft classes only; litft never imports other code because an option or a config names it): use "
                f"e.g. --data JSON or --data Alpaca{where}"
                if key.group(1) == "data" else f"invalid value for --{key.group(1)}: {given!r}{where}")
    no_config = re.search(r"Unable to load config '([^']*)'", message)
    if key and no_config:  # --train 5: a dataclass option takes a YAML file or its fields one by one
        return (f"invalid value for --{key.group(1)}: {no_config.group(1)!r} is not a YAML file or mapping; set its "
                f"fields one by one (--{key.group(1)}.NAME VALUE){where}")
    if key:  # a value of the wrong type: "expected int, got 'abc'"
        expected = [re.sub(r"<class '([\w.]+)'>", r"\1", e).replace("NoneType", "null").strip() for e in
                    re.findall(r"Expected an? ([^\n]+?)(?:\. Got value: .*)?$", message, flags=re.M)]
        given = re.search(r"(?:Given|Got) value: (.*)$", message, flags=re.M)
        if expected and given:
            return f"invalid value for --{key.group(1)}: expected {' or '.join(dict.fromkeys(expected))}, got " \
                   f"{given.group(1)!r}{where}"
    return " ".join(message.split()) + where


def _words_to_list(argv: list[str], components: dict[str, Any]) -> list[str]:
    """jsonargparse takes a list-typed positional (`litft plot RUN_DIR...`) only as one JSON list: join
    the bare words after the command into one, so a shell glob (`litft plot out/methods/*`) works."""
    import json
    import typing

    node: Any = components
    for i, arg in enumerate(argv):
        if isinstance(node, dict) and arg in node:
            node = node[arg]
            continue
        first = next(iter(inspect.signature(node, eval_str=True).parameters.values()), None) if callable(node) else None
        if first is not None and typing.get_origin(first.annotation) is list and not arg.startswith(("-", "[")):
            end = next((j for j in range(i, len(argv)) if argv[j].startswith("-")), len(argv))
            return argv[:i] + [json.dumps(argv[i:end])] + argv[end:]
        break
    return argv


def main(argv: list[str] | None = None) -> None:
    """The console script: user errors become one line on stderr and exit code 1."""
    try:
        run(argv)
    except LitftError as e:
        print(f"litft: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C: one line (the loop's says where it stopped), the shell's code 130
        print(f"\nlitft: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
