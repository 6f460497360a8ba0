"""litft's chat-template rendering against the oracle transformers' `apply_chat_template(tokenize=True)`, for the
templates of five real families on tokenizers trained here (tests/chat_fixtures.py)."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

from litft.chat_template import ChatTemplateError, read_chat_template  # noqa: E402
from litft.tokenizer import Tokenizer, TokenizerError, copy_tokenizer_files  # noqa: E402
from tests.chat_fixtures import CONVERSATIONS, FAMILIES, SYSTEM, write_chat_tokenizer  # noqa: E402

REAL = ["smollm2", "llama3", "llama2", "gemma", "phi3"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, tuple[Tokenizer, object]]:
    root = tmp_path_factory.mktemp("chat_tok")
    out = {}
    for family in REAL:
        d = write_chat_tokenizer(root / family, family, as_file=family in ("llama3", "phi3"))
        out[family] = (Tokenizer(d), AutoTokenizer.from_pretrained(d))
    return out


def _theirs(hf, messages, add_generation_prompt):
    return list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                       return_dict=False))


@pytest.mark.parametrize("family", REAL)
@pytest.mark.parametrize("conversation", ["single", "multi", "open"])
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_ids_equal_transformers(tokenizers, family, conversation, system, add_generation_prompt):
    ours, hf = tokenizers[family]
    messages = CONVERSATIONS["multi"][:3] if conversation == "open" else CONVERSATIONS[conversation]
    messages = ([SYSTEM] if system else []) + messages
    if system and not FAMILIES[family][4]:  # Gemma's template refuses a system turn: both must refuse
        with pytest.raises(Exception, match="System role not supported"):
            _theirs(hf, messages, add_generation_prompt)
        with pytest.raises(ChatTemplateError, match="System role not supported"):
            ours.apply_chat_template(messages, add_generation_prompt)
        return
    want = _theirs(hf, messages, add_generation_prompt)
    got = ours.apply_chat_template(messages, add_generation_prompt).tolist()
    assert got == want
    assert ours.render_chat(messages, add_generation_prompt) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("family,want", [("smollm2", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>"),
                                         ("phi3", "<|end|>"), ("llama2", "</s>")])
def test_end_of_turn_found_by_rendering(tokenizers, family, want):
    ours, _ = tokenizers[family]
    assert ours.end_of_turn_ids() == [ours.token_to_id(want)]


def test_jinja_file_wins_and_travels(tmp_path):
    d = write_chat_tokenizer(tmp_path / "a", "smollm2")
    (d / "chat_template.jinja").write_text("{{ 'from the file' }}")
    assert read_chat_template(d) == "{{ 'from the file' }}"
    copied = copy_tokenizer_files(d, tmp_path / "b")
    assert "chat_template.jinja" in copied and read_chat_template(tmp_path / "b") == "{{ 'from the file' }}"


def test_base_tokenizer_has_no_template(ckpt):
    tok = Tokenizer(ckpt)
    assert tok.chat_template is None and tok.end_of_turn_ids() == []
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template,match", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),  # the sandbox: no Python internals
    ("{% set x = messages.append(1) %}", "unsafe"),  # immutable: a template cannot change its input
    ("{{ raise_exception('bad roles') }}", "bad roles"),
    ("{% for m in messages %}", "does not compile"),
    ("{{ namespace(_x=1) }}", "_x"),
])
def test_untrusted_template_is_one_error(tmp_path, template, match):
    d = write_chat_tokenizer(tmp_path / "t", "smollm2")
    (d / "chat_template.jinja").write_text(template)
    with pytest.raises(ChatTemplateError, match=match):
        Tokenizer(d).apply_chat_template(CONVERSATIONS["single"])


def test_template_sees_special_tokens_and_filters(tmp_path):
    d = write_chat_tokenizer(tmp_path / "t", "llama3")
    (d / "chat_template.jinja").write_text(
        "{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}|{% for m in messages %}{% if loop.first %}"
        "{% continue %}{% endif %}{{ m.role }}{% endfor %}|{{ strftime_now('%Y') | length }}")
    text = Tokenizer(d).render_chat(CONVERSATIONS["single"])
    hf = AutoTokenizer.from_pretrained(d).apply_chat_template(CONVERSATIONS["single"], tokenize=False)
    assert text == hf and text.startswith("<|begin_of_text|>|<|eot_id|>|[{\"role\"")


def test_conversion_both_ways_keeps_the_template(ckpt, tmp_path):
    import shutil

    from litft.chat_template import CHAT_TEMPLATE_FILE
    from litft.convert import convert_from_litft, convert_to_litft, download

    src = tmp_path / "src"
    shutil.copytree(ckpt, src)
    (src / CHAT_TEMPLATE_FILE).write_text(FAMILIES["smollm2"][0])
    hf_dir = convert_from_litft(src, tmp_path / "hf")
    assert read_chat_template(hf_dir) == FAMILIES["smollm2"][0]  # transformers reads it from there too
    assert AutoTokenizer.from_pretrained(hf_dir).chat_template == FAMILIES["smollm2"][0]
    back = convert_to_litft(hf_dir, tmp_path / "back")
    assert read_chat_template(back) == FAMILIES["smollm2"][0]
    downloaded = download(str(hf_dir), checkpoint_dir=tmp_path / "dl")  # a local snapshot, as a hub download
    assert read_chat_template(downloaded) == FAMILIES["smollm2"][0]
