"""Benchmark (not a test): what quantizing the frozen base buys, in memory and time, on CPU.

    python benchmarks/qlora_memory.py [--seq 256] [--batch 2] [--steps 3] [--threads 1] [--skip-1b] [--keep DIR]

1. Bytes of the base weights of the SmolLM2-135M shape (vocab 49152, d 576, 30 layers, tied
   embeddings; random init) for fp32, bf16, int8, nf4 and nf4-dq: the quantized Linear weights
   (codes + every statistic they need), the embedding (= the tied head) and the model in total,
   with the unquantized parts (embedding, norms) kept in bf16 as a 16-bit model would hold them;
   then int8, nf4 and nf4-dq with `quantize_embedding` (the embedding quantized too).
2. One training step of LoRA vs QLoRA (nf4-dq) on that model, r=16 alpha=32 on all seven
   projections, AdamW, dropout 0, fp32 (CPU: no bf16 units here), `--batch` x `--seq` tokens. Each
   runs in its own process; reported: the RSS after loading, the peak RSS during the training steps
   (VmHWM reset via /proc/self/clear_refs right before the first step, so loading transients do not
   count), and the median step time after one warmup step, wall clock and CPU time of the process
   (on a shared machine the CPU time is the steadier of the two: other jobs stretch the wall time).
3. Loading a ~1.2B-parameter Llama (the Llama-3.2-1B shape, random, written once as a bf16
   checkpoint of ~2.5 GB) with quantize=bnb.nf4: the whole process's peak RSS (imports included)
   against the bf16 size of the model, i.e. what a plain load would at least hold.

Every child process uses `--threads` torch threads (default 1: this machine is shared). Numbers go
to stdout as a table; tutorials/qlora.md quotes a run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: benchmarks.child, litft

from benchmarks.child import run_child  # noqa: E402

CHILD_MODULE = "benchmarks.qlora_memory"
SMOL = "SmolLM2-135M"
ONE_B = "Llama-3.2-1B"
MODES = ["bnb.int8", "bnb.nf4", "bnb.nf4-dq"]


def kib(key: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def write_random_checkpoint(name: str, out: Path, dtype: str) -> None:
    """A litft checkpoint of the named config's shape, N(0, 0.02) weights, ones for norms."""
    import torch

    from litft.checkpoint import expected_shapes, save_checkpoint
    from litft.models.config import Config

    cfg = Config.from_name(name)
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    sd = {k: (torch.ones(s, dtype=dt) if len(s) == 1 else torch.randn(s, generator=g, dtype=dt) * 0.02)
          for k, s in expected_shapes(cfg).items()}
    save_checkpoint(sd, cfg, out)


