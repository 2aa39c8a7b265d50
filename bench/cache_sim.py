"""Expert-cache hit rate against cache size: per-layer LRU, LFU with decay, one global LRU, Belady.

Replays routing traces (recorded with `qwenlocal ... --record-routing FILE`, and a synthetic one
with Qwen3-30B-A3B's published locality) through each policy at 5-100 % of the experts resident.
Belady's optimum (per layer: evict the expert needed furthest ahead) is the yardstick; the project
aims for LRU within 10 % of it. Sizes are slots per layer; the global LRU gets the same total.

    python bench/cache_sim.py                           # synthetic, 2,000 tokens × 48 layers
    python bench/cache_sim.py --trace run1.jsonl --trace run2.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import machine, markdown_table

from qwenlocal.experts.cache_policy import LFU_DECAY
from qwenlocal.planning.cache_sim import sweep
from qwenlocal.planning.routing_trace import read_trace
from qwenlocal.planning.synthetic_trace import synthetic_trace, trace_stats

SIZES = (5, 10, 20, 30, 40, 50, 60, 80, 100)  # percent of a layer's experts
POLICIES = ("lru", "lfu", "global-lru", "belady")
NAMES = {
    "lru": "LRU",
    "lfu": "LFU-decay",
    "global-lru": "global LRU",
    "belady": "Belady",
    "global-belady": "global Belady",
}
AIM = 0.90  # hits at least 90 % of Belady's


def run_trace(name: str, trace, experts: int, k: int, policies: tuple[str, ...], decay: float) -> dict:
    t0 = time.perf_counter()
    stats = trace_stats(trace)
    caps = sorted({max(1, round(p / 100 * experts)) for p in SIZES})
    res = {(r.policy, r.capacity): r.hit_rate for r in sweep(trace, policies, caps, decay=decay)}
    rows = []
    for pct in SIZES:
        c = max(1, round(pct / 100 * experts))
        best = res["belady", c]
        row = {"percent": pct, "slots": c, "below_top_k": c < k}
        for p in policies:
            row[p] = res[p, c]
            row[p + "/belady"] = res[p, c] / best if best else 1.0
        rows.append(row)
    aims = {}
    for p in policies:
        if p not in ("belady", "global-belady"):  # global Belady is a bound, not a contender
            worst = min(rows, key=lambda r, p=p: r[p + "/belady"])
            aims[p] = {
                "all_sizes": all(r[p + "/belady"] >= AIM for r in rows),
                "sizes_from_top_k": all(r[p + "/belady"] >= AIM for r in rows if not r["below_top_k"]),
                "worst_ratio": worst[p + "/belady"],
                "worst_percent": worst["percent"],
            }
    stats = {key: v for key, v in stats.items() if key != "distinct_per_layer"}
    return {"name": name, "stats": stats, "k": k, "experts": experts, "rows": rows, "aim": aims,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def render(r: dict, policies: tuple[str, ...]) -> str:
    s = r["stats"]
    out = [
        f"### {r['name']}: {s['tokens']} tokens × {s['layers']} layers, top-{r['k']} of {r['experts']}",
        "",
        f"repeat at next token {s['repeat_next']:.1%}, reused within 8 tokens {s['within_8']:.1%}, "
        f"median reuse distance {s['median_reuse']:g}, distinct experts per layer "
        f"{s['distinct_min']}-{s['distinct_mean']:.0f} (min-mean); {r['seconds']:.1f} s",
        "",
    ]
    headers = ["size", "slots/layer"]
    for p in policies:
        headers += [NAMES[p]] if p == "belady" else [NAMES[p], "÷ Belady"]
    rows = []
    for row in r["rows"]:
        cells = [f"{row['percent']} %", f"{row['slots']}{' *' if row['below_top_k'] else ''}"]
        for p in policies:
            cells.append(f"{row[p]:.1%}")
            if p != "belady":
                cells.append(f"{row[p + '/belady']:.3f}")
        rows.append(cells)
    out.append(markdown_table(headers, rows))
    out.append("")
    if any(row["below_top_k"] for row in r["rows"]):
        out.append(
            f"\\* fewer slots than top-{r['k']}: per-layer caches stream the rest of a token's experts "
            "without caching them; the global LRU has the same total slots."
        )
    for p, a in r["aim"].items():
        verdict = "yes" if a["all_sizes"] else "no"
        extra = "" if a["all_sizes"] else f"; from top-k slots up: {'yes' if a['sizes_from_top_k'] else 'no'}"
        out.append(
            f"- {NAMES[p]} within 10 % of Belady at every size: **{verdict}** "
            f"(worst {a['worst_ratio']:.3f} at {a['worst_percent']} %{extra})"
        )
    if "lru" in policies and "lfu" in policies:
        diff = [(row["lfu"] - row["lru"], row["percent"]) for row in r["rows"]]
        hi, lo = max(diff), min(diff)
        out.append(
            f"- LFU-decay minus LRU: {hi[0] * 100:+.1f} points at best ({hi[1]} %), "
            f"{lo[0] * 100:+.1f} at worst ({lo[1]} %)"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--trace", action="append", default=[], type=Path, help="recorded routing trace (JSON lines)"
    )
    ap.add_argument("--no-synthetic", action="store_true", help="only the --trace files")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128, help="experts per layer (Qwen3-30B-A3B: 128)")
    ap.add_argument("--k", type=int, default=8, help="experts per token (synthetic trace)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--sticky", type=float, default=1.0, help="synthetic: popularity weight of repeats (0: none)"
    )
    ap.add_argument("--decay", type=float, default=LFU_DECAY, help="LFU count decay per access")
    ap.add_argument(
        "--global-belady", action="store_true", help="also global Belady (a few seconds per size)"
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    policies = POLICIES + (("global-belady",) if args.global_belady else ())
    traces = []
    for path in args.trace:
        try:
            trace = read_trace(path)
        except (OSError, ValueError) as e:
            print(f"cannot read trace {path}: {e}", file=sys.stderr)
            return 2
        top = max((e for token in trace for ids in token for e in ids), default=-1)
        if not trace or top >= args.experts:
            print(
                f"{path}: {'empty' if not trace else f'expert id {top} but --experts {args.experts}'}",
                file=sys.stderr,
            )
            return 2
        traces.append((path.name, trace, max(len(ids) for ids in trace[0])))
    if not args.no_synthetic:
        t = time.perf_counter()
        trace = synthetic_trace(
            args.tokens, args.layers, args.experts, args.k, seed=args.seed, sticky=args.sticky
        )
        name = (
            f"synthetic (seed {args.seed}, sticky {args.sticky:g}, made in {time.perf_counter() - t:.1f} s)"
        )
        traces.append((name, trace, args.k))

    print(f"Machine: {machine()}\n")
    results = []
    for name, trace, k in traces:
        r = run_trace(name, trace, args.experts, k, policies, args.decay)
        results.append(r)
        print(render(r, policies) + "\n", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "decay": args.decay, "traces": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
