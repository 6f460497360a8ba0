"""Chat templates of real model families (their Jinja text as published in the checkpoints' tokenizer_config.json)
and test tokenizers trained on the fly that carry them, for litft-vs-transformers chat tests."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

# HuggingFaceTB/SmolLM2-*-Instruct: ChatML with a default system turn
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# meta-llama/Llama-2-7b-chat-hf ([INST] with a <<SYS>> block; no generation prompt: [/INST] ends the user turn)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# google/gemma-2b-it (no system role: it raises)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# microsoft/Phi-3-mini-4k-instruct (eos after the last turn unless a generation prompt follows)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# ChatML with {% generation %} around each assistant reply + end-of-turn: transformers' assistant-mask oracle
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# family -> (template, bos, eos, the family's other special tokens, supports a system turn)
FAMILIES: dict[str, tuple[str, str | None, str, list[str], bool]] = {
    "smollm2": (SMOLLM2, None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>"], True),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
               ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"], True),
    "llama2": (LLAMA2, "<s>", "</s>", ["<unk>"], True),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<pad>", "<start_of_turn>", "<end_of_turn>"], False),
    "phi3": (PHI3, "<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], True),
    "chatml_generation": (CHATML_GENERATION, None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>"], True),
    "llama3_generation": (LLAMA3_GENERATION, "<|begin_of_text|>", "<|eot_id|>",
                          ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"], True),
}

WORDS = ("the cat sat on a mat and you are a helpful assistant system user model what is two plus three five "
         "hello there how can I help today answer question letter repeat abc def").split()


def write_chat_tokenizer(d: Path, family: str, vocab_size: int = 400, as_file: bool = False) -> Path:
    """A byte-level BPE tokenizer with the family's special tokens and chat template, saved the way transformers
    saves one (tokenizer.json + tokenizer_config.json); `as_file` puts the template in chat_template.jinja."""
    template, bos, eos, others, _ = FAMILIES[family]
    specials = [t for t in (bos, eos, *others) if t]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "add_bos_token": False,
              "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "special": True, "normalized": False,
                                                                  "lstrip": False, "rstrip": False,
                                                                  "single_word": False} for t in specials}}
    if bos:
        config["bos_token"] = bos
    if as_file:
        (d / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        config["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return d


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is two plus three?"},
               {"role": "assistant", "content": "five"}],
    "multi": [{"role": "user", "content": "hello there"},
              {"role": "assistant", "content": "How can I help today?"},
              {"role": "user", "content": "repeat the letter a"},
              {"role": "assistant", "content": " aaa "}],
}