def nf4_dq_bytes(name: str, quantize_embedding: bool = False) -> tuple[int, int]:
    """(bf16 bytes, nf4-dq bytes) of a named config's base weights, by the same accounting as
    `weight_bytes` (exact: 1. checks it against the measured SmolLM2 numbers): per quantized Linear
    (and with `quantize_embedding` the embedding, which a tied head shares), n/2 code bytes + one
    uint8 absmax per 64 weights + one fp32 scale per 256 absmaxes + the offset and the two code
    books; everything else (norms, an untied lm_head, the embedding unless quantized) in bf16."""
    import torch

    from litft.adapters.quantize import DEFAULT_SKIP, quantize_targets
    from litft.models.config import Config
    from litft.models.gpt import GPT

    with torch.device("meta"):
        model = GPT(Config.from_name(name))
    total = sum(p.numel() for p in model.parameters())  # tied weights count once
    names = quantize_targets(model, DEFAULT_SKIP)
    numels = [model.get_submodule(n).weight.numel() for n in names]
    if quantize_embedding:
        numels.append(model.embed.weight.numel())
    q_numel = sum(numels)
    q_bytes = sum(-(-n // 2) + -(-n // 64) + 4 * -(-n // (64 * 256)) + 4 + 16 * 4 + 256 * 4 for n in numels)
    return 2 * total, 2 * (total - q_numel) + q_bytes


# --------------------------------------------------------------------------- children
def child_bytes(ckpt: str) -> dict:
    import torch

    from litft.adapters.quantize import load_quantized_model, weight_bytes
    from litft.checkpoint import load_model

    model = load_model(ckpt)
    fp32, emb_numel = weight_bytes(model)["total"], model.embed.weight.numel()
    del model
    res = {"fp32": {"linear": None, "total": fp32}, "bf16": {"linear": None, "total": fp32 // 2}}
    for mode in MODES:
        for quantize_embedding in (False, True):
            wb = weight_bytes(load_quantized_model(ckpt, mode, device="cpu", dtype=torch.bfloat16,
                                                   quantize_embedding=quantize_embedding))
            res[f"{mode} + embedding" if quantize_embedding else mode] = {
                "quantized": wb["quantized"], "unquantized": wb["unquantized"], "total": wb["total"]}
    res["linear_fp32"] = fp32 - 2 * res["bnb.nf4"]["unquantized"]  # what the quantized layers take in fp32
    res["embedding_fp32"] = 4 * emb_numel
    return res


def child_step(ckpt: str, method: str, seq: int, batch: int, steps: int) -> dict:
    import torch

    from litft.methods.lora import LoRA

    kw = dict(checkpoint_dir=ckpt, r=16, alpha=32.0, dropout=0.0, targets=["all-linear"], lr=2e-4, warmup_steps=0)
    if method == "qlora":
        kw["quantize"] = "bnb.nf4-dq"
    m = LoRA(**kw)
    m.configure_model()
    m.total_steps = steps + 1
    opt, _ = m.configure_optimizers()
    after_load = kib("VmRSS")
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, m.model.config.vocab_size, (batch, seq), generator=g)
    batch_ = {"input_ids": x, "labels": x}
    reset_peak()
    times, cpu, losses = [], [], []
    for _ in range(steps + 1):  # one warmup step
        t0, c0 = time.perf_counter(), time.process_time()
        loss = m.training_step(batch_) / (batch * (seq - 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss.item())
    return {"after_load": after_load, "train_peak": kib("VmHWM"), "step_s": statistics.median(times[1:]),
            "cpu_s": statistics.median(cpu[1:]), "loss0": losses[0]}


def child_load(ckpt: str, mode: str) -> dict:
    from litft.adapters.quantize import _bnb, load_quantized_model, weight_bytes

    _bnb()
    before = kib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    model = load_quantized_model(ckpt, mode, device="cpu")
    secs = time.perf_counter() - t0
    import resource

    res = {"before": before, "load_peak": kib("VmHWM"), "after": kib("VmRSS"), "seconds": secs,
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "weights": weight_bytes(model)["total"]}
    # Unquantized tensors stay mapped from the checkpoint file until first read (as with
    # litft.checkpoint.load_model), so an embedding only partly used is only partly resident.
    # Read one byte per page of every tensor to report the fully resident size too.
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    res["resident_all"] = kib("VmRSS")
    res["peak_all"] = kib("VmHWM")
    return res


def child_main() -> None:
    kind, *rest = sys.argv[1:]
    if kind == "write":
        write_random_checkpoint(rest[0], Path(rest[1]), rest[2])
        print("{}")
    elif kind == "bytes":
        print(json.dumps(child_bytes(rest[0])))
    elif kind == "step":
        print(json.dumps(child_step(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))))
    elif kind == "load":
        print(json.dumps(child_load(rest[0], rest[1])))


# --------------------------------------------------------------------------- main
def mb(n: float) -> str:
    return f"{n / 1e6:8.1f} MB"


def print_bytes(args, smol: Path) -> None:
    b = run_child(CHILD_MODULE, args.threads, "bytes", str(smol))
    bf16, lin32, emb32 = b["bf16"]["total"], b["linear_fp32"], b["embedding_fp32"]
    print(f"\n1. Base weights of the {SMOL} shape (quantized: the 210 Linear layers, + embedding: the embedding "
          "= tied head too; the rest in bf16)")
    print(f"{'format':<22}{'Linear weights':>16}{'vs fp32':>9}{'vs bf16':>9}{'embedding':>13}{'vs bf16':>9}"
          f"{'whole model':>16}{'vs bf16':>9}")
    rows = ("fp32", "bf16", *MODES, *(f"{m} + embedding" for m in MODES))
    for k in rows:
        mode, _, with_emb = k.partition(" + ")
        lin = {"fp32": lin32, "bf16": lin32 // 2}.get(k) or b[mode]["quantized"]
        emb = (emb32 if k == "fp32" else b[k]["quantized"] - b[mode]["quantized"] if with_emb else emb32 // 2)
        print(f"{k.removeprefix('bnb.'):<22}{mb(lin):>16}{lin / lin32:>8.3f}x{lin / (lin32 / 2):>8.3f}x"
              f"{emb / 1e6:>10.1f} MB{emb / (emb32 / 2):>8.3f}x{mb(b[k]['total']):>16}{b[k]['total'] / bf16:>8.3f}x")
    goal = b["bnb.nf4-dq + embedding"]["total"] / bf16
    print(f"   goal (issue 5): nf4-dq + embedding <= 0.30x of bf16 for the whole model: {goal:.3f}x, "
          f"{'met' if goal <= 0.30 else 'NOT met'}")
    for name in (SMOL, "Qwen2.5-0.5B", ONE_B, "TinyLlama-1.1B", "Llama-2-7b-hf", "Llama-3.1-8B"):
        (b16, q), (_, qe) = nf4_dq_bytes(name), nf4_dq_bytes(name, quantize_embedding=True)
        check = (f"  (measured above: {b['bnb.nf4-dq']['total']:,} / {b['bnb.nf4-dq + embedding']['total']:,} bytes; "
                 f"this formula: {q:,} / {qe:,})" if name == SMOL else "")
        print(f"   nf4-dq whole model / bf16 for the {name} shape: {q / b16:.3f}x, with the embedding quantized "
              f"{qe / b16:.3f}x{check}")


def print_steps(args, smol: Path) -> None:
    print(f"\n2. Training steps, LoRA vs QLoRA (nf4-dq), fp32 compute on CPU, batch {args.batch} x seq {args.seq}, "
          f"median of {args.steps} steps after 1 warmup step; medians over {args.repeats} alternating rounds")
    # glibc keeps freed activations in its heap, which inflates (and makes noisy) the RSS of both
    # methods; a fixed mmap threshold returns large freed blocks at once and shows the real need.
    allocators = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
    print(f"{'method':<8}{'allocator':<32}{'RSS after load':>16}{'peak RSS in steps':>20}{'step (wall)':>12}"
          f"{'step (CPU)':>12}{'loss, step 1':>14}")
    for alloc, env in allocators.items():
        runs: dict[str, list[dict]] = {"lora": [], "qlora": []}
        for _ in range(args.repeats):
            for m in runs:
                runs[m].append(run_child(CHILD_MODULE, args.threads, "step", str(smol), m, str(args.seq), str(args.batch),
                                         str(args.steps), env=env))
        res = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
        for m, r in res.items():
            print(f"{m:<8}{alloc:<32}{mb(r['after_load']):>16}{mb(r['train_peak']):>20}{r['step_s']:>11.2f}s"
                  f"{r['cpu_s']:>11.2f}s{r['loss0']:>14.4f}")
        q, l = res["qlora"], res["lora"]
        print(f"{'':<8}{alloc:<32}QLoRA / LoRA: peak RSS {q['train_peak'] / l['train_peak']:.2f}x, step time "
              f"{q['step_s'] / l['step_s']:.2f}x wall, {q['cpu_s'] / l['cpu_s']:.2f}x CPU "
              f"(load average now {os.getloadavg()[0]:.1f})")


def print_1b(args, root: Path) -> None:
    big = root / "llama-3.2-1b-bf16"
    if not (big / "model_config.yaml").is_file():
        t0 = time.perf_counter()
        run_child(CHILD_MODULE, args.threads, "write", ONE_B, str(big), "bfloat16")
        print(f"\n(wrote a random {ONE_B} checkpoint in {time.perf_counter() - t0:.0f} s)")
    size = (big / "model.safetensors").stat().st_size
    r = run_child(CHILD_MODULE, args.threads, "load", str(big), "bnb.nf4")
    print(f"\n3. Loading the {ONE_B} shape ({size / 2 / 1e9:.2f} B parameters, bf16 checkpoint "
          f"{size / 1e9:.2f} GB) with quantize=bnb.nf4, unquantized parts kept in bf16")
    print(f"process RSS before loading {mb(r['before'])}, peak while loading {mb(r['load_peak'])}, after "
          f"{mb(r['after'])}; the quantized model holds {mb(r['weights'])}; {r['seconds']:.0f} s")
    print(f"with every weight read once (all pages resident): RSS {mb(r['resident_all'])}, whole-process peak "
          f"{mb(r['peak_all'])} (ru_maxrss {mb(r['ru_maxrss'])} before that)")
    print(f"whole-process peak RSS / bf16 size of the model: {r['peak_all'] / size:.2f}x "
          f"({'below' if r['peak_all'] < size else 'NOT below'} the bf16 size)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (LoRA, QLoRA) per allocator; medians")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="1,2,3", help="which sections to run, e.g. 2,3")
    ap.add_argument("--skip-1b", action="store_true", help="same as leaving 3 out of --parts")
    ap.add_argument("--keep", type=Path, default=None, help="keep the random checkpoints here (and reuse them)")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")} - ({3} if args.skip_1b else set())
    from importlib.metadata import version

    import torch

    print(f"torch {torch.__version__}, bitsandbytes {version('bitsandbytes')}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {args.threads} thread(s) per child")
    root = args.keep or Path(tempfile.mkdtemp(prefix="qlora_bench_"))
    try:
        smol = root / "smollm2-135m-fp32"
        if parts & {1, 2} and not (smol / "model_config.yaml").is_file():
            run_child(CHILD_MODULE, args.threads, "write", SMOL, str(smol), "float32")
        if 1 in parts:
            print_bytes(args, smol)
        if 2 in parts:
            print_steps(args, smol)
        if 3 in parts:
            print_1b(args, root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
