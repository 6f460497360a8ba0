"""Benchmark (not a test): memory of one training step per method: LoRA-FA vs LoRA vs full fine-tuning (and VeRA
when `litft.methods.METHODS` has it), at the SmolLM2-135M shape.

    python benchmarks/method_memory.py [--seq 512] [--batch 2] [--threads 1] [--methods lora,lora_fa,full]
    python benchmarks/method_memory.py --tiny        # a 2-layer, 4k-vocab model: checks the script works

The model has the SmolLM2-135M shape (random N(0, 0.02) weights, fp32), r=16 alpha=32 on all seven projections
for the adapter methods, dropout 0, AdamW, `--batch` x `--seq` tokens. Each method runs in its own process and
reports:
- trainable parameters;
- RSS after loading, and the peak RSS over two optimizer steps (VmHWM reset right before the first, so loading
  transients do not count; the optimizer state appears in the first step);
- saved activations: the bytes autograd keeps for backward in one forward (every tensor reaching
  `torch.autograd.graph.saved_tensors_hooks`, counted once per storage, leaving out the model's own parameters and
  buffers). This is what LoRA-FA changes (x·A^T instead of each adapted layer's input x), measured exactly, where
  the RSS peak also holds weights, gradients, optimizer state and allocator slack.
The last lines give LoRA-FA / LoRA as ratios: saved activations and peak RSS. Numbers go to stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: benchmarks.child, litft

from benchmarks.child import run_child  # noqa: E402

CHILD_MODULE = "benchmarks.method_memory"
SMOL = "SmolLM2-135M"


def kib(key: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def write_checkpoint(out: Path, tiny: bool) -> None:
    import torch

    from litft.checkpoint import expected_shapes, save_checkpoint
    from litft.models.config import Config

    cfg = Config.from_name(SMOL, **(dict(n_layer=2, vocab_size=4096) if tiny else {}))
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02)
          for k, s in expected_shapes(cfg).items()}
    save_checkpoint(sd, cfg, out)


def child_step(ckpt: str, method_name: str, seq: int, batch: int) -> dict:
    import torch

    from litft.methods import METHODS

    cls = METHODS[method_name]
    kw: dict = dict(checkpoint_dir=ckpt, lr=1e-4, warmup_steps=0)
    if method_name != "full":
        kw.update(r=16, alpha=32.0, dropout=0.0, targets=["all-linear"])
    if method_name == "vera":  # VeRA's rank is typically large (its paper: 256); its own defaults otherwise
        kw.pop("alpha")
        kw["r"] = 256
    m = cls(**kw)
    m.configure_model()
    m.total_steps = 3
    opt, _ = m.configure_optimizers()
    after_load = kib("VmRSS")
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, m.model.config.vocab_size, (batch, seq), generator=g)
    data = {"input_ids": x, "labels": x}

    # saved activations of one forward: storages autograd keeps, not the model's own tensors
    own = {t.untyped_storage().data_ptr() for t in [*m.model.parameters(), *m.model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m.training_step(data)
    loss.backward()
    opt.zero_grad(set_to_none=True)
    del loss
    saved = sum(seen.values())

    reset_peak()
    for _ in range(2):
        loss = m.training_step(data) / (batch * (seq - 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"trainable": sum(p.numel() for p in m.model.parameters() if p.requires_grad),
            "after_load": after_load, "peak": kib("VmHWM"), "saved": saved}


def child_main() -> None:
    kind, *rest = sys.argv[1:]
    if kind == "write":
        write_checkpoint(Path(rest[0]), rest[1] == "tiny")
        print("{}")
    elif kind == "step":
        print(json.dumps(child_step(rest[0], rest[1], int(rest[2]), int(rest[3]))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default=None, help="comma-separated METHODS names (default: lora, lora_fa, full, "
                                                  "and vera if litft has it)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 4096-token-vocab model: a quick check of the script")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from litft.methods import METHODS

    methods = args.methods.split(",") if args.methods else ["lora", "lora_fa", "full"] + (
        ["vera"] if "vera" in METHODS else [])
    with tempfile.TemporaryDirectory(prefix="litft-method-memory-") as tmp:
        ckpt = Path(tmp) / "model"
        run_child(CHILD_MODULE, args.threads, "write", str(ckpt), "tiny" if args.tiny else "full")
        shape = f"{SMOL} shape{' (tiny: 2 layers, vocab 4096)' if args.tiny else ''}"
        print(f"One training step, {shape}, fp32, batch {args.batch} x seq {args.seq}, {args.threads} thread(s)")
        print(f"{'method':<10}{'trainable':>14}{'RSS after load':>17}{'peak RSS (2 steps)':>21}"
              f"{'peak - load':>14}{'saved activations':>20}")
        res = {}
        for name in methods:
            r = res[name] = run_child(CHILD_MODULE, args.threads, "step", str(ckpt), name, str(args.seq), str(args.batch))
            print(f"{name:<10}{r['trainable']:>14,}{r['after_load'] / 1e6:>14.1f} MB{r['peak'] / 1e6:>18.1f} MB"
                  f"{(r['peak'] - r['after_load']) / 1e6:>11.1f} MB{r['saved'] / 1e6:>17.1f} MB")
    if "lora" in res and "lora_fa" in res:
        fa, lora = res["lora_fa"], res["lora"]
        print(f"LoRA-FA / LoRA: saved activations {fa['saved'] / lora['saved']:.3f}x "
              f"({lora['saved'] / fa['saved']:.2f}x lower), peak RSS {fa['peak'] / lora['peak']:.3f}x, "
              f"peak above load {(fa['peak'] - fa['after_load']) / (lora['peak'] - lora['after_load']):.3f}x, "
              f"trainable parameters {fa['trainable'] / lora['trainable']:.3f}x")
    if "vera" in res and "lora" in res:
        print(f"VeRA / LoRA trainable parameters: {res['vera']['trainable'] / res['lora']['trainable']:.4f}x")


if __name__ == "__main__":
    main()
