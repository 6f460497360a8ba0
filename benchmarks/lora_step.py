"""Benchmark (not a test): one LoRA fine-tuning step of litft vs HF transformers + peft (and LitGPT) on CPU.

    python benchmarks/lora_step.py [--seq 512] [--batch 2] [--rank 16] [--steps 4] [--repeats 3]
                                   [--only litft|hf|litgpt] [--litgpt-python VENV/bin/python] [--sweep]
                                   [--litft-mkl] [--litft-torch]
                                   [--dtype fp32|bf16] [--profile litft|hf] [--no-roofline | --roofline-only]
                                   [--model 135m|360m|1b] [--account] [--qlora]
    python benchmarks/lora_step.py --scale [--models 135m,360m,1b] [--seqs 512,1024,2048,4096] [--steps 1]

`--litgpt-python` adds LitGPT 0.5.13 as a third contender, run through ../shared/bench/peers_step.py in its
own virtualenv (`python -m venv peers-lit && peers-lit/bin/pip install torch==2.13.0 litgpt==0.5.13`).
`--sweep` prints litft vs HF over sequence length 256..2048 and rank 8..128 instead.
`--model` runs at the SmolLM2-360M or Llama-3.2-1B shape (litft's configs; default SmolLM2-135M); `--scale` prints
litft vs HF per model and sequence length (batch 1, one run each, alternating) with the memory account;
`--account` adds where the training peak goes (base weights, activations saved for backward counted with
saved_tensors_hooks, LoRA params + grads + AdamW state, the rest); `--qlora` compares litft's `quantize:
bnb.nf4-dq` with HF + peft + bitsandbytes (nf4, double quantization, fp32 compute) loading a saved HF checkpoint.

Same model shape, same weights, same tokens, same settings as /work/shared/bench/peers_step.py:
SmolLM2-135M shape (vocab 49152, d 576, 30 layers, 9 heads, 3 kv heads, MLP 1536, tied embeddings,
rope theta 1e5), random init, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, dropout 0, AdamW lr 2e-4,
fp32, seq 512, batch 2; the step time is the median of `--steps` steps after two warmup steps (litft's thread
chooser probes during them: all threads, then one; so every timed step runs at the count it settled on).

* The base weights are HF `LlamaForCausalLM`'s init with seed 0: the HF child builds them in place
  (as peers_step.py does), litft loads them from a litft checkpoint converted once from that same
  init, so both start from *identical* weights and tokens: their step-1 losses agree to ~1e-5
  (printed), which shows they do the same work.
* litft is timed through its real training path: `litft.methods.lora.LoRA(checkpoint_dir=...)`,
  `.configure_model()`, `.configure_optimizers()`, `.training_step(batch)` / n_tokens, backward,
  optimizer step, zero_grad -- what `litft finetune lora` runs per step, minus Fabric's thin wrapper,
  gradient clipping and the LR scheduler.
* Each contender runs in its own subprocess (peak RSS per contender), alternating litft, hf, litft, hf,
  ... for `--repeats` rounds; the parent prints medians and the ratios litft / HF.
* Two peaks are reported: `peak_rss` = `ru_maxrss` of the child (whole process: imports, weight
  loading, training) and `train_peak` = VmHWM after resetting it (`/proc/self/clear_refs` = 5) right
  before the first step, i.e. the peak while training only (setup transients such as reading the
  safetensors file excluded).
* Noise: for every run the child reads /proc/stat and reports how many cores *other* processes used
  during its timed steps (`other_cores`); on this shared 2-core machine anything above ~0.1 means the
  numbers are disturbed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

V, D, L, NH, NKV, HD, FF = 49152, 576, 30, 9, 3, 64, 1536
# `--model`: the litft config whose shape the step runs at; `use_model` rebinds the shape constants above
MODELS = {"135m": "SmolLM2-135M", "360m": "SmolLM2-360M", "1b": "Llama-3.2-1B"}
MODEL = "135m"
R, ALPHA, LR = 16, 32.0, 2e-4
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED, DATA_SEED = 0, 1234
# untimed steps first: litft's training loop probes its thread count on its first two steps (all threads, then one;
# litft/threads.py, probe=1), so a single timed step after one warmup would be the one-thread probe
WARMUP = 2


def use_model(key: str) -> None:
    """Run at another model's shape: rebind the module's shape constants (every function reads them)."""
    global V, D, L, NH, NKV, HD, FF, MODEL
    from litft.models.config import Config

    c = Config.from_name(MODELS[key])
    V, D, L, NH, NKV, HD, FF, MODEL = (c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.head_dim,
                                       c.intermediate_size, key)


# ----------------------------------------------------------------------------- FLOP model
BUSY_LOOP = ("import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\n"
             "while True: a = (a @ a).tanh_()")  # another job on the machine (as in generate_speed.py)


def flop_model(seq: int, r: int = R) -> dict[str, float]:
    """FLOP per token of one LoRA training step (forward + backward), matmuls only.

    A frozen Linear with N weights costs 2N forward + 2N backward (input grad only, no weight
    grad) = 4N; a LoRA pair (A: r x in, B: out x r, N_lora = r (in + out)) is trained, so 6 N_lora;
    attention scores QK^T and AV cost 2 * 2 * d * T per token per layer forward (counted over the
    full T x T square, as the ~673 MFLOP reference does; a causal kernel can skip half) and twice
    that backward: 3 * 4 * d * T per layer.
    """
    per_layer = D * NH * HD + 2 * D * NKV * HD + NH * HD * D + 3 * D * FF
    n_blocks = L * per_layer
    n_head = D * V  # tied lm_head, frozen
    lora_per_layer = r * ((D + NH * HD) + 2 * (D + NKV * HD) + (NH * HD + D) + 2 * (D + FF) + (FF + D))
    n_lora = L * lora_per_layer
    attn = L * 3 * 4 * (NH * HD) * seq
    total = 4 * (n_blocks + n_head) + 6 * n_lora + attn
    return dict(n_frozen_matmul=n_blocks + n_head, n_blocks=n_blocks, n_head=n_head, n_lora=n_lora,
                frozen=4 * (n_blocks + n_head), lora=6 * n_lora, attn=attn, total=total,
                attn_causal_saving=attn / 2, ce_recompute=2 * n_head)


# ----------------------------------------------------------------------------- machine info
def machine_info() -> dict[str, str]:
    from litft.train import cpu_bf16_units  # the check litft uses for its precision note
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except FileNotFoundError:
        pass
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni"]
    return dict(model=info.get("Model name", "?"), cpus=info.get("CPU(s)", "?"),
                flags=" ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted),
                bf16_hw=cpu_bf16_units(), amx="amx_bf16" in flags)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def busy_jiffies() -> int:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal  # steal: another VM on our cores


def own_jiffies() -> int:
    f = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime (all threads)


# ----------------------------------------------------------------------------- roofline
def step_matmuls(seq: int, batch: int, r: int = R) -> list[tuple[str, int, int, int, float]]:
    """The step's matmuls as (name, M, K, N, how many), (M x K) @ (K x N), M = batch * seq tokens.

    Frozen Linears: forward (M, in, out) and input gradient (M, out, in); the tied head in 512-token
    chunks; LoRA's six thin products per layer and target at the speed of the x A^T shape; attention
    (scores and values, forward and backward, full square as in `flop_model`) as batched matmuls.
    Their FLOPs add up to `flop_model(seq, r)['total'] * batch * seq`.
    """
    T = batch * seq
    head_chunks = batch * (seq - 1) / 512
    lora_flop = 6 * flop_model(seq, r)["n_lora"] * T
    attn_flop = flop_model(seq, r)["attn"] * T
    return [
        ("q/o fwd + dgrad", T, D, NH * HD, 4 * L),
        ("k/v fwd", T, D, NKV * HD, 2 * L),
        ("k/v dgrad", T, NKV * HD, D, 2 * L),
        ("gate/up fwd, down dgrad", T, D, FF, 3 * L),
        ("down fwd, gate/up dgrad", T, FF, D, 3 * L),
        ("head fwd (512-token chunks)", 512, D, V, head_chunks),
        ("head dgrad", 512, V, D, head_chunks),
        ("LoRA x A^T (all LoRA FLOPs)", T, D, r, lora_flop / (2 * T * D * r)),
        ("attention (bmm, per head)", seq, HD, seq, attn_flop / (2 * seq * HD * seq)),
    ]


def roofline(seq: int, batch: int, r: int = R, reps: int = 10) -> tuple[list[dict], dict]:
    """Best-of-`reps` GFLOP/s of every matmul shape of the step, with torch.matmul (MKL for fp32 on CPU)
    and with oneDNN (what litft's fp32 CPU path uses, `litft.cpu_kernels`), plus bf16 torch.matmul; and the
    step roofline: the step's matmul FLOPs over the time they take at each shape's best measured speed."""
    import torch

    from litft import cpu_kernels as lm

    def onednn_mm(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")

    kernels = {"fp32 torch.matmul": (torch.float32, torch.matmul), "bf16 torch.matmul": (torch.bfloat16, torch.matmul)}
    if lm._onednn_works():
        kernels["fp32 oneDNN"] = (torch.float32, onednn_mm)
    rows = []
    for name, m, k, n, count in step_matmuls(seq, batch, r):
        row = dict(name=name, shape=f"({m}x{k})@({k}x{n})", flop=2 * m * k * n * count)
        for kname, (dtype, fn) in kernels.items():
            if name.startswith("attention"):  # (B * heads) (seq x hd) @ (hd x seq) products: torch.bmm in every column
                a, b = torch.randn(batch * NH, m, k, dtype=dtype), torch.randn(batch * NH, k, n, dtype=dtype)
                fn, per_call = torch.matmul, 2 * m * k * n * batch * NH
            else:
                a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
                per_call = 2 * m * k * n
            for _ in range(2):
                fn(a, b)
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                fn(a, b)
                best = min(best, time.perf_counter() - t)
            row[kname] = per_call / best / 1e9
        rows.append(row)
    total = sum(r_["flop"] for r_ in rows)
    fp32 = [k for k in kernels if k.startswith("fp32")]
    summary = {k: total / sum(r_["flop"] / (r_[k] * 1e9) for r_ in rows) / 1e9 for k in kernels}
    summary["fp32 best kernel per shape"] = total / sum(r_["flop"] / (max(r_[k] for k in fp32) * 1e9) for r_ in rows) / 1e9
    summary["fp32 best single shape"] = max(r_[k] for r_ in rows for k in fp32)
    return rows, summary


# ----------------------------------------------------------------------------- children
def hf_config():
    from transformers import LlamaConfig

    if MODEL != "135m":  # the shape from litft's own config (rope theta, llama3 rope scaling of Llama-3.2-1B)
        from litft.models.config import Config
        from litft.models.hf import config_to_hf

        cfg = LlamaConfig(**config_to_hf(Config.from_name(MODELS[MODEL])))
        cfg._attn_implementation = "sdpa"
        return cfg
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                      num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return cfg


def prepare(out: Path, dtype_name: str, hf_too: bool = False) -> None:
    """The base weights for litft: HF init (seed 0) converted to a litft checkpoint. The HF child
    re-creates the identical weights by the same seeded init (checked by the equal step-1 losses).
    `hf_too` (QLoRA): also save them as an HF checkpoint, which bitsandbytes quantizes while it loads."""
    import torch
    from transformers import LlamaForCausalLM

    from litft.checkpoint import save_checkpoint
    from litft.models.config import Config
    from litft.models.hf import hf_to_litft

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32  # bf16-mixed: fp32 weights
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(hf_config()).to(dtype)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = Config.from_name(MODELS[MODEL])
    save_checkpoint(dict(hf_to_litft(config, sd.items())), config, out / "litft")
    if hf_too:
        model.save_pretrained(out / "hf")


def child(args) -> None:
    import torch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32  # bf16-mixed: fp32 weights, bf16 autocast
    torch.manual_seed(SEED)
    t_setup = time.perf_counter()
    if args.child == "litft":
        from litft.methods.lora import LoRA

        if os.environ.get("LORA_STEP_BNB_4BIT") == "1":  # the --litft-bnb-4bit contender
            from litft.adapters.lora import LoRALinear

            LoRALinear._can_fuse_4bit = lambda self, x: False
        m = LoRA(checkpoint_dir=Path(args.ckpt) / "litft", r=args.rank, alpha=ALPHA, dropout=0.0, targets=TARGETS, lr=LR,
                 warmup_steps=0, gradient_checkpointing=args.gradient_checkpointing,
                 **({"quantize": "bnb.nf4-dq"} if args.qlora else {}))
        m.configure_model()
        m.train()
        opt, _ = m.configure_optimizers()
        model = m.model
        from litft import native
        from litft.cpu_kernels import onednn_enabled

        path = ("litft.methods.lora.LoRA.training_step (the `litft finetune lora` path, minus Fabric); fp32 CPU matmuls: "
                + ("oneDNN" if onednn_enabled() else "torch (MKL)") + "; attention, RMSNorm, SwiGLU: "
                + ("litft's kernels (litft/native.py)" if native.enabled() else "torch (SDPA, ...)")
                + ("; QLoRA: quantize bnb.nf4-dq (litft.adapters.quantize.load_quantized_model), 4-bit products "
                   + ("through bitsandbytes' Linear4bit" if os.environ.get("LORA_STEP_BNB_4BIT") == "1"
                      else "dequantized by litft's kernel into a reused buffer") if args.qlora else ""))

        def forward(x):
            return m.training_step({"input_ids": x, "labels": x}) / (x.shape[0] * (x.shape[1] - 1))
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        if args.qlora:  # the standard HF QLoRA: bitsandbytes quantizes the checkpoint `prepare` saved while loading it
            from transformers import BitsAndBytesConfig

            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=dtype)
            model = LlamaForCausalLM.from_pretrained(Path(args.ckpt) / "hf", quantization_config=bnb, dtype=dtype,
                                                     device_map="cpu", attn_implementation="sdpa")
        else:
            model = LlamaForCausalLM(hf_config())  # seed 0: the same init `prepare` wrote for litft
            model = model.to(dtype)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        path = "transformers LlamaForCausalLM (sdpa) + peft get_peft_model" + (
            " + bitsandbytes BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute fp32)" if args.qlora else "")

        def forward(x):
            return model(input_ids=x, labels=x).loss
    t_setup = time.perf_counter() - t_setup
    ntrain = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ntotal = sum(p.numel() for p in model.parameters())
    x = torch.randint(0, V, (args.batch, args.seq), generator=torch.Generator().manual_seed(DATA_SEED))

    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)  # started after the warmup step
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm_reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the training-only peak from here
    except OSError:
        hwm_reset = False
    times, losses = [], []
    busy0 = own0 = wall0 = None
    saved: dict[int, int] = {}  # `--account`: storage -> bytes autograd keeps for backward (warmup step's forward)
    # litft's training loop times its steps and picks all threads or one (litft/threads.py): so does its contender
    from contextlib import nullcontext

    from litft.threads import ThreadChooser

    chooser = ThreadChooser(probe=1) if args.child == "litft" else None
    # bf16-mixed: the forward (and loss) under CPU autocast, backward outside it, as Fabric's MixedPrecision does
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16-mixed" else nullcontext()
    for i in range(args.steps + WARMUP):
        if i == WARMUP:  # the steps before are warmup; measure the machine's load over the timed steps
            busy0, own0, wall0 = busy_jiffies(), own_jiffies(), time.perf_counter()
            if prof is not None:
                prof.start()
        with chooser.step() if chooser else nullcontext():
            t0 = time.perf_counter()
            if i == 0 and args.account:
                with torch.autograd.graph.saved_tensors_hooks(*saved_activation_hooks(model, saved)), autocast:
                    loss = forward(x)
            else:
                with autocast:
                    loss = forward(x)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
        times.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
        losses.append(loss.item())
    hz = os.sysconf("SC_CLK_TCK")
    wall = time.perf_counter() - wall0
    own_cores = (own_jiffies() - own0) / hz / wall
    other_cores = max(0.0, (busy_jiffies() - busy0) / hz / wall - own_cores)
    hwm = None
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    timed = times[WARMUP:]
    med = lambda j: statistics.median(t[j] for t in timed)  # noqa: E731
    res = dict(impl=args.child, path=path, dtype=args.dtype, threads=torch.get_num_threads(), seq=args.seq,
               batch=args.batch, steps=args.steps, trainable=ntrain, total=ntotal, setup_s=t_setup,
               step_s=med(0), best_s=min(t[0] for t in timed), fwd_s=med(1), bwd_s=med(2), opt_s=med(3), all_step_s=[t[0] for t in timed],
               warmup_s=times[0][0], tok_s=args.batch * args.seq / med(0),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, setup_rss_mb=setup_rss,
               train_peak_mb=hwm if hwm_reset else None, loss_first=losses[0], loss_last=losses[-1],
               own_cores=own_cores, other_cores=other_cores)
    if args.account:
        res.update(memory_account(model, opt, saved))
        status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
        # after the steps: anonymous memory (tensors, allocator) vs file-backed pages (libraries, mapped checkpoint)
        res.update({k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")})
    if prof is not None:
        prof.stop()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows), flush=True)
    print("RESULT " + json.dumps(res), flush=True)


def saved_activation_hooks(model, saved: dict[int, int]):
    """saved_tensors_hooks that record every storage autograd keeps for backward (once, at its full size),
    leaving out the model's own parameters and buffers; tensors pass through unchanged (as in
    benchmarks/method_memory.py)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    return pack, lambda t: t


