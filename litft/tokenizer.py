"""One tokenizer class over the two formats HF checkpoints ship: `tokenizer.json` (HF `tokenizers`)
and `tokenizer.model` (`sentencepiece`).

The reference for every behaviour here is `transformers.AutoTokenizer` (v5), because that is what the
checkpoint's authors and every eval harness use; `tests/test_tokenizer.py` checks that encode/decode agree
with it. Where sentencepiece itself and transformers disagree (leading spaces, special tokens written in
the text), we follow transformers, see `_SentencePieceBackend`.

`use_bos` (does `encode` prepend bos by default): an explicit `add_bos_token` in tokenizer_config.json, else
whether the tokenizer.json post-processor adds bos, else (tokenizer.model only) the Llama-family convention of
prepending bos when the model defines one. One deliberate difference from transformers v5: v5 ignores
`add_bos_token` whenever a tokenizer.json exists; we honour it, as v4's Llama/Gemma tokenizers did.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from litft.chat_template import CHAT_TEMPLATE_FILE, read_chat_template, render_chat
from litft.utils import LitftError


class TokenizerError(LitftError, ValueError):
    """A missing, corrupt or unusable tokenizer file (one line on the CLI)."""


class TokenizerFileNotFoundError(LitftError, FileNotFoundError):
    """No tokenizer files where they were expected."""

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    CHAT_TEMPLATE_FILE,  # the chat template travels with the tokenizer (conversion, merge, download)
)

# The named special tokens transformers knows about (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy whichever of `TOKENIZER_FILES` exist in `src_dir` into `dst_dir`; returns the names copied."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


class Tokenizer:
    """Encode/decode for a checkpoint directory holding HF tokenizer files.

    Attributes: `backend` ("huggingface" | "sentencepiece"), `vocab_size` (number of ids the tokenizer can emit,
    added tokens included), `bos_id`, `eos_id`, `eos_ids` (all ids that stop generation), `pad_id`, and
    `use_bos` (whether `encode` prepends bos by default, as transformers would).
    """

    def __init__(self, checkpoint_dir: Path | str) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        json_path = self.checkpoint_dir / "tokenizer.json"
        model_path = self.checkpoint_dir / "tokenizer.model"

        config = self._special_tokens_config()
        gen_config = _read_json(self.checkpoint_dir / "generation_config.json")

        # Prefer tokenizer.json when both exist, as transformers does (it is the "fast" serialization and
        # carries the added tokens / post-processor the model was released with).
        if json_path.is_file():
            self.backend = "huggingface"
            self._impl: _HFBackend | _SentencePieceBackend = _HFBackend(json_path, config)
        elif model_path.is_file():
            self.backend = "sentencepiece"
            self._impl = _SentencePieceBackend(model_path, config)
        else:
            missing = "" if self.checkpoint_dir.is_dir() else " (the directory does not exist)"
            raise TokenizerFileNotFoundError(
                f"No tokenizer found in {str(self.checkpoint_dir)!r}{missing}: expected 'tokenizer.json'"
                " (HF tokenizers) or 'tokenizer.model' (sentencepiece)"
            )

        impl = self._impl
        self.bos_id: int | None = impl.special_id("bos_token")
        self.eos_id: int | None = impl.special_id("eos_token")
        self.pad_id: int | None = impl.special_id("pad_token")
        # generation_config.json only fills gaps for bos/eos/pad (the tokenizer's own tokens are what transformers
        # uses when encoding), but it is the authority on what *stops* generation (Llama 3 lists several eos ids).
        gen_bos, gen_eos, gen_pad = (
            _as_id_list(gen_config.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        )
        if self.bos_id is None and gen_bos:
            self.bos_id = gen_bos[0]
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        if self.pad_id is None and gen_pad:
            self.pad_id = gen_pad[0]
        self.eos_ids: set[int] = set(gen_eos) | ({self.eos_id} if self.eos_id is not None else set())

        self.use_bos: bool = self.bos_id is not None and impl.default_add_bos(config, self.bos_id)
        self.vocab_size: int = impl.vocab_size()
        # the checkpoint's own chat template (None for a base model) and the named special tokens it sees
        self.chat_template: str | None = read_chat_template(self.checkpoint_dir)
        self.special_tokens: dict[str, str] = {
            k: c for k in _SPECIAL_KEYS if (c := _token_content(impl.config.get(k))) is not None
        }

    def _special_tokens_config(self) -> dict[str, Any]:
        """tokenizer_config.json merged with special_tokens_map.json the way transformers v5 does: the map is a legacy
        file that is read only when the config has no `added_tokens_decoder`, and then its entries win."""
        config = _read_json(self.checkpoint_dir / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            config.update(_read_json(self.checkpoint_dir / "special_tokens_map.json"))
            added = _read_json(self.checkpoint_dir / "added_tokens.json")  # legacy {content: id}
            if added:
                config["_legacy_added_tokens"] = added
        return config

    def token_to_id(self, token: str) -> int | None:
        return self._impl.token_to_id(token)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        """Token ids of `text` as a 1-D int64 tensor. Special tokens written in the text (e.g. "<|im_end|>") become
        their single id. `bos=None` means `self.use_bos`; bos/eos are added here, never by the backend's
        post-processor, so they can't be doubled. `max_length > 0` truncates from the right."""
        ids = self._impl.encode(text)
        if bos is None:
            bos = self.use_bos
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"bos requested but the tokenizer in {str(self.checkpoint_dir)!r} has no bos token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"eos requested but the tokenizer in {str(self.checkpoint_dir)!r} has no eos token")
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The checkpoint's chat template applied to `messages` ({"role", "content"} dicts), as text."""
        if self.chat_template is None:
            raise TokenizerError(
                f"the tokenizer in {str(self.checkpoint_dir)!r} has no chat template (no {CHAT_TEMPLATE_FILE} and no"
                " chat_template in tokenizer_config.json): pick a prompt style instead (e.g. --prompt_style chatml)"
            )
        return render_chat(self.chat_template, messages, self.special_tokens, add_generation_prompt)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> torch.Tensor:
        """Token ids of the rendered conversation: transformers' `apply_chat_template(tokenize=True)` (the template
        writes its own bos, so none is added here)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), bos=False)

    def end_of_turn_ids(self) -> list[int]:
        """The special token(s) the chat template closes an assistant turn with (e.g. <|im_end|>, <|eot_id|>,
        <end_of_turn>): found by rendering a turn, not by family. Empty without a template."""
        if self.chat_template is None:
            return []
        marker = "litft-end-of-turn-probe"
        text = self.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        tail = text[text.rfind(marker) + len(marker):].strip() if marker in text else ""
        ids = self.encode(tail, bos=False).tolist() if tail else []
        # the first token after the content, if it is a special token (decodes to nothing when specials are skipped)
        return ids[:1] if ids and self.decode(ids[:1], skip_special_tokens=True) == "" else []

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()  # a 0-d tensor (one sampled token) decodes too
        return self._impl.decode([int(i) for i in ids], skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.checkpoint_dir)!r}, backend={self.backend!r}, vocab_size={self.vocab_size},"
            f" bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, use_bos={self.use_bos})"
        )


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"Could not parse tokenizer file {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"Tokenizer file {str(path)!r} should hold a JSON object, got {type(data).__name__}")
    return data


def _as_id_list(value: Any) -> list[int]:
    """generation_config ids may be null, an int or a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _token_content(value: Any) -> str | None:
    """A special token in a config is a string or a serialized AddedToken dict ({"content": ..., "lstrip": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _declared_special_tokens(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every (content, added-token flags) the config marks special: the named ones plus the extra ones
    (`additional_special_tokens` in v4 configs, `extra_special_tokens` (list or dict) in v5)."""
    values: list[Any] = [config.get(k) for k in _SPECIAL_KEYS]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        if isinstance(extra, dict):
            extra = list(extra.values())
        if isinstance(extra, (list, tuple)):
            values.extend(extra)
    out, seen = [], set()
    for value in values:
        content = _token_content(value)
        if content and content not in seen:
            seen.add(content)
            out.append((content, dict(value) if isinstance(value, dict) else {}))
    return out


