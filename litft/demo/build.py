"""Build the demo's base model and task data from nothing: corpus -> tokenizer -> pretraining -> checkpoint.

    python -m litft.demo.build                 # rebuild everything into litft/demo/ (~5 min on 2 CPU cores)
    python -m litft.demo.build --data-only     # only regenerate data/train.json and data/test.json

Outputs (under `out_dir`):
    base/   a litft checkpoint: model.safetensors, model_config.yaml, tokenizer.json,
            tokenizer_config.json, generation_config.json
    data/   train.json, test.json (Alpaca layout: instruction / input / output)

Everything is seeded. The corpus, tokenizer and task data are identical for the same seed on any machine;
the pretrained weights are identical run to run on the same machine and torch version (float reductions
may differ across CPUs/thread counts, which changes the weights in the last bits, not the outcome).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from litft.demo.corpus import make_corpus
from litft.demo.task import make_hard_task_data, make_task_data
from litft.models.config import Config
from litft.models.gpt import GPT, chunked_cross_entropy

DEMO_DIR = Path(__file__).parent
CONFIG_NAME = "litft-demo"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS, EOS, PAD = SPECIAL_TOKENS


# -- tokenizer -------------------------------------------------------------------------------------------
def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE (GPT-2 style, so any text encodes) trained on the corpus; writes the HF files
    `litft.tokenizer.Tokenizer` reads: tokenizer.json, tokenizer_config.json, generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space: a word is the same token (" egg") at the start of a text as after a space, so a
    # response (tokenised on its own) starts with the very token the model saw in the prompt
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown characters, ever
    )
    tok.train_from_iterator(docs, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, the config wants {vocab_size}")
    # also add BOS in tokenizer.json itself, so HF tokenizers/transformers agree with tokenizer_config.json
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": Config.from_name(CONFIG_NAME).max_seq_length,
    })
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]})


# -- pretraining -----------------------------------------------------------------------------------------
def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int) -> torch.Tensor:
    """Greedily pack whole documents (<s> ... </s>) into rows of seq_len, right-padded with pad_id.

    Every row starts with <s> at position 0, as fine-tuning samples do; a document longer than a row
    is cut. Documents in one row see each other (no segment mask): harmless, and it keeps SDPA fast.
    """
    rows: list[list[int]] = []
    cur: list[int] = []
    for d in docs:
        d = d[:seq_len]
        if len(cur) + len(d) > seq_len:
            rows.append(cur)
            cur = []
        cur = cur + d
    if cur:
        rows.append(cur)
    out = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def init_weights(model: GPT) -> None:
    """GPT-2 style init: N(0, 0.02), residual output projections scaled down by sqrt(2 * n_layer).
    (nn.Embedding's default N(0, 1) with a tied head would start with huge logits.)"""
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() == 2:
            scale = 1 / math.sqrt(2 * model.config.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def pretrain(
    config: Config, rows: torch.Tensor, pad_id: int, *, steps: int, batch_size: int, lr: float,
    warmup: int = 50, weight_decay: float = 0.1, seed: int = 0, log_every: int = 50,
    callback: Callable[[int, GPT], None] | None = None,
) -> GPT:
    """A plain causal-LM loop: AdamW, linear warmup then cosine to lr/10, grad clipping.
    Rows are visited in a seeded random order (epochs reshuffle)."""
    torch.manual_seed(seed)
    model = GPT(config)
    init_weights(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen)
    cursor = 0
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(rows), generator=gen), 0
        batch = rows[order[cursor : cursor + batch_size]]
        cursor += batch_size
        labels = batch.masked_fill(batch == pad_id, -100)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        hidden = model(batch, output="hidden")
        loss_sum, n = chunked_cross_entropy(model.lm_head, hidden, labels)
        loss = loss_sum / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"pretrain step {step:5d}/{steps}  loss {loss.item():.3f}  lr {lr_at(step, steps, lr, warmup):.2e}"
                  f"  {time.perf_counter() - t0:6.1f}s", flush=True)
        if callback is not None:  # e.g. probes or snapshots while experimenting
            callback(step, model)
    model.eval()
    return model


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- task data -------------------------------------------------------------------------------------------
def write_task_data(data_dir: Path, seed: int = 0) -> None:
    train, test = make_task_data(seed=seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.json").write_text(records_to_json(train), encoding="utf-8")
    (data_dir / "test.json").write_text(records_to_json(test), encoding="utf-8")
    hard_train, hard_test = make_hard_task_data(seed=seed)
    (data_dir / "hard_train.json").write_text(records_to_json(hard_train), encoding="utf-8")
    (data_dir / "hard_test.json").write_text(records_to_json(hard_test), encoding="utf-8")


def records_to_json(records: list[dict[str, str]]) -> str:
    """A JSON list, one record per line: readable and diff-friendly."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# -- everything ------------------------------------------------------------------------------------------
def build(
    out_dir: Path | str = DEMO_DIR,
    seed: int = 0,
    *,
    model: bool = True,
    data: bool = True,
    n_docs: int = 60000,
    steps: int = 1000,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 3e-3,
    config: Config | None = None,
) -> Path:
    """Build base/ (corpus, tokenizer, pretraining, checkpoint) and/or data/ under out_dir."""
    out_dir = Path(out_dir)
    if data:
        write_task_data(out_dir / "data", seed=seed)
        print(f"wrote {out_dir / 'data'}/train.json, test.json, hard_train.json, hard_test.json", flush=True)
    if not model:
        return out_dir
    from litft.checkpoint import save_checkpoint
    from litft.tokenizer import Tokenizer

    config = config or Config.from_name(CONFIG_NAME)
    t0 = time.perf_counter()
    docs = make_corpus(n_docs, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        train_tokenizer(docs, config.vocab_size, tok_dir)
        tokenizer = Tokenizer(tok_dir)
        encoded = [tokenizer.encode(d, bos=True, eos=True).tolist() for d in docs]
        n_tokens = sum(len(d) for d in encoded)
        rows = pack_documents(encoded, seq_len, tokenizer.pad_id)
        print(f"corpus: {n_docs} documents, {n_tokens / 1e6:.2f}M tokens, {len(rows)} rows of {seq_len}; "
              f"{steps * batch_size * seq_len / n_tokens:.2f} epochs", flush=True)
        gpt = pretrain(config, rows, tokenizer.pad_id, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        save_checkpoint(gpt.state_dict(), config, out_dir / "base", tokenizer_dir=tok_dir)
    n_params = sum(p.numel() for p in gpt.parameters())
    print(f"saved {out_dir / 'base'} ({n_params / 1e6:.2f}M parameters) in {time.perf_counter() - t0:.0f}s", flush=True)
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DEMO_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-only", action="store_true", help="only regenerate data/train.json and data/test.json")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    build(args.out_dir, args.seed, model=not args.data_only, steps=args.steps)


if __name__ == "__main__":
    main()