def memory_account(model, opt, saved: dict[int, int]) -> dict[str, int]:
    """Bytes of the frozen base weights (quantized: codes + statistics; tied tensors once), of the activations
    saved for backward (one forward), and of the trainable parameters + their gradients + AdamW's state."""
    from litft.adapters.quantize import weight_bytes  # counts bnb 4-bit layers of HF models too

    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if hasattr(t, "numel"))
    return dict(weights_b=weight_bytes(model)["total"] - trainable, saved_b=sum(saved.values()),
                lora_opt_b=2 * trainable + state)


def run_litgpt(args) -> dict:
    """LitGPT 0.5.13 through ../shared/bench/peers_step.py in its own virtualenv (its pins conflict with
    current transformers). Same shape, LoRA settings, batch and sequence; its own random init and tokens,
    so its loss is not comparable. Reports median step time and ru_maxrss only (no fwd/bwd split)."""
    cmd = [args.litgpt_python, str(args.peers_script), "litgpt", args.dtype, str(args.seq), str(args.batch),
           str(args.steps)]
    busy0, t0 = busy_jiffies(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"litgpt run failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    line = next(l for l in reversed(p.stdout.splitlines()) if l.startswith("litgpt "))
    kv = dict(f.split("=", 1) for f in line.split()[2:])
    wall = time.perf_counter() - t0
    busy = (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") / wall  # whole machine, incl. this run
    return dict(impl="litgpt", path="litgpt.lora.GPT (0.5.13) via shared/bench/peers_step.py", step_s=float(kv["step_s"]),
                best_s=float(kv["step_s"]), tok_s=float(kv["tok_s"]), fwd_s=None, bwd_s=None, opt_s=None,
                peak_rss_mb=float(kv["peak_rss_mb"]), train_peak_mb=None, loss_first=float("nan"),
                loss_last=float(kv["loss"]), own_cores=None, other_cores=max(0.0, busy - 2.0),
                trainable=int(kv["trainable"]), total=int(kv["total"]))


def run_child(impl: str, args, ckpt: Path, profile: bool = False) -> dict:
    if impl == "litgpt":
        return run_litgpt(args)
    env = dict(os.environ)
    if impl == "litft_mkl":  # litft with torch's own fp32 matmul (MKL) instead of oneDNN: what that lever buys
        impl, env["LITFT_CPU_MATMUL"] = "litft", "torch"
    if impl == "litft_torch":  # litft with torch's SDPA, RMSNorm and SwiGLU ops instead of litft/native.py's kernels
        impl, env["LITFT_CPU_KERNELS"] = "litft", "torch"
    if impl == "litft_bnb4bit":  # --qlora: litft's 4-bit base through bitsandbytes' own matmul (the path before)
        impl, env["LORA_STEP_BNB_4BIT"] = "litft", "1"
    if impl == "litft_fixed":  # litft keeping torch's thread count (no ThreadChooser): what the chooser buys
        impl, env["LITFT_ADAPTIVE_THREADS"] = "litft", "0"
    cmd = [sys.executable, __file__, "--child", impl, "--ckpt", str(ckpt), "--seq", str(args.seq), "--batch",
           str(args.batch), "--steps", str(args.steps), "--dtype", args.dtype, "--rank", str(args.rank),
           "--model", args.model]
    cmd += ["--account"] if args.account else []
    cmd += ["--qlora"] if args.qlora else []
    if args.gradient_checkpointing and impl == "litft":
        cmd.append("--gradient-checkpointing")
    if profile:
        cmd += ["--profile", impl, "--profile-rows", str(args.profile_rows)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{impl} child failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    lines = p.stdout.splitlines()
    res = json.loads(next(l for l in reversed(lines) if l.startswith("RESULT "))[7:])
    res["stdout"] = "\n".join(l for l in lines if not l.startswith("RESULT "))
    return res


# ----------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=None, help="default 2 (--scale: 1)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after 2 warmup steps)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of alternating runs")
    ap.add_argument("--only", choices=["litft", "hf", "litgpt"])
    ap.add_argument("--litft-mkl", action="store_true",
                    help="add litft with LITFT_CPU_MATMUL=torch (MKL fp32 matmuls) as a contender (see litft/cpu_kernels.py)")
    ap.add_argument("--litft-bnb-4bit", action="store_true",
                    help="with --qlora: add litft whose LoRA layers call bitsandbytes' Linear4bit (its dequantize + "
                         "matmul) instead of litft's fused path (litft.cpu_kernels.dequantize_4bit)")
    ap.add_argument("--litft-torch", action="store_true",
                    help="add litft with LITFT_CPU_KERNELS=torch (SDPA and torch's RMSNorm/SwiGLU ops instead of "
                         "litft/native.py's kernels) as a contender")
    ap.add_argument("--rank", type=int, default=R)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="litft recomputes each block in backward (activation checkpointing)")
    ap.add_argument("--litgpt-python", default=os.environ.get("LITGPT_PYTHON"),
                    help="python of a virtualenv with litgpt (see ../shared/bench/peers_step.py); default $LITGPT_PYTHON; "
                         "unset: LitGPT is not run")
    ap.add_argument("--peers-script", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "bench" / "peers_step.py")
    ap.add_argument("--sweep", action="store_true",
                    help="instead of the main comparison: litft vs HF over seq 256..2048 (r 16) and r 8..128 (seq 512), "
                         "one run each, alternating")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "bf16-mixed"], default="fp32",
                    help="bf16: bf16 weights and activations (litft's --precision bf16-true); bf16-mixed: fp32 weights, "
                         "the forward under torch.autocast('cpu', bfloat16) as Lightning's bf16-mixed runs it")
    ap.add_argument("--litft-fixed-threads", action="store_true",
                    help="add litft with LITFT_ADAPTIVE_THREADS=0 (torch's thread count throughout) as a contender")
    ap.add_argument("--busy", type=int, default=0,
                    help="other busy processes (a single-threaded matmul loop each) running during the timed runs: the "
                         "shared-host case")
    ap.add_argument("--model", choices=list(MODELS), default="135m",
                    help="the shape: " + ", ".join(f"{k} = {v}" for k, v in MODELS.items()) + " (random HF init, seed 0)")
    ap.add_argument("--scale", action="store_true",
                    help="instead of the main comparison: litft vs HF per model of --models and sequence length of "
                         "--seqs (batch 1 unless --batch), one run each, alternating, with the memory account")
    ap.add_argument("--models", default="135m,360m,1b", help="--scale: comma-separated --model values")
    ap.add_argument("--seqs", default="512,1024,2048,4096", help="--scale: comma-separated sequence lengths")
    ap.add_argument("--account", action="store_true",
                    help="also report where memory goes: base weight bytes, saved-activation bytes (saved_tensors_hooks, "
                         "warmup step), LoRA params + grads + AdamW state, the rest of the training peak")
    ap.add_argument("--qlora", action="store_true",
                    help="QLoRA: litft quantize=bnb.nf4-dq vs HF + peft + bitsandbytes (nf4, double quant, fp32 compute)")
    ap.add_argument("--profile", choices=["litft", "hf"], help="instead of timing: torch.profiler top ops of one run")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--roofline-only", action="store_true", help="print machine info, FLOP model and roofline; exit")
    ap.add_argument("--child", choices=["litft", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = args.batch or (1 if args.scale else 2)
    use_model(args.model)
    if args.prepare:
        return prepare(Path(args.prepare), args.dtype, hf_too=args.qlora)
    if args.child:
        return child(args)

    import signal

    import torch

    # on SIGTERM unwind normally: subprocess.run kills the running child, the temp checkpoint is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated by SIGTERM (partial results above)"))
    mi = machine_info()
    print(f"# litft vs HF+peft: one LoRA step, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"cpu: {mi['model']}, {mi['cpus']} CPUs; torch threads {torch.get_num_threads()}; "
          f"torch {torch.__version__}")
    print(f"flags: {mi['flags']}")
    print(f"bf16: {'avx512_bf16/amx present: bf16 dot products run in hardware' if mi['bf16_hw'] else 'no bf16 hardware: bf16 is emulated, use fp32'}"
          f"{'' if mi['amx'] else ' (no AMX tiles)'}")
    print(f"load average at start: {loadavg()}")
    if args.scale:
        return scale(args)
    if args.model != "135m" or args.qlora:
        print(f"model: the {MODELS[args.model]} shape (vocab {V}, d {D}, {L} layers, {NH} heads / {NKV} kv heads, "
              f"MLP {FF}, tied){'; QLoRA: the frozen base quantized to nf4 with double quantization' if args.qlora else ''}")

    fm = flop_model(args.seq)
    print(f"\n## FLOP model (per token, seq {args.seq})")
    print(f"  4 * N_frozen  = 4 * ({fm['n_blocks']/1e6:.2f}M blocks + {fm['n_head']/1e6:.2f}M tied head) = {fm['frozen']/1e6:.1f} MFLOP")
    print(f"  6 * N_lora    = 6 * {fm['n_lora']/1e6:.3f}M = {fm['lora']/1e6:.1f} MFLOP")
    print(f"  attention     = n_layer * 3 * 4 * d_attn * T = {L} * 12 * {NH*HD} * {args.seq} = {fm['attn']/1e6:.1f} MFLOP "
          f"(full square; causal kernels may skip {fm['attn_causal_saving']/1e6:.1f})")
    print(f"  total         = {fm['total']/1e6:.1f} MFLOP/token" + ("  (reference: ~673)" if args.model == "135m" else ""))
    print(f"  (litft forms the head's input gradient inside the loss's forward: no logits kept or recomputed)")

    peak = None
    if not args.no_roofline:
        rows, summary = roofline(args.seq, args.batch, args.rank)
        kernels = [k for k in rows[0] if k not in ("name", "shape", "flop")]
        print("\n## matmul roofline (GFLOP/s, best of 10, every matmul shape of the step)\n")
        print("| matmul | shape | share of step FLOPs | " + " | ".join(kernels) + " |")
        print("|---|---|---|" + "---|" * len(kernels))
        total = sum(r["flop"] for r in rows)
        for r in rows:
            print(f"| {r['name']} | {r['shape']} | {100 * r['flop'] / total:.1f}% | " + " | ".join(f"{r[k]:.0f}" for k in kernels) + " |")
        print("\nstep roofline (the step's matmul FLOPs at each shape's measured speed):")
        for k, v in summary.items():
            print(f"  {k:<28} {v:7.1f} GFLOP/s")
        peak = summary["fp32 best kernel per shape"] if args.dtype == "fp32" else summary["bf16 torch.matmul"]
        print(f"'% of roofline' below is achieved GFLOP/s over {peak:.1f} ({'fp32 best kernel per shape' if args.dtype == 'fp32' else 'bf16'})")
    if args.roofline_only:
        return

    with tempfile.TemporaryDirectory(prefix="litft-bench-") as tmp:
        ckpt = Path(tmp)
        t = time.perf_counter()
        prepare_weights(args, ckpt)
        print(f"\nshared base weights (HF init, seed {SEED}) written in {time.perf_counter() - t:.1f}s")

        if args.profile:
            res = run_child(args.profile, args, ckpt, profile=True)
            print(f"\n## torch.profiler, {args.profile}, {args.steps} steps after {WARMUP} warmup (self CPU time)")
            print(res["stdout"])
            print(f"step {res['step_s']:.2f}s = forward {res['fwd_s']:.2f} + backward {res['bwd_s']:.2f} + "
                  f"optimizer {res['opt_s']:.3f} (medians, with profiler overhead); other_cores {res['other_cores']:.2f}")
            return

        if args.sweep:
            return sweep(args, ckpt, peak)
        impls = [args.only] if args.only else ["litft", "hf"] + (["litgpt"] if args.litgpt_python else [])
        impls += ["litft_mkl"] if args.litft_mkl else []
        impls += ["litft_torch"] if args.litft_torch else []
        impls += ["litft_fixed"] if args.litft_fixed_threads else []
        impls += ["litft_bnb4bit"] if args.litft_bnb_4bit else []
        if not args.only and not args.litgpt_python:
            print("\n(LitGPT not run: pass --litgpt-python, see ../shared/bench/peers_step.py for its virtualenv)")
        results: dict[str, list[dict]] = {i: [] for i in impls}
        print(f"\n## runs (seq {args.seq}, batch {args.batch}, r {args.rank}, {args.steps} timed steps after {WARMUP} warmup, "
              f"{args.dtype})")
        busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
        if busy:
            print(f"({args.busy} busy process(es) running beside the contenders)")
            time.sleep(1.0)
        try:
            for rnd in range(args.repeats):
                for impl in impls:
                    r = run_child(impl, args, ckpt)
                    results[impl].append(r)
                    print(f"  round {rnd + 1} {impl:<6} {describe(r)}  load {loadavg()}", flush=True)
        finally:
            for p in busy:
                p.kill()

    print(f"\nload average at end: {loadavg()}")
    for impl in impls:
        print(f"{impl}: {results[impl][0]['path']}")
    med = {i: {k: statistics.median(r[k] for r in rs) for k in
               ("tok_s", "step_s", "fwd_s", "bwd_s", "opt_s", "peak_rss_mb", "train_peak_mb", "other_cores")
               if all(r[k] is not None for r in rs)} for i, rs in results.items()}
    print(f"\n## medians over {args.repeats} runs (each run: median of {args.steps} steps)\n")
    print("| | tokens/s | best tokens/s | step s | fwd s | bwd s | opt s | peak RSS MB | train peak MB | achieved GFLOP/s | % of roofline | trainable / total | other cores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda m, k, fmt: format(m[k], fmt) if k in m else "-"  # noqa: E731
    for impl in impls:
        m, r0 = med[impl], results[impl][0]
        gf = m["tok_s"] * fm["total"] / 1e9
        pct = f"{100 * gf / peak:.0f}%" if peak else "-"
        best = args.batch * args.seq / min(r["best_s"] for r in results[impl])
        print(f"| {impl} | {m['tok_s']:.1f} | {best:.1f} | {m['step_s']:.2f} | {f(m, 'fwd_s', '.2f')} | {f(m, 'bwd_s', '.2f')} | "
              f"{f(m, 'opt_s', '.3f')} | {m['peak_rss_mb']:.0f} | {f(m, 'train_peak_mb', '.0f')} | {gf:.1f} | {pct} | "
              f"{r0['trainable']:,} / {r0['total']:,} | {m['other_cores']:.2f} |")
    if "litft" in impls:
        for peer in [i for i in impls if i != "litft"]:
            a, b = med["litft"], med[peer]
            ratios = [ra["tok_s"] / rb["tok_s"] for ra, rb in zip(results["litft"], results[peer])]
            print(f"\nlitft / {peer} tokens/s: {a['tok_s'] / b['tok_s']:.2f} (medians; per round: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)});  peak RSS: {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}", end="")
            if "train_peak_mb" in a and "train_peak_mb" in b:
                print(f";  training-only peak: {a['train_peak_mb'] / b['train_peak_mb']:.2f}", end="")
        print()
        if "hf" in impls:
            print(f"loss at step 1 (same weights, same tokens; ln V = {math.log(V):.3f}): "
                  f"litft {results['litft'][0]['loss_first']:.6f}, HF {results['hf'][0]['loss_first']:.6f}")
        if args.qlora and "hf" in impls:
            rss, tok = med["litft"]["peak_rss_mb"] / med["hf"]["peak_rss_mb"], med["litft"]["tok_s"] / med["hf"]["tok_s"]
            print(f"QLoRA goal (<= 0.6x HF + bnb's peak RSS at >= 1.3x its tokens/s): peak RSS {rss:.2f}x "
                  f"({'met' if rss <= 0.6 else 'NOT met'}), tokens/s {tok:.2f}x ({'met' if tok >= 1.3 else 'NOT met'})")
    if args.account:
        print_account([(impl, r) for impl in impls for r in results[impl]])


def describe(r: dict) -> str:
    split = (f"fwd {r['fwd_s']:5.2f} bwd {r['bwd_s']:5.2f} opt {r['opt_s']:.3f}  " if r["fwd_s"] is not None else "")
    cores = (f"own {r['own_cores']:.2f} other {r['other_cores']:.2f} cores" if r["own_cores"] is not None
             else f"other ~{r['other_cores']:.2f} cores")
    train = f"train_peak {r['train_peak_mb']:6.0f}MB  " if r["train_peak_mb"] is not None else ""
    return (f"step {r['step_s']:6.2f}s  {r['tok_s']:7.1f} tok/s  {split}peak_rss {r['peak_rss_mb']:6.0f}MB {train}"
            f"loss {r['loss_first']:.5f}->{r['loss_last']:.5f}  {cores}")


def prepare_weights(args, ckpt: Path) -> None:
    p = subprocess.run([sys.executable, __file__, "--prepare", str(ckpt), "--dtype", args.dtype, "--model", args.model]
                       + (["--qlora"] if args.qlora else []), capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"preparing the weights failed:\n{p.stderr[-3000:]}")


def print_account(rows: list[tuple[str, dict]]) -> None:
    """Where the training peak goes, per run: weights + saved activations + LoRA/AdamW + the rest (workspace,
    allocator slack, libraries, the interpreter)."""
    print("\n## memory account (MB; training peak = VmHWM over the steps, reset after loading)\n")
    print("| run | seq | weights | saved activations | LoRA params + grads + AdamW | rest (workspace, allocator, "
          "libraries) | training peak | whole-process peak RSS | RSS after the steps: anonymous / file-backed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        w, a, o, peak = r["weights_b"] / 2**20, r["saved_b"] / 2**20, r["lora_opt_b"] / 2**20, r["train_peak_mb"]
        end = f"{r['RssAnon']:.0f} / {r['RssFile']:.0f}" if "RssAnon" in r else "-"
        print(f"| {name} | {r['seq']} | {w:.0f} | {a:.0f} | {o:.0f} | {peak - w - a - o:.0f} | {peak:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {end} |")


def scale(args) -> None:
    """litft vs HF per model shape and sequence length: one run each, alternating, with the memory account."""
    args.account = True
    models, seqs = args.models.split(","), [int(s) for s in args.seqs.split(",")]
    print(f"\n## scale (batch {args.batch}, r {args.rank}, {args.steps} timed steps after {WARMUP} warmup, {args.dtype}; "
          f"one run per cell, litft then HF)\n")
    print("| model | seq | litft tok/s | HF tok/s | litft / HF | litft peak RSS MB | HF peak RSS MB | RSS ratio | "
          "litft train peak MB | HF train peak MB | litft GFLOP/s | loss step 1 litft / HF | other cores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    account: list[tuple[str, dict]] = []
    for key in models:
        use_model(key)
        args.model = key
        with tempfile.TemporaryDirectory(prefix="litft-bench-") as tmp:
            prepare_weights(args, Path(tmp))
            for seq in seqs:
                args.seq = seq
                a, b = run_child("litft", args, Path(tmp)), run_child("hf", args, Path(tmp))
                gf = a["tok_s"] * flop_model(seq, args.rank)["total"] / 1e9
                print(f"| {MODELS[key]} | {seq} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f} | "
                      f"{a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {a['peak_rss_mb'] / b['peak_rss_mb']:.2f} | "
                      f"{a['train_peak_mb']:.0f} | {b['train_peak_mb']:.0f} | {gf:.1f} | "
                      f"{a['loss_first']:.5f} / {b['loss_first']:.5f} | {a['other_cores']:.2f} / {b['other_cores']:.2f} |",
                      flush=True)
                account += [(f"{MODELS[key]} litft", a), (f"{MODELS[key]} HF", b)]
    print(f"\nload average at end: {loadavg()}")
    print_account(account)


def sweep(args, ckpt: Path, peak: float | None) -> None:
    """litft vs HF over sequence length (r 16) and rank (seq 512): one run each, alternating."""
    points = [(seq, R) for seq in (256, 512, 1024, 2048)] + [(512, r) for r in (8, 32, 64, 128)]
    print(f"\n## sweep (batch {args.batch}, {args.steps} timed steps after {WARMUP} warmup, {args.dtype}; one run per cell)\n")
    print("| seq | r | litft tok/s | HF tok/s | litft / HF | litft peak RSS MB | HF peak RSS MB | RSS ratio | litft % of roofline (seq-512 step's) | other cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq, rank in points:
        args.seq, args.rank = seq, rank
        a, b = run_child("litft", args, ckpt), run_child("hf", args, ckpt)
        pct = f"{100 * a['tok_s'] * flop_model(seq, rank)['total'] / 1e9 / peak:.0f}%" if peak else "-"
        print(f"| {seq} | {rank} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f} | "
              f"{a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {a['peak_rss_mb'] / b['peak_rss_mb']:.2f} | {pct} | "
              f"{max(a['other_cores'], b['other_cores']):.2f} |", flush=True)


if __name__ == "__main__":
    main()