def _config_added_tokens(config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """tokenizer_config.json `added_tokens_decoder` ({"32000": {"content": ..., "special": ...}}), or the legacy
    added_tokens.json ({content: id}; special iff declared special, as transformers decides)."""
    out: dict[int, dict[str, Any]] = {}
    for idx, tok in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(tok, dict) and "content" in tok:
            out[int(idx)] = tok
    specials = {c for c, _ in _declared_special_tokens(config)}
    for content, idx in (config.get("_legacy_added_tokens") or {}).items():
        is_special = content in specials
        out.setdefault(int(idx), {"content": content, "special": is_special, "normalized": not is_special})
    return out


def _clean_up_tokenization(text: str) -> str:
    # The punctuation-space cleanup transformers applies in decode when `clean_up_tokenization_spaces` is set.
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(old, new)
    return text


# ----------------------------------------------------------------------------------------------------------------------
# backends: each turns text <-> ids *without* bos/eos and knows how to resolve special tokens


class _HFBackend:
    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"Could not load tokenizer file {str(path)!r}: {e}") from e
        # we add bos/eos and truncate ourselves; a tokenizer.json may carry padding/truncation settings
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = bool(config.get("split_special_tokens", False))

        # transformers (v5) applies the config's added tokens on top of tokenizer.json (sorted by id; same content with
        # other flags updates the flags), then adds every declared special token that is not an added token yet as a
        # *special* one (new id if it isn't in the vocab). That is what makes e.g. a config-only "<|im_end|>" a single
        # id in the text and dropped by skip_special_tokens. Added tokens already in tokenizer.json keep their flags.
        config_added = _config_added_tokens(config)
        if config_added:
            tok.add_tokens([_added_token(AddedToken, t, bool(t.get("special"))) for _, t in sorted(config_added.items())])
        known = {t.content for t in tok.get_added_tokens_decoder().values()}
        new_specials = [
            _added_token(AddedToken, {**flags, "content": content}, special=True)
            for content, flags in _declared_special_tokens(config)
            if content not in known
        ]
        if new_specials:
            tok.add_tokens(new_specials)

        self.tok = tok
        self.config = config
        # transformers skips the cleanup for BPE models (it would eat legitimate spaces before punctuation)
        is_bpe = type(tok.model).__name__ == "BPE"
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            not is_bpe or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )

    def special_id(self, key: str) -> int | None:
        content = _token_content(self.config.get(key))
        return self.tok.token_to_id(content) if content else None

    def default_add_bos(self, config: dict[str, Any], bos_id: int) -> bool:
        # An explicit add_bos_token in tokenizer_config.json wins (transformers v4's Llama/Gemma tokenizers rebuild the
        # post-processor from it). Note transformers v5 ignores the flag whenever a tokenizer.json exists; the two only
        # disagree when the config contradicts the post-processor, and then the explicit flag is the author's intent.
        if "add_bos_token" in config:
            return bool(config["add_bos_token"])
        # Otherwise the tokenizer.json post-processor decides. We probe it rather than parse its many JSON shapes.
        with_special = self.tok.encode("a", add_special_tokens=True).ids
        without = self.tok.encode("a", add_special_tokens=False).ids
        adds_prefix = len(with_special) > len(without) and with_special[1 : len(without) + 1] == without
        return adds_prefix and with_special[0] == bos_id

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up else text


