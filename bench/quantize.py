"""Quantize throughput and peak RSS: `qwenlocal quantize` vs bitsandbytes' quantize_4bit alone,
on the same random checkpoints with Qwen3-30B-A3B's real layer shapes (2 and 4 layers, so that
peak RSS can be seen not to grow with the model).

    python bench/quantize.py            # writes .bench/real-shapes-{2,4}L-bf16 once
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import torch
from common import CACHE, ROOT, machine, markdown_table, real_shape_checkpoint

REFERENCE = r"""
import sys, time, torch, bitsandbytes.functional as F
from qwenlocal.weights.checkpoint import Checkpoint
from qwenlocal.model.names import tensor_class
from quant.pack import PackLayout, unpack
src, out = Checkpoint(sys.argv[1]), Checkpoint(sys.argv[2])
names = [n for n in src.weight_map if tensor_class(n) in ("attention", "experts")]
t, nbytes, same, checked = time.perf_counter(), 0, 0, 0
layout = PackLayout.from_dict(out.config.quantization_config["expert_layout"])
for i, n in enumerate(names):
    w = src.get(n)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    nbytes += w.numel() * w.element_size()
    if i % 97 == 0:  # compare with what qwenlocal wrote
        checked += 1
        parts = n.split(".")
        if "experts" in n:
            q = unpack(out.get(f"model.layers.{parts[2]}.mlp.experts.{parts[5]}.blob"), layout)[parts[6]]
            got = q.weight
        else:
            got = out.get(n)
        same += int(torch.equal(got, packed))
print(nbytes, time.perf_counter() - t, same, checked)
"""


def run_measured(cmd: list[str], env=None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes of the child, stdout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{err}")
    return time.perf_counter() - t, usage.ru_maxrss * 1024, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for layers in args.layers:
        src = real_shape_checkpoint(layers, torch.bfloat16)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        for f in src.glob("*.safetensors"):  # both sides start with the source in the page cache
            with open(f, "rb") as fh:
                while fh.read(64 * 1024**2):
                    pass
        out = CACHE / f"real-shapes-{layers}L-nf4"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "qwenlocal",
            "quantize",
            str(src),
            str(out),
            "--preset",
            "nf4",
            "--no-report",
            "--device",
            "cpu",
            "--shard-size",
            "1GB",
        ]
        secs, rss, _ = run_measured(cmd, env)
        ref_secs, ref_rss, ref_out = run_measured([sys.executable, "-c", REFERENCE, str(src), str(out)], env)
        ref_bytes, ref_quant_s, same, checked = ref_out.split()
        ref_mbps = int(ref_bytes) / float(ref_quant_s) / 1e6
        rows.append(
            [
                f"{layers} layers, {size / 1e9:.2f} GB bf16",
                f"{size / secs / 1e6:,.0f} MB/s ({secs:.1f} s, all tensors, files written)",
                f"{rss / 1e9:.2f} GB",
                f"{ref_mbps:,.0f} MB/s ({int(ref_bytes) / 1e9:.2f} GB quantized in {float(ref_quant_s):.1f} s)",
                f"{ref_rss / 1e9:.2f} GB",
                f"{size / secs / 1e6 / ref_mbps:.1f}x",
                f"{same}/{checked} sampled tensors",
            ]
        )
    print(f"machine: {machine()}")
    print(
        "qwenlocal: `qwenlocal quantize SRC OUT --preset nf4 --no-report --device cpu --shard-size 1GB` (attention and experts "
        "NF4 with double quant, reads and writes everything); reference: bitsandbytes.functional.quantize_4bit "
        "on the same attention and expert tensors, no writing"
    )
    print(
        markdown_table(
            [
                "checkpoint",
                "qwenlocal quantize",
                "qwenlocal peak RSS",
                "bitsandbytes quantize_4bit",
                "bnb peak RSS",
                "throughput ratio",
                "bytes identical to bnb",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
