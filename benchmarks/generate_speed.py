"""Benchmark (not a test): greedy decoding with the KV cache, litft vs transformers' `generate`, on CPU.

    python benchmarks/generate_speed.py [--prompt 64] [--new 256] [--rounds 5] [--busy 0] [--dtype fp32|bf16]

SmolLM2-135M shape (vocab 49152, d 576, 30 layers, 9 heads, 3 kv heads, MLP 1536, tied embeddings), random init
(HF `LlamaForCausalLM`, seed 0), the same weights loaded into litft's GPT (`hf_to_litft`). One prompt of `--prompt`
random token ids; each contender generates exactly `--new` tokens greedily (no eos: transformers gets
`min_new_tokens`, litft no eos ids), and the two token sequences must be identical (checked every round).

Both run in this one process, alternating (litft, hf, hf, litft, ...: the order flips each round), so a change in
the host's load hits both. Each run reports
  prefill: seconds from the call to the first new token (the prompt's forward pass + the first pick),
  decode:  tokens/s over the other `--new - 1` tokens (the KV-cache steps),
from the time each token is handed out (litft's `on_token`, transformers' streamer `put`). Medians over rounds.

`--busy N` starts N other processes that keep a core busy each (a single-threaded fp32 matmul loop, like another
job on the machine) for the whole measurement: the shared-host case. The child processes are killed at exit.
Every run records `other_cores`: cores used by other processes meanwhile (from /proc/stat), so a "quiet" run
can be checked to have been quiet.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

BUSY_LOOP = ("import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\n"
             "while True: a = (a @ a).tanh_()")


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def self_ticks() -> int:
    t = os.times()
    return int((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


def build_models(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from litft.models.gpt import GPT
    from litft.models.hf import config_from_hf, hf_to_litft

    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                            rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True)
    hf = LlamaForCausalLM(hf_config).to(dtype).eval()
    config = config_from_hf(hf_config.to_dict())
    lit = GPT(config)
    missing, unexpected = lit.load_state_dict(dict(hf_to_litft(config, hf.state_dict().items())), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)  # tied head
    return lit.to(dtype).eval(), hf


def run_litft(model, prompt: torch.Tensor, new: int) -> tuple[list[int], list[float]]:
    from litft.generate import generate

    stamps: list[float] = []
    t0 = time.perf_counter()
    out = generate(model, prompt, new, on_token=lambda _: stamps.append(time.perf_counter()))
    return out[prompt.numel():].tolist(), [t - t0 for t in stamps]


def run_hf(model, prompt: torch.Tensor, new: int) -> tuple[list[int], list[float]]:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.first = [], True

        def put(self, value):
            if self.first:  # generate() hands the prompt over first
                self.first = False
                return
            self.times.append(time.perf_counter())

        def end(self):
            pass

    streamer = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt[None], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, streamer=streamer)
    return out[0, prompt.numel():].tolist(), [t - t0 for t in streamer.times]


def measure(fn, model, prompt, new) -> dict:
    busy0, total0 = cpu_ticks()
    mine0 = self_ticks()
    tokens, stamps = fn(model, prompt, new)
    busy1, total1 = cpu_ticks()
    ncpu = os.cpu_count() or 1
    other = max(0, (busy1 - busy0) - (self_ticks() - mine0)) / max(1, total1 - total0) * ncpu
    assert len(stamps) == new, (len(stamps), new)
    return dict(tokens=tokens, prefill_s=stamps[0], decode_tok_s=(new - 1) / (stamps[-1] - stamps[0]),
                other_cores=round(other, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=256, help="new tokens per run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--busy", type=int, default=0, help="other busy processes on the machine while measuring")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    lit, hf = build_models(dtype)
    prompt = torch.randint(0, 49152, (args.prompt,), generator=torch.Generator().manual_seed(1))
    contenders = {"litft": (run_litft, lit), "transformers": (run_hf, hf)}
    for name, (fn, model) in contenders.items():  # warm-up: first-call allocations, lazy inits
        fn(model, prompt, 8)

    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
    try:
        time.sleep(1.0 if busy else 0)
        results: dict[str, list[dict]] = {name: [] for name in contenders}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
            for name in order:
                fn, model = contenders[name]
                results[name].append(measure(fn, model, prompt, args.new))
            same = results["litft"][-1]["tokens"] == results["transformers"][-1]["tokens"]
            print(f"round {r}: " + "  ".join(
                f"{n} prefill {results[n][-1]['prefill_s'] * 1000:.0f} ms decode {results[n][-1]['decode_tok_s']:.1f} "
                f"tok/s (other cores {results[n][-1]['other_cores']})" for n in contenders)
                + f"  identical tokens: {same}", flush=True)
            if not same:
                sys.exit("the two contenders generated different tokens: the comparison is void")
    finally:
        for p in busy:
            p.kill()

    summary = {}
    for name, runs in results.items():
        summary[name] = dict(prefill_ms=statistics.median(r["prefill_s"] for r in runs) * 1000,
                             decode_tok_s=statistics.median(r["decode_tok_s"] for r in runs),
                             other_cores=statistics.median(r["other_cores"] for r in runs))
    ratio_decode = summary["litft"]["decode_tok_s"] / summary["transformers"]["decode_tok_s"]
    ratio_prefill = summary["transformers"]["prefill_ms"] / summary["litft"]["prefill_ms"]
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=platform.processor() or
                platform.machine(), cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                args=vars(args))
    print(json.dumps(info))
    for name, s in summary.items():
        print(f"{name:13s} prefill {s['prefill_ms']:7.1f} ms   decode {s['decode_tok_s']:6.2f} tok/s   "
              f"(other cores {s['other_cores']})")
    print(f"litft / transformers: decode {ratio_decode:.2f}x tokens/s, prefill {ratio_prefill:.2f}x faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, summary=summary, decode_ratio=ratio_decode, prefill_ratio=ratio_prefill,
                           runs={n: [{k: v for k, v in r.items() if k != "tokens"} for r in runs]
                                 for n, runs in results.items()}), f, indent=1)


if __name__ == "__main__":
    main()
