"""qwenlocal's CPU decode and prefill against llama.cpp on the same random checkpoint, in one run.

Both sides read the same random weights: qwenlocal quantizes the bf16 checkpoint while loading
(default recipe), llama.cpp runs a Q4_0 GGUF made from the same folder (its convert_hf_to_gguf.py,
then llama-quantize; neither is part of this repository: build llama.cpp yourself and pass its
llama-bench). Engines alternate, best of `--rounds`, same thread count.

    python bench/vs_llamacpp.py --llama-bench /path/llama-bench \\
        --gguf ops=/path/op-structure-Q4_0.gguf --gguf real=/path/real-shapes-2L-Q4_0.gguf

Models: "ops" (bench/decode_profile.py's op structure: 48 layers, 128 experts, top-8, hidden
128; its decode is almost all per-token overhead) and "real" (the real layer shapes, 2 layers).
Decode: `--decode` greedy tokens after an 8-token prompt (llama-bench: tg of the same count);
prefill: each of `--prefill` prompt lengths from an empty cache (llama-bench: pp). `--llama-arg`
(repeatable; quoted, split like a shell line) goes to llama-bench as it is, e.g.
`--llama-arg "--repack 0"` for a build whose repacked (AMX) Q4_0 path crashes in prefill.
`--plain-dequant`: our int4 prefill GEMMs dequantize in plain torch instead of quant.cpu_dequant's
C++ loop (what they did before it). `--folder NAME=DIR` gives a model of another name its checkpoint
(16-bit, or already quantized with the mixed recipe), e.g. the real shapes at 48 layers; such a model
is decoded only (no prefill), as its two engines do not fit this machine's memory side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import time

import torch
from common import machine, markdown_table, real_shape_checkpoint
from decode_profile import ops_checkpoint

from quant import cpu_dequant, cpu_moe
from qwenlocal import load_model
from qwenlocal.model import cpu_decode


def ours(folder, decode: int, prefills: list[int], plain_dequant: bool) -> dict[str, float]:
    with cpu_dequant.OPERATOR.turned_off() if plain_dequant else contextlib.nullcontext():
        return ours_timed(folder, decode, prefills)


@torch.inference_mode()
def ours_timed(folder, decode: int, prefills: list[int]) -> dict[str, float]:
    model = load_model(folder, dtype=torch.bfloat16, quant="mixed")
    out = {}
    cache = model.new_cache(max(prefills + [8 + decode]) + 8)
    model(torch.arange(8).view(1, 8), cache=cache)
    token = torch.tensor([[11]])
    model(token, cache=cache)  # warm-up
    t = time.perf_counter()
    for _ in range(decode):
        token = model(token, cache=cache)[0, -1].argmax().view(1, 1)
    out["decode"] = decode / (time.perf_counter() - t)
    gen = torch.Generator().manual_seed(0)
    for n in prefills:
        prompt = torch.randint(0, model.config.vocab_size - 1000, (1, n), generator=gen)
        cache.length = 0
        t = time.perf_counter()
        model(prompt, cache=cache, last_only=True)
        out[f"prefill {n}"] = n / (time.perf_counter() - t)
    return out


def llama(
    bench: str, gguf: str, decode: int, prefills: list[int], threads: int, extra: list[str]
) -> dict[str, float]:
    args = [bench, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json"]
    args += ["-n", str(decode), "-p", ",".join(str(p) for p in prefills) or "0", *extra]
    rows = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    out = {}
    for r in rows:
        if not r["n_gen"] and not r["n_prompt"]:
            continue
        key = "decode" if r["n_gen"] else f"prefill {r['n_prompt']}"
        out[key] = r["avg_ts"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", action="append", required=True, help="ops=FILE, real=FILE or NAME=FILE")
    ap.add_argument("--folder", action="append", default=[], help="NAME=DIR: the checkpoint of model NAME")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prefill", type=int, nargs="*", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="both engines (default: torch's count)")
    ap.add_argument(
        "--llama-arg", action="append", default=[], help='passed to llama-bench, e.g. "--repack 0"'
    )
    ap.add_argument(
        "--plain-dequant", action="store_true", help="int4 prefill through the plain-torch dequantize"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    extra = [word for arg in args.llama_arg for word in shlex.split(arg)]
    # the C++ operators (prefill dequantize, decode experts, decode layer) built before timing
    cpu_dequant.OPERATOR.build()
    cpu_moe.OPERATOR.build()
    cpu_decode.OPERATOR.build()
    ggufs = dict(g.split("=", 1) for g in args.gguf)
    folders = dict(f.split("=", 1) for f in args.folder)
    rows = []
    for name, gguf in ggufs.items():
        if name in folders:
            folder, prefills = folders[name], []
        else:
            folder = ops_checkpoint() if name == "ops" else real_shape_checkpoint(2)
            prefills = [] if name == "ops" else args.prefill
        best_ours: dict[str, float] = {}
        best_llama: dict[str, float] = {}
        for _ in range(args.rounds):
            for best, run in (
                (best_ours, lambda f=folder, p=prefills: ours(f, args.decode, p, args.plain_dequant)),
                (
                    best_llama,
                    lambda g=gguf, p=prefills: llama(args.llama_bench, g, args.decode, p, threads, extra),
                ),
            ):
                for key, value in run().items():
                    best[key] = max(best.get(key, 0.0), value)
        for key, value in best_ours.items():
            ref = best_llama[key]
            rows.append([name, key, f"{value:.1f}", f"{ref:.1f}", f"{value / ref:.2f}x"])
            print(" | ".join(rows[-1]), flush=True)
    print(f"machine: {machine()}; {threads} threads; best of {args.rounds}, engines alternating")
    if extra:
        print(f"llama-bench arguments added: {shlex.join(extra)}")
    print(markdown_table(["model", "tok/s of", "qwenlocal (mixed)", "llama.cpp Q4_0", "ratio"], rows))


if __name__ == "__main__":
    main()
