"""What the self-check of the fast paths (qwenlocal/selfcheck.py) costs at start-up, on this
machine: the check with no verdict kept (the first start) and with one (later starts), against one
decode step of the same model. On the CPU the checked path is the grouped torch path against the
loop (the CUDA paths are not there).

    python bench/self_check.py [--layers 2] [--preset mixed] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import CACHE, git_rev, machine, markdown_table

from qwenlocal import load_model
from qwenlocal.model import selfcheck
from qwenlocal.weights.random_checkpoint import write_random_quantized_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--preset", default="mixed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    folder = CACHE / f"real-shapes-{args.layers}L-{args.preset}"
    if not (folder / "config.json").is_file():
        write_random_quantized_checkpoint(folder, {"num_hidden_layers": args.layers}, args.preset, force=True)
    model = load_model(folder, device=args.device, dtype=torch.bfloat16, moe="grouped")
    paths = selfcheck.active_paths(model)
    step = min(_timed(lambda: selfcheck.decode_step(model, graph=False)) for _ in range(args.rounds))
    first, later = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            first.append(_timed(lambda tmp=tmp: selfcheck.self_check(model, folder=Path(tmp))))
            later.append(_timed(lambda tmp=tmp: selfcheck.self_check(model, folder=Path(tmp))))
            assert model.experts.moe == "grouped", "a sound path failed its check"
    rows = [
        ["prefill 8 + 1 decode step (plain)", f"{step * 1000:.0f}", "1.0"],
        [
            f"self-check, first start ({', '.join(paths)})",
            f"{min(first) * 1000:.0f}",
            f"{min(first) / step:.1f}",
        ],
        ["self-check, verdict kept", f"{min(later) * 1000:.1f}", f"{min(later) / step:.2f}"],
    ]
    print(
        f"{machine()}; qwenlocal {git_rev()}; {args.layers} layers, real shapes, {args.preset}, best of {args.rounds}"
    )
    print(markdown_table(["what", "ms", "x one check step"], rows))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
