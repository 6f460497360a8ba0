"""Reading a finished run back: `out_dir/final` (or `step-N/`) -> the method module that trained it, and
`litft merge_lora` (that module's merged model, written as a plain checkpoint).

A run directory is data from whoever shared it, so nothing in it picks code. `method_config.yaml` names a class
(`class_path`) and its init args; the class is looked up among the method classes already defined in this
process -- litft's own (`litft.methods.METHODS`) and any `Finetune` subclass the user's own code has imported --
or given by the caller (`method_class=`). A name that is neither is refused; no module is ever imported because a
file names it. The init args are checked against the class's signature (names and types) before anything is
constructed.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from litft.checkpoint import METHOD_CONFIG, iter_safetensors, read_method_config, run_base_dir, save_checkpoint
from litft.convert import check_out_dir
from litft.methods import METHODS
from litft.methods.base import Finetune
from litft.utils import LitftError, init_parameters


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def known_method_classes() -> dict[str, type[Finetune]]:
    """class path -> class for litft's methods and every Finetune subclass defined in this process so far."""
    found, todo = {}, [Finetune, *METHODS.values()]
    while todo:
        cls = todo.pop()
        if class_path(cls) not in found:
            found[class_path(cls)] = cls
            todo.extend(cls.__subclasses__())
    return found


def resolve_method_class(name: str, source: str, method_class: type[Finetune] | None = None) -> type[Finetune]:
    """The class a run's config names: `method_class` when the caller gives one, else one of
    `known_method_classes()`. Never imports anything."""
    if method_class is not None:
        if not (isinstance(method_class, type) and issubclass(method_class, Finetune)):
            raise LitftError(f"method_class must be a subclass of litft.methods.base.Finetune, got {method_class!r}")
        return method_class
    known = known_method_classes()
    if name in known:
        return known[name]
    litft_names = ", ".join(sorted(class_path(c) for c in METHODS.values()))
    raise LitftError(f"{source}: class_path {name!r} is not a litft method ({litft_names}) nor a Finetune subclass "
                     "your code has imported. litft never imports code because a file names it: for your own "
                     "method, import its module first or pass method_class=YourClass")


def check_init_args(cls: type[Finetune], init_args: dict[str, Any], source: str) -> dict[str, Any]:
    """`init_args` checked against `cls`'s signature (every name known, every value of its annotated type) with
    jsonargparse, the library that parses the same options on the command line; returns the typed values."""
    from jsonargparse import ArgumentError, ArgumentParser

    params, _ = init_parameters(cls)
    parser = ArgumentParser(exit_on_error=False)
    for p in params:
        required = p.default is inspect.Parameter.empty
        parser.add_argument(f"--{p.name}", type=p.annotation, required=required,
                            **({} if required else {"default": p.default}))
    try:
        parsed = parser.parse_object(init_args)
    except ArgumentError as e:
        raise LitftError(f"{source}: init_args do not fit {class_path(cls)}: {' '.join(str(e).split())}") from None
    return {p.name: parsed[p.name] for p in params if p.name in init_args}


def load_method(run_dir: Path | str, checkpoint_dir: Path | str | None = None,
                method_class: type[Finetune] | None = None) -> Finetune:
    """Rebuild a trained method from a finished run's directory (`out_dir/final`): its class, its base model, and
    its trained weights.

    Args:
        run_dir: the `final/` (or `step-N/`) directory of a litft finetune run.
        checkpoint_dir: the base model; default: the one the run records.
        method_class: the module class to rebuild, for a method of your own (default: the class the run names,
            looked up among litft's methods and the Finetune subclasses already imported).
    """
    run_dir = Path(run_dir)
    source = str(run_dir / METHOD_CONFIG)
    cfg = read_method_config(run_dir)
    cls = resolve_method_class(cfg["class_path"], source, method_class)
    init_args = check_init_args(cls, cfg["init_args"], source)
    init_args.pop("init_adapter", None)  # the run's own trained weights replace it below
    init_args["checkpoint_dir"] = run_base_dir(run_dir, cfg["init_args"], checkpoint_dir)
    weights = run_dir / cls.weights_file
    if not weights.is_file():
        raise LitftError(f"{run_dir}: {cls.weights_file} is missing (was the run interrupted before it finished?)")
    method = cls(**init_args)
    state_dict = dict(iter_safetensors(weights))  # read (and its checksum checked) before the model is built
    method.configure_model()
    try:
        method.load_trainable_state_dict(state_dict)
    except (RuntimeError, ValueError) as e:  # shapes or names that do not fit the base model
        raise LitftError(f"{weights}: does not fit the base model {method.checkpoint_dir} "
                         f"({' '.join(str(e).split())[:300]}...); pass the base model it was trained on as "
                         "--checkpoint_dir") from None
    return method


def merge_lora(adapter_dir: Path, checkpoint_dir: Path | None = None, out_dir: Path | None = None,
               merge_into: str = "original", format: str = "litft", gguf_type: str = "f16") -> Path:
    """Merge a trained adapter into its base model and write a plain litft checkpoint.

    Args:
        adapter_dir: the `final/` (or `step-N/`) directory of an adapter fine-tuning run.
        checkpoint_dir: the base model; default: the one the run was trained from.
        out_dir: where to write the merged checkpoint; default: adapter_dir/merged.
        merge_into: for a run on a quantized base (QLoRA): original merges into the full-precision weights
            of checkpoint_dir (the usual practice), dequantized into the dequantized weights the adapter was
            trained against. Runs on a full-precision base ignore it.
        format: litft (the merged checkpoint) or gguf (the merged checkpoint, and beside its files one
            `<name>-<gguf_type>.gguf` for llama.cpp / Ollama; needs `pip install "litft[gguf]"`).
        gguf_type: with --format gguf: f32, f16, bf16 or q8_0.
    """
    if format not in ("litft", "gguf"):
        raise LitftError(f"unknown format {format!r}: use litft or gguf")
    if format == "gguf":
        from litft.gguf import GGUF_TYPES, require_gguf

        require_gguf()  # before the merge, not after it
        if gguf_type not in GGUF_TYPES:
            raise LitftError(f"unknown gguf_type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
    if merge_into not in ("original", "dequantized"):
        raise LitftError(f"unknown merge_into {merge_into!r}: use original or dequantized")
    check_out_dir(out_dir)
    method = load_method(adapter_dir, checkpoint_dir)
    quantized = method.hparams.get("quantize")
    model = method.merged_model(into=merge_into)
    config = model.config
    if config.tie_embeddings and model.lm_head.weight is not model.embed.weight:
        config.tie_embeddings = False  # an adapted head was merged: it is no longer the embedding
    out = Path(out_dir) if out_dir else Path(adapter_dir) / "merged"
    save_checkpoint(model.state_dict(), config, out, tokenizer_dir=method.checkpoint_dir)
    into = f" ({merge_into} weights of a {quantized} run)" if quantized else ""
    print(f"Merged {adapter_dir} into {method.checkpoint_dir}{into} -> {out}")
    if format == "gguf":
        from litft.gguf import export_gguf

        return export_gguf(out, out / f"{out.name}-{gguf_type}.gguf", gguf_type)
    return out
