"""The `litft` command line: jsonargparse builds every option and its help from signatures and docstrings.

`litft finetune <method>` takes the run options of `litft.train.finetune` plus the init args of the
method's module (walking `**kwargs` up to `Finetune`), so a new method class gets its command by
adding one entry to FINETUNE_METHODS.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import docstring_parser

from litft.utils import LitftError

_RUN_EXCLUDE = ("method",)


def _param_docs(fn: Callable) -> dict[str, str]:
    doc = inspect.getdoc(fn) or ""
    if doc.startswith("Args:"):  # the Google-style parser needs a summary line first
        doc = "-\n\n" + doc
    return {p.arg_name: p.description or "" for p in docstring_parser.parse(doc).params}


def method_parameters(cls: type) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """Init parameters of a method class and its bases, following `**kwargs` up the MRO."""
    params: dict[str, inspect.Parameter] = {}
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__, eval_str=True)
        for p in list(sig.parameters.values())[1:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in params:
                continue
            params[p.name] = p.replace(kind=p.KEYWORD_ONLY)
        for k, v in _param_docs(klass.__init__).items():
            docs.setdefault(k, v)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    # required (no default) first, so the combined signature is valid
    ordered = sorted(params.values(), key=lambda p: p.default is not inspect.Parameter.empty)
    return ordered, docs


def init_args_of(obj: Any) -> dict[str, Any]:
    params, _ = method_parameters(type(obj))
    return {p.name: getattr(obj, p.name) for p in params if hasattr(obj, p.name)}


def to_yaml_value(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value):
        return {k: to_yaml_value(v) for k, v in asdict(value).items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple, set)):
        return [to_yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: to_yaml_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"class_path": f"{type(value).__module__}.{type(value).__qualname__}",
            "init_args": to_yaml_value(init_args_of(value))}


def finetune_command(method_cls: type) -> Callable[..., Any]:
    from litft.train import finetune

    run_sig = inspect.signature(finetune, eval_str=True)
    run_params = [p.replace(kind=p.KEYWORD_ONLY) for n, p in run_sig.parameters.items() if n not in _RUN_EXCLUDE]
    m_params, m_docs = method_parameters(method_cls)
    docs = {**_param_docs(finetune), **m_docs}
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
    summary = (inspect.getdoc(method_cls) or f"Fine-tune with {method_cls.__name__}.").split("\n")[0]
    lines = [summary, "", "Args:"]
    for p in command.__signature__.parameters.values():
        lines.append(f"    {p.name}: {' '.join(docs.get(p.name, '').split())}")
    command.__doc__ = "\n".join(lines)
    command.__name__ = method_cls.__name__.lower()
    return command


def merge_lora(adapter_dir: Path, checkpoint_dir: Path | None = None, out_dir: Path | None = None,
               merge_into: str = "original") -> Path:
    """Merge a trained adapter into its base model and write a plain litft checkpoint.

    Args:
        adapter_dir: the `final/` (or `step-N/`) directory of an adapter fine-tuning run.
        checkpoint_dir: the base model; default: the one the run was trained from.
        out_dir: where to write the merged checkpoint; default: adapter_dir/merged.
        merge_into: for a run on a quantized base (QLoRA): original merges into the full-precision weights
            of checkpoint_dir (the usual practice), dequantized into the dequantized weights the adapter was
            trained against. Runs on a full-precision base ignore it.
    """
    from litft.checkpoint import save_checkpoint
    from litft.methods.base import load_method

    if merge_into not in ("original", "dequantized"):
        raise LitftError(f"unknown merge_into {merge_into!r}: use original or dequantized")
    method = load_method(adapter_dir, checkpoint_dir)
    quantized = getattr(method, "quantize", None)
    model = method.merged_model(into=merge_into) if quantized else method.merged_model()
    config = model.config
    if config.tie_embeddings and model.lm_head.weight is not model.embed.weight:
        config.tie_embeddings = False  # an adapted head was merged: it is no longer the embedding
    out = Path(out_dir) if out_dir else Path(adapter_dir) / "merged"
    save_checkpoint(model.state_dict(), config, out, tokenizer_dir=method.checkpoint_dir)
    into = f" ({merge_into} weights of a {quantized} run)" if quantized else ""
    print(f"Merged {adapter_dir} into {method.checkpoint_dir}{into} -> {out}")
    return out


def _finetune_methods() -> dict[str, Any]:
    from litft.methods.dora import DoRA
    from litft.methods.full import Full
    from litft.methods.lora import LoRA
    from litft.methods.lora_plus import LoRAPlus
    from litft.methods.neft import NEFT
    from litft.methods.qlora import QLoRA

    return {"_help": "Fine-tune a model with one of litft's methods.", "lora": finetune_command(LoRA),
            "full": finetune_command(Full), "qlora": finetune_command(QLoRA), "dora": finetune_command(DoRA),
            "lora_plus": finetune_command(LoRAPlus), "neft": finetune_command(NEFT)}


def commands() -> dict[str, Any]:
    from litft.adapters.peft_format import export_peft, import_peft
    from litft.convert import convert_from_litft, convert_to_litft, download
    from litft.generate import main as generate
    from litft.plot import plot

    return {
        "finetune": _finetune_methods(),
        "merge_lora": merge_lora,
        "export_peft": export_peft,
        "import_peft": import_peft,
        "generate": generate,
        "plot": plot,
        "convert_to_litft": convert_to_litft,
        "convert_from_litft": convert_from_litft,
        "download": download,
    }


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
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            fields = [f.name for f in dataclasses.fields(annotation)]
            for sub in value:
                if sub not in fields:
                    close = difflib.get_close_matches(sub, fields, n=1)
                    hint = f" Did you mean '{key}.{close[0]}'?" if close else ""
                    raise LitftError(f"{source}: unknown key '{key}.{sub}'.{hint} Valid: {', '.join(fields)}")


def _check_config_files(argv: list[str], components: dict[str, Any]) -> None:
    import yaml

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
            except yaml.YAMLError as e:
                raise LitftError(f"{path}: invalid YAML: {e}") from e
            check_config_keys(data, node, str(path))


def run(argv: list[str] | None = None) -> Any:
    """Parse `argv` and run the command; returns its result (tests call this)."""
    from jsonargparse import CLI

    from litft import native
    from litft.cpu_kernels import onednn_enabled

    components = commands()
    argv = _words_to_list(list(sys.argv[1:] if argv is None else argv), components)
    _check_config_files(argv, components)
    onednn_enabled()  # validates LITFT_CPU_MATMUL before any work, not at the first matmul
    native.kernels_choice()  # and LITFT_CPU_KERNELS
    return CLI(components, args=argv)


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