def _added_token(cls: Any, t: dict[str, Any], special: bool) -> Any:
    return cls(
        t["content"],
        single_word=bool(t.get("single_word", False)),
        lstrip=bool(t.get("lstrip", False)),
        rstrip=bool(t.get("rstrip", False)),
        # special tokens are matched on the raw text unless the file says otherwise
        normalized=bool(t.get("normalized", not special)),
        special=special,
    )


class _SentencePieceBackend:
    """sentencepiece for the segmentation itself, wrapped in the conventions transformers (v5) applies when it loads a
    Llama-family `tokenizer.model`:

    * special and added tokens written in the text are split out first and map to their single id;
    * the remaining text is not run through the model's normalizer (transformers ignores it too; Llama's is identity);
    * the "dummy prefix" space is prepended only to the start of the text (`legacy: false`, the default) or to every
      piece between special tokens (`legacy: true`), and never when the text already starts with a space; so
      "  hi" gives ["▁", "▁hi"] where raw sentencepiece gives ["▁", "▁", "▁hi"];
    * decode renders special tokens as their text and strips one leading space (the dummy prefix) from the result.
    """

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        import sentencepiece as spm

        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError as e:  # pragma: no cover - protobuf ships with tensorboard / transformers
            raise ImportError("Loading tokenizer.model needs `protobuf` (pip install protobuf)") from e
        try:
            proto = pb.ModelProto.FromString(path.read_bytes())
            if not proto.pieces:
                raise TokenizerError("the model has no pieces")
        except Exception as e:
            raise TokenizerError(f"Could not load sentencepiece model {str(path)!r}: {e}") from e

        # Types in sentencepiece_model.proto: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
        pieces = [(p.piece, p.type) for p in proto.pieces]
        self.pieces = [p for p, _ in pieces]
        self.piece_to_id_map = {p: i for i, p in enumerate(self.pieces)}
        self.byte_value = {i: int(p[3:5], 16) for i, (p, kind) in enumerate(pieces) if kind == 6}  # "<0x0A>" -> 10
        add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        # We handle whitespace and the prefix ourselves (see class docstring), so the processor gets a no-op normalizer.
        spec = proto.normalizer_spec
        spec.name = "identity"
        spec.precompiled_charsmap = b""
        spec.add_dummy_prefix = False
        spec.remove_extra_whitespaces = False
        spec.escape_whitespaces = True
        proto.ClearField("denormalizer_spec")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as e:
            raise TokenizerError(f"Could not load sentencepiece model {str(path)!r}: {e}") from e

        # Special tokens default to the model's own pieces (a Llama tokenizer.model defines <unk>, <s>, </s>).
        trainer = proto.trainer_spec
        config = dict(config)
        for key, piece_id in (("bos_token", trainer.bos_id), ("eos_token", trainer.eos_id),
                              ("unk_token", trainer.unk_id), ("pad_token", trainer.pad_id)):  # fmt: skip
            if key not in config and 0 <= piece_id < len(pieces):
                config[key] = pieces[piece_id][0]
        self.config = config

        # Added tokens: content -> (id, special, lstrip, rstrip). Control/user-defined pieces come first (as
        # transformers' converter registers them), then the config's added tokens, then declared special tokens.
        self.added: dict[str, tuple[int, bool, bool, bool]] = {}
        for i, (piece, kind) in enumerate(pieces):
            if kind in (3, 4):
                self.added[piece] = (i, kind == 3, False, False)
        for idx, t in sorted(_config_added_tokens(config).items()):
            self.added[t["content"]] = (idx, bool(t.get("special")), bool(t.get("lstrip")), bool(t.get("rstrip")))
        self._size = max([len(pieces)] + [i + 1 for i, *_ in self.added.values()])
        for content, flags in _declared_special_tokens(config):
            if content in self.added:
                idx, _, lstrip, rstrip = self.added[content]
            else:  # a declared token outside the added vocab: reuse its piece, or append it like transformers does
                idx = self.piece_to_id_map.get(content, self._size)
                lstrip, rstrip = bool(flags.get("lstrip")), bool(flags.get("rstrip"))
                self._size = max(self._size, idx + 1)
            self.added[content] = (idx, True, lstrip, rstrip)
        self.id_to_added = {idx: (content, special) for content, (idx, special, _, _) in self.added.items()}
        self._added_re = self._added_tokens_regex()

        add_prefix_space = config.get("add_prefix_space")
        self.add_prefix_space = add_dummy_prefix if add_prefix_space is None else bool(add_prefix_space)
        self.legacy = bool(config.get("legacy", False))

    def _added_tokens_regex(self) -> re.Pattern | None:
        if not self.added:
            return None
        # longest first so "<|im_end|>" wins over a shorter token that is its prefix (leftmost-longest like tokenizers)
        alternatives = []
        for content, (_, _, lstrip, rstrip) in sorted(self.added.items(), key=lambda kv: -len(kv[0])):
            alternatives.append((r"\s*" if lstrip else "") + f"({re.escape(content)})" + (r"\s*" if rstrip else ""))
        return re.compile("|".join(alternatives))

    def special_id(self, key: str) -> int | None:
        content = _token_content(self.config.get(key))
        return self.token_to_id(content) if content else None

    def default_add_bos(self, config: dict[str, Any], bos_id: int) -> bool:
        # Family convention when the config is silent: a tokenizer.model that defines a bos piece (Llama, Mistral,
        # Gemma, ...) was trained with bos prepended. (transformers v4's LlamaTokenizer defaulted to True as well;
        # real Llama configs say add_bos_token: true explicitly.)
        if "add_bos_token" in config or "add_eos_token" in config:
            return bool(config.get("add_bos_token", False))
        return True

    def vocab_size(self) -> int:
        return self._size

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token][0]
        return self.piece_to_id_map.get(token)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                self._encode_chunk(text[pos : m.start()], pos, ids)
                content = next(g for g in m.groups() if g is not None)
                ids.append(self.added[content][0])
                pos = m.end()
        self._encode_chunk(text[pos:], pos, ids)
        return ids

    def _encode_chunk(self, chunk: str, offset: int, out: list[int]) -> None:
        if not chunk:
            return
        prepend = self.add_prefix_space and (self.legacy or offset == 0)
        if prepend and not chunk.startswith((" ", "▁")):
            chunk = " " + chunk
        out.extend(self.sp.encode(chunk))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Mirrors the decoder transformers builds (Replace "▁"->" ", ByteFallback, Fuse, Strip one leading space)
        # rather than calling sp.decode: the two differ on invalid byte runs (tokenizers turns *every* byte of a run
        # that isn't valid UTF-8 into U+FFFD) and sp.decode would drop control tokens.
        parts: list[str] = []
        byte_run: list[int] = []

        def flush_bytes() -> None:
            if byte_run:
                try:
                    parts.append(bytes(byte_run).decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * len(byte_run))
                byte_run.clear()

        for i in ids:
            if i in self.id_to_added:
                content, special = self.id_to_added[i]
                if special and skip_special_tokens:
                    continue
                flush_bytes()
                parts.append(content)
            elif i in self.byte_value:
                byte_run.append(self.byte_value[i])
            elif 0 <= i < len(self.pieces):
                flush_bytes()
                parts.append(self.pieces[i].replace("▁", " "))
            # ids outside the vocabulary are dropped, as the tokenizers library does
        flush_bytes()
        text = "".join(parts)
        if self.add_prefix_space and text.startswith(" "):
            text = text[1:]  # the dummy prefix added at encode time
        return text
