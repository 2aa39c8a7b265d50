"""`qwenlocal vram`: what a context size, a quantization and a budget will cost, before loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from qwenlocal.errors import UserError
from qwenlocal.model.config import DEFAULT_CTX_SIZE, DEFAULT_MODEL_ID, Qwen3MoeConfig
from qwenlocal.planning.gpus import (
    SPEED_AT_TOKENS,
    CardPlan,
    assumptions,
    assumptions_text,
    cuda_present,
    find_gpu,
    fit_card,
    installed_gpu,
    measure_cpu_bandwidth,
    recommendations,
    speed_range,
)
from qwenlocal.planning.memory import GIB, KV_DTYPES, Estimate, Plan, estimate, fit_expert_slots, make_plan
from qwenlocal.planning.options import check_experts_or_budget
from qwenlocal.weights.sources import (
    DOWNLOAD_GB,
    FP8_ID,
    GPTQ_INT4_CONFIG,
    GPTQ_INT4_ID,
    default_model,
    download_note,
)

SWEEP_CONTEXTS = (4096, 8192, 32768, 65536, 131072)
SWEEP_PRESETS = ("bf16", "int8", "mixed", "nf4")

WHERE = {"gpu": "GPU", "host": "host RAM"}
LABELS = {
    "embed_tokens": "token embedding",
    "attention": "attention",
    "norms": "norms",
    "routers": "routers",
    "dense_mlp": "dense MLP layers",
    "lm_head": "lm_head",
    "experts": "experts (on GPU)",
    "expert_store": "expert store (pinned)",
    "kv_cache": "KV cache",
    "rope_tables": "RoPE tables",
    "activations": "working buffers",
    "decode_graphs": "decode graphs (one per KV span)",
    "cuda_context": "CUDA context reserve",
}


def read_config(model: str | None) -> tuple[Qwen3MoeConfig, str]:
    """Only config.json is read: a folder, a hub id (cache first, then config.json alone), or the
    built-in Qwen3-30B-A3B config."""
    if model is None:
        return Qwen3MoeConfig.builtin(), DEFAULT_MODEL_ID
    if model == GPTQ_INT4_ID:  # the same shapes with GPTQ's published recipe: no download to plan
        return dataclasses.replace(Qwen3MoeConfig.builtin(), quantization_config=GPTQ_INT4_CONFIG), model
    if model == FP8_ID:
        return Qwen3MoeConfig.builtin(), model
    path = Path(model).expanduser()
    if path.is_dir():
        return Qwen3MoeConfig.from_file(path / "config.json"), str(path)
    if model == DEFAULT_MODEL_ID:
        return Qwen3MoeConfig.builtin(), model
    from qwenlocal.weights.checkpoint import looks_like_repo_id

    if not looks_like_repo_id(model):
        raise UserError(f"Model folder {path} does not exist.")
    try:
        from huggingface_hub import hf_hub_download

        try:
            f = hf_hub_download(model, "config.json", local_files_only=True)
        except Exception:
            f = hf_hub_download(model, "config.json")
    except Exception as e:
        raise UserError(
            f"Could not get config.json of {model} ({type(e).__name__}); pass a local folder."
        ) from None
    return Qwen3MoeConfig.from_file(f), model


def plan_from_flags(
    config: Qwen3MoeConfig,
    quant: str | None,
    ctx: int,
    kv_dtype: str,
    batch: int,
    gpu_experts: int | None,
    device: str = "cuda",
) -> Plan:
    from qwenlocal.planning.plan import decide_recipe

    if kv_dtype not in KV_DTYPES:
        raise UserError(f"Unknown --kv-dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}.")
    # before anything is known of the device, auto plans the default recipe for a 16-bit folder
    recipe = decide_recipe(config, quant or "auto").recipe
    if gpu_experts is not None and gpu_experts < 0:
        raise UserError(f"--gpu-experts must be >= 0, got {gpu_experts}.")
    return make_plan(
        recipe=recipe,
        ctx_size=ctx,
        dtype=torch.bfloat16,
        kv_dtype=KV_DTYPES[kv_dtype],
        device=device,
        batch=batch,
        expert_slots=gpu_experts,
    )


def longest_context(config: Qwen3MoeConfig, plan: Plan, budget: int) -> int:
    """The longest context whose minimum cache (top-k experts per layer) still fits `budget`."""
    lo, hi = 0, config.max_context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            fit_expert_slots(config, plan.replace(ctx_size=mid, expert_slots=None), budget)
            lo = mid
        except UserError:
            hi = mid - 1
    return lo


def estimate_table(est: Estimate, title: str, real: dict | None = None) -> Table:
    """Component, where it lives, estimated GiB (and the measured GiB when `real` is given)."""
    t = Table(title=title, title_justify="left")
    t.add_column("component")
    t.add_column("where")
    t.add_column("estimate", justify="right")
    if real is not None:
        t.add_column("real", justify="right")
    for c in est.components:
        row = [LABELS.get(c.name, c.name), WHERE[c.where], f"{c.nbytes / GIB:.3f} GiB"]
        if real is not None:
            r = real.get(c.name)
            row.append("" if r is None else f"{r / GIB:.3f} GiB")
        t.add_row(*row)
    t.add_row(
        "GPU total", "", f"{est.gpu_total / GIB:.2f} GiB", *([""] if real is not None else []), style="bold"
    )
    t.add_row(
        "host total", "", f"{est.host_total / GIB:.2f} GiB", *([""] if real is not None else []), style="bold"
    )
    return t


def sweep_table(config: Qwen3MoeConfig, kv_dtype: str, batch: int) -> Table:
    t = Table(title="GPU memory with every expert resident", title_justify="left")
    t.add_column("context")
    for p in SWEEP_PRESETS:
        t.add_column(p, justify="right")
    for ctx in SWEEP_CONTEXTS:
        if ctx > config.max_context:
            continue
        label = f"{ctx // 1024}k" + (" (YaRN)" if ctx > config.native_context else "")
        row = [label]
        for preset in SWEEP_PRESETS:
            est = estimate(config, plan_from_flags(config, preset, ctx, kv_dtype, batch, None))
            row.append(f"{est.gpu_total / GIB:.1f} GiB")
        t.add_row(*row)
    return t


def gpu_table_view(cards: list[CardPlan], quant: str, ctx: int) -> Table:
    """Every known card: whether the plan fits, how much of it is resident, and a speed range."""
    t = Table(title=f"GPUs for {quant} at {ctx:,} tokens of context", title_justify="left")
    t.add_column("GPU", no_wrap=True)
    t.add_column("GB", justify="right", no_wrap=True)
    t.add_column("GB/s", justify="right")
    t.add_column("experts on GPU", no_wrap=True)
    t.add_column("decode tok/s (est.)", justify="right", no_wrap=True)
    for c in cards:
        if not c.fits:
            resident, speed = "does not fit", ""
        else:
            resident = "all resident" if c.est.all_resident else f"{100 * c.resident_fraction:.0f} % resident"
            speed = speed_range(c.speed).removesuffix(" tok/s")
        t.add_row(
            c.gpu.name,
            f"{c.gpu.memory_gib:g}" + (" ECC" if c.gpu.ecc else ""),
            f"{c.gpu.bandwidth_gbs:,g}",
            resident,
            speed,
            style="dim" if not c.fits else None,
        )
    return t


def cold_modes_text(cards: list[CardPlan], cpu_gbs: float) -> str | None:
    """The faster --cold-experts mode of each card that misses experts, grouped by mode."""
    by_mode: dict[str, list[str]] = {}
    for c in cards:
        if c.cold_experts == "cpu":
            by_mode.setdefault("cpu", []).append(f"{c.gpu.name} ({speed_range(c.cpu_speed)})")
        elif c.cold_experts:
            by_mode.setdefault("copy", []).append(c.gpu.name)
    if not by_mode:
        return None
    parts = [f"--cold-experts {mode} on {', '.join(names)}" for mode, names in sorted(by_mode.items())]
    return f"faster with a CPU reading {cpu_gbs:.1f} GB/s: " + "; ".join(parts) + "."


def print_card_speed(card: CardPlan, implicit: bool, cpu_gbs: float | None = None) -> None:
    from qwenlocal.app.cli_util import out

    if implicit:
        out.print(f"[dim]planned for the installed {card.gpu.name}; --gpu NAME plans for another card[/]")
    if card.speed is None:
        out.print(
            f"[yellow]note:[/] {card.gpu.name} is not in the GPU table, so its bandwidth is unknown "
            "and decode speed can't be estimated.",
            highlight=False,
        )
        return
    s = card.speed
    where = (
        "all experts resident, no copies"
        if card.est.all_resident
        else f"LRU hit rate ≈ {100 * s.hit_rate:.0f} % at this residency: "
        f"{s.misses_per_token:.0f} expert copies per token over {card.gpu.link}"
    )
    out.print(
        f"expected decode: {speed_range(s)} ({where}; {s.bytes_per_token / 1e9:.2f} GB read per token "
        f"{SPEED_AT_TOKENS:,} tokens into a conversation)",
        highlight=False,
    )
    if card.cpu_speed is not None and not card.est.all_resident:
        out.print(
            f"with --cold-experts cpu: {speed_range(card.cpu_speed)} ({s.misses_per_token:.0f} experts "
            f"per token computed on the CPU at {cpu_gbs:g} GB/s); faster here: --cold-experts {card.cold_experts}",
            highlight=False,
        )
    out.print(assumptions_text(card.gpu), highlight=False)


def vram(
    model: Annotated[
        str | None,
        typer.Argument(help="Folder, hub id, or nothing: the checkpoint chat would download for --quant."),
    ] = None,
    ctx_size: Annotated[
        str, typer.Option("--ctx-size", "-c", help="Context in tokens: 4096, 32k, 128k.")
    ] = str(DEFAULT_CTX_SIZE),
    quant: Annotated[
        str | None,
        typer.Option("--quant", help="bf16, int8, nf4, mixed; default: the folder's own, else mixed."),
    ] = None,
    kv_dtype: Annotated[str, typer.Option("--kv-dtype", help="bf16 or fp8.")] = "bf16",
    gpu_experts: Annotated[int | None, typer.Option("--gpu-experts", help="Expert slots on the GPU.")] = None,
    vram_budget: Annotated[
        str | None, typer.Option("--vram-budget", help="e.g. 8GiB: size the cache to it.")
    ] = None,
    batch: Annotated[int, typer.Option("--batch", help="Sequences decoded together.")] = 1,
    gpu: Annotated[
        str | None,
        typer.Option(
            "--gpu",
            help="Plan for a card: 4090, 4060ti-8, a100-80, h200, ... or auto (the installed one; "
            "the default on a CUDA machine without --vram-budget/--gpu-experts).",
        ),
    ] = None,
    cpu_bandwidth: Annotated[
        float | None,
        typer.Option(
            "--cpu-bandwidth",
            help="This CPU's memory bandwidth in GB/s, for the speed of --cold-experts cpu; default: a short probe.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Estimate memory for a context size, a quantization and a budget, before loading anything."""
    from qwenlocal.app.cli_util import err, out, run
    from qwenlocal.planning.options import parse_bytes, parse_tokens

    def body():
        config, name = read_config(model if model is not None else default_model(quant))
        ctx = parse_tokens(ctx_size)
        config.with_context(ctx)  # past the maximum: one clear sentence
        check_experts_or_budget(gpu_experts, vram_budget)
        if gpu is not None and (gpu_experts is not None or vram_budget is not None):
            raise UserError(
                "Give --gpu or --vram-budget/--gpu-experts, not both: --gpu sizes the cache to the card."
            )
        plan = plan_from_flags(config, quant, ctx, kv_dtype, batch, gpu_experts)
        if cpu_bandwidth is not None and cpu_bandwidth <= 0:
            raise UserError(f"--cpu-bandwidth must be positive (GB/s), got {cpu_bandwidth:g}.")
        cpu_gbs = cpu_bandwidth or measure_cpu_bandwidth()
        # No card and no budget on a CUDA machine: plan for the installed card, quietly falling
        # back to the all-resident table when it cannot be read or cannot hold the model.
        implicit = gpu is None and gpu_experts is None and vram_budget is None and cuda_present()
        card = None
        try:
            if implicit or (gpu is not None and gpu.strip().lower() == "auto"):
                card = fit_card(config, plan, *installed_gpu(), cpu_gbs=cpu_gbs)
            elif gpu is not None:
                card = fit_card(config, plan, find_gpu(gpu), cpu_gbs=cpu_gbs)
            if card is not None and not card.fits:
                raise UserError(f"On {card.gpu.name} ({card.budget / GIB:.2f} GiB to use): {card.error}")
        except UserError as e:
            if not implicit:
                raise
            err.print(f"[yellow]note:[/] {e}", highlight=False)
            card = None
        budget = card.budget if card else parse_bytes(vram_budget) if vram_budget else None
        if card:
            est = card.est
        else:
            est = fit_expert_slots(config, plan, budget) if budget else estimate(config, plan)
        quant_name = plan.recipe.preset if plan.recipe else "bf16"
        cards = recommendations(config, plan, cpu_gbs) if gpu is None else None
        if as_json:
            d = est.as_dict()
            d["quant"] = quant_name
            d["model"] = name
            if name in DOWNLOAD_GB:
                d["download_gb"] = DOWNLOAD_GB[name]
            if budget:
                d["vram_budget_bytes"] = budget
                d["max_ctx_size_for_budget"] = longest_context(config, plan, budget)
            if card:
                d["gpu"] = card.as_dict()
            if cards is not None:
                d["gpus"] = [c.as_dict() for c in cards]
            d["speed_assumptions"] = {**assumptions(), "cpu_bandwidth_gbs": round(cpu_gbs, 2)}
            print(json.dumps(d))
            return
        recipe = plan.recipe.describe() if plan.recipe else "bf16 (no quantization)"
        out.print(f"[bold]{name}[/] · {recipe} · context {ctx:,} tokens · batch {batch}", highlight=False)
        if name in DOWNLOAD_GB:
            out.print(download_note(name), highlight=False)
        if ctx > config.native_context:
            out.print(
                f"[yellow]note:[/] past the native {config.native_context:,} tokens, YaRN scaling is used."
            )
        title = "memory"
        if card:
            title = f"memory on {card.gpu.name}"
        out.print(estimate_table(est, title))
        pct = 100 * est.expert_slots / est.experts_total
        out.print(
            f"experts resident: {est.expert_slots:,} of {est.experts_total:,} ({pct:.1f} %)", highlight=False
        )
        if budget:
            longest = longest_context(config, plan, budget)
            out.print(
                f"budget {budget / GIB:.2f} GiB: largest expert cache {est.expert_slots:,} slots; "
                f"the longest context it leaves room for is {longest:,} tokens",
                highlight=False,
            )
        if card:
            print_card_speed(card, implicit=implicit, cpu_gbs=cpu_gbs)
        if cards is not None:
            out.print(gpu_table_view(cards, quant_name, ctx))
            modes = cold_modes_text(cards, cpu_gbs)
            if modes:
                out.print(modes, highlight=False)
            out.print(assumptions_text(), highlight=False)
        out.print(sweep_table(config, kv_dtype, batch))
        err.print("[dim]estimates from the exact tensor shapes; CUDA context reserve is a constant[/]")

    run(body)
