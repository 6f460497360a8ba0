"""A checkpoint's own chat template, rendered as transformers' `apply_chat_template` renders it.

The template is Jinja text shipped with the checkpoint (`chat_template.jinja`, which wins, or
`tokenizer_config.json["chat_template"]`). It is untrusted: it runs in jinja2's ImmutableSandboxedEnvironment
(no attribute access to Python internals, no mutation of the data it is given, no file or code access), with
exactly the globals and filters transformers gives it (`raise_exception`, `strftime_now`, `tojson`, `dict`,
`namespace`, the `loopcontrols` extension, `{% generation %}` blocks) and the tokenizer's named special tokens
(`bos_token`, `eos_token`, ...) as variables. Every failure inside a template is one `ChatTemplateError`.

Rendering gives text; the ids are that text encoded without bos/eos (the template writes its own `bos_token`),
as transformers does with `add_special_tokens=False`.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from litft.utils import LitftError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(LitftError, ValueError):
    """A chat template that cannot be read, compiled or rendered (one line on the CLI)."""


def read_chat_template(checkpoint_dir: Path | str) -> str | None:
    """The template text a checkpoint ships, or None. `chat_template.jinja` takes priority over the config's
    `chat_template` (as in transformers); a config list of named templates gives its "default" one."""
    d = Path(checkpoint_dir)
    if (d / CHAT_TEMPLATE_FILE).is_file():
        try:
            return (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{d / CHAT_TEMPLATE_FILE}: not valid UTF-8 ({e})") from None
    config_path = d / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        value = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ChatTemplateError(f"{config_path}: cannot read its chat_template ({e})") from None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ChatTemplateError(f"{config_path}: chat_template must be a string, got {type(value).__name__}")
    return value or None


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """The compiled template, in the environment transformers builds (utils/chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks; we
        # derive masks by rendering prefixes instead, so the block only renders its body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:  # `dict(...)` without exposing the dict type itself
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore names: no way to CPython internals
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a template may not set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def _plain(value: Any) -> Any:
    # only JSON-like data reaches the template (transformers' `_plain_template_data`, for the types we accept)
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def render_chat(source: str, messages: list[dict[str, Any]], special_tokens: dict[str, str],
                add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """The text the template makes of `messages` (keys whose value is None dropped, as transformers does)."""
    import jinja2

    template = compile_template(source)
    chat = [{k: v for k, v in _plain(m).items() if v is not None} for m in messages]
    try:
        return template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                               **{**special_tokens, **_plain(kwargs)})
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...), SecurityError, UndefinedError, syntax
        raise ChatTemplateError(f"the chat template refused this conversation: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, RecursionError) as e:
        raise ChatTemplateError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None
