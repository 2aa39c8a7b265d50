"""Loading a GPTQ-Int4 checkpoint as it is vs the same model in qwenlocal's `int4` format.

A random checkpoint with Qwen3-30B-A3B's real layer shapes and `--layers` layers is written in
Qwen3-30B-A3B-GPTQ-Int4's layout (4-bit, group 128, symmetric, v1 zeros; random codes and scales:
no 16-bit source is needed), then converted once to the `int4` format with the recipe a CPU load
of it takes (GPTQ's own, its 16-bit lm_head at int8: the same weights, repacked). Each folder is then loaded in a fresh process, alternating, `--repeat`
times: load time, peak RSS after loading, and greedy decode speed. The two must decode the same
tokens.

    python bench/gptq_load.py --layers 2 --decode 32 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import CACHE, ROOT, git_rev, machine, markdown_table

GROUP = 128


def write_random_gptq(out: Path, layers: int) -> Path:
    """Random codes and scales in the GPTQ layout, written shard by shard."""
    from qwenlocal.model.config import Qwen3MoeConfig
    from qwenlocal.weights.checkpoint import ShardWriter, atomic_folder, checkpoint_shapes
    from qwenlocal.weights.random_checkpoint import TOKENIZER_DIR, TOKENIZER_FILES, config_dict, random_tensor
    from qwenlocal.weights.sources import GPTQ_INT4_CONFIG
    from tests.prequant_packers import is_linear, pack_words

    d = config_dict({"num_hidden_layers": layers})
    d["quantization_config"] = dict(GPTQ_INT4_CONFIG)
    config = Qwen3MoeConfig.from_dict(d)
    gen = torch.Generator().manual_seed(0)
    with atomic_folder(out, force=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(d, indent=2))
        for name in TOKENIZER_FILES:
            (tmp / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
        with ShardWriter(tmp, 2 * 1024**3) as writer:
            for name, shape in checkpoint_shapes(config).items():
                if not is_linear(name):
                    writer.add(name, random_tensor(name, shape, gen, torch.bfloat16))
                    continue
                n_out, n_in = shape
                prefix = name.removesuffix(".weight")
                codes = torch.randint(0, 16, (n_in, n_out), generator=gen)
                groups = n_in // GROUP
                scales = (torch.rand(groups, n_out, generator=gen) + 0.5) * (2 / 15) / n_in**0.5
                writer.add(prefix + ".qweight", pack_words(codes, 4))
                writer.add(prefix + ".qzeros", pack_words(torch.full((n_out, groups), 7), 4).T.contiguous())
                writer.add(prefix + ".scales", scales.half())
                writer.add(prefix + ".g_idx", (torch.arange(n_in) // GROUP).to(torch.int32))
            writer.finish()
    return out


def measure(folder: str, n_decode: int) -> dict:
    """In this (fresh) process: load time, peak RSS after loading, decode speed."""
    import resource
    import time

    from common import greedy_run

    from qwenlocal import load_model

    t = time.perf_counter()
    model = load_model(folder, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prompt = torch.randint(0, 151_000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    run = greedy_run(model, prompt, n_decode, ctx_size=64 + n_decode + 8)
    return {"load_s": load_s, "peak_rss": rss, "gen_tps": run["gen_tps"], "tokens": run["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.decode)))
        return

    from qwenlocal.planning.plan import plan_load
    from qwenlocal.weights.quantize import quantize_checkpoint
    from qwenlocal.weights.sources import ModelSource

    gptq = CACHE / f"real-shapes-{args.layers}L-gptq-int4"
    if not (gptq / "config.json").is_file():
        write_random_gptq(gptq, args.layers)
    int4 = CACHE / f"real-shapes-{args.layers}L-gptq-as-int4-cpu"
    if not (int4 / "config.json").is_file():
        recipe = plan_load(ModelSource.read(gptq), device="cpu").recipe
        quantize_checkpoint(gptq, int4, recipe, force=True)

    results: dict[str, list[dict]] = {"gptq": [], "int4": []}
    for _ in range(args.repeat):
        for name, folder in (("gptq", gptq), ("int4", int4)):
            cmd = [sys.executable, __file__, "--measure", str(folder), "--decode", str(args.decode)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    assert results["gptq"][0]["tokens"] == results["int4"][0]["tokens"], "the two decode differently"

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    rows = [
        [
            name,
            f"{med(name, 'load_s'):.2f}",
            f"{med(name, 'peak_rss') / 1024**3:.2f}",
            f"{med(name, 'gen_tps'):.2f}",
        ]
        for name in ("gptq", "int4")
    ]
    rows.append(
        ["gptq / int4"]
        + [f"{med('gptq', k) / med('int4', k):.2f}x" for k in ("load_s", "peak_rss", "gen_tps")]
    )
    print(
        f"{machine()}; rev {git_rev()}; {args.layers} layers, {args.decode} decode steps, median of {args.repeat}"
    )
    print(markdown_table(["folder", "load s", "peak RSS GiB", "decode tok/s"], rows))


if __name__ == "__main__":
    main()
