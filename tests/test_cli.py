"""The CLI driven as a user would: real processes for the console script, CliRunner elsewhere."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quant.recipe import FORMAT_VERSION
from qwenlocal.cli import app
from qwenlocal.planning.options import parse_tokens

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_generate_json(tiny_ckpt):
    r = invoke("generate", tiny_ckpt, "Hello", "-n", 8, "--temp", 0, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(d) == {
        "text",
        "token_ids",
        "prompt_tokens",
        "generated_tokens",
        "finish_reason",
        "prompt_tps",
        "gen_tps",
        "peak_memory_bytes",
        "peak_memory_scope",
    }
    assert d["peak_memory_scope"] == "process"  # the CPU's peak is the process's (generate.peak_memory)
    assert d["generated_tokens"] == len(d["token_ids"]) == 8 and d["finish_reason"] == "length"


def test_generate_greedy_matches_library(tiny_ckpt):
    from qwenlocal import load_model
    from qwenlocal.generation.generate import Generator, SamplingParams
    from qwenlocal.generation.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_ckpt)
    gen = Generator(load_model(tiny_ckpt, dtype="bf16"), tok, ctx_size=4096)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    expected = gen.run(ids, SamplingParams(temperature=0), max_tokens=6).token_ids
    r = invoke("generate", tiny_ckpt, "Hi", "-n", 6, "--temp", 0, "--no-think", "--json", "--quant", "bf16")
    assert json.loads(r.stdout.strip().splitlines()[-1])["token_ids"] == expected


def test_generate_stdin_raw_and_stream(tiny_ckpt):
    from qwenlocal import load_model
    from qwenlocal.generation.generate import Generator, SamplingParams
    from qwenlocal.generation.tokenizer import Tokenizer

    text = "plain text prompt"
    r = invoke(
        "generate", tiny_ckpt, "-", "-n", 4, "--raw", "--temp", 0, "--quant", "bf16", "--json", input=text
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    tok = Tokenizer.from_dir(tiny_ckpt)
    # stdin is the prompt, and --raw sends it without the chat template around it
    assert d["prompt_tokens"] == len(tok.encode(text)) == 3
    gen = Generator(load_model(tiny_ckpt, dtype="bf16"), tok, ctx_size=4096)
    assert d["token_ids"] == gen.run(tok.encode(text), SamplingParams(temperature=0), max_tokens=4).token_ids
    streamed = invoke(
        "generate", tiny_ckpt, "-", "-n", 4, "--raw", "--temp", 0, "--quant", "bf16", input=text
    )
    assert streamed.stdout == d["text"] + "\n"
    assert "3 prompt tokens" in streamed.stderr and "4 generated" in streamed.stderr


@pytest.fixture(scope="module")
def greedy_tokens(tiny_ckpt):
    """The greedy reply to 'Hi' (thinking mode, the chat template), as the library gives it."""
    from qwenlocal import load_model
    from qwenlocal.generation.generate import Generator, SamplingParams
    from qwenlocal.generation.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_ckpt)
    gen = Generator(load_model(tiny_ckpt, dtype="bf16"), tok, ctx_size=4096)

    def run(messages, **sampling):
        ids = tok.encode_chat(messages)
        return len(ids), gen.run(
            ids, SamplingParams(**{"temperature": 0, **sampling}), max_tokens=12
        ).token_ids

    return run


@pytest.mark.parametrize(
    "flags",
    [
        ["--top-k", 1, "--temp", 5],  # one candidate: greedy however hot
        ["--min-p", 1, "--top-k", 0, "--temp", 5],  # only the likeliest token reaches min_p = 1
    ],
)
def test_generate_sampling_flags_that_make_it_greedy(tiny_ckpt, greedy_tokens, flags):
    r = invoke("generate", tiny_ckpt, "Hi", "-n", 12, "--quant", "bf16", "--json", "--seed", 1, *flags)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["token_ids"] == greedy_tokens(HI)[1]


HI = [{"role": "user", "content": "Hi"}]


def test_generate_system_and_presence_penalty(tiny_ckpt, greedy_tokens):
    r = invoke("generate", tiny_ckpt, "Hi", "-n", 12, "--quant", "bf16", "--json", "--temp", 0,
               "--system", "Be brief.")  # fmt: skip
    d = json.loads(r.stdout.strip().splitlines()[-1])
    with_system = [{"role": "system", "content": "Be brief."}, *HI]
    assert (d["prompt_tokens"], d["token_ids"]) == greedy_tokens(with_system)
    r = invoke("generate", tiny_ckpt, "Hi", "-n", 12, "--quant", "bf16", "--json", "--temp", 0,
               "--presence-penalty", 1e4)  # fmt: skip
    ids = json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]
    assert len(set(ids)) == len(ids) == 12  # a token once generated is never the argmax again


def test_generate_plain_summary_with_expert_cache(tiny_ckpt):
    args = ["generate", tiny_ckpt, "Hi", "-n", 3, "--temp", 0, "--quant", "mixed", "--gpu-experts", 4]
    d = json.loads(invoke(*args, "--json").stdout.strip().splitlines()[-1])
    plain = invoke(*args)
    assert plain.exit_code == 0, plain.output
    m = re.search(
        r"(\d+) prompt tokens, .* · (\d+) generated, .* · length · expert cache ([\d.]+) % hits", plain.stderr
    )
    assert m and (int(m.group(1)), int(m.group(2))) == (d["prompt_tokens"], 3)
    assert float(m.group(3)) == round(100 * d["expert_hit_rate"], 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu(tiny_ckpt):
    r = invoke("generate", tiny_ckpt, "Hi", "--device", "cuda")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --device cuda was asked for, but no CUDA GPU is available."


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from qwenlocal.app.cli_util import STATE

    monkeypatch.setitem(STATE, "debug", False)
    quiet = invoke("generate", tmp_path / "nowhere", "hi")
    assert quiet.exit_code == 2 and "Traceback" not in quiet.stderr
    loud = invoke("--debug", "generate", tmp_path / "nowhere", "hi")
    assert loud.exit_code == 2 and "Traceback (most recent call last)" in loud.stderr
    assert "does not exist" in loud.stderr


def test_ctrl_c_exits_130_and_keeps_the_routing_trace(tiny_ckpt, tmp_path):
    trace = tmp_path / "t.jsonl"
    args = ["generate", str(tiny_ckpt), "Hi", "-n", "4000", "--quant", "bf16", "--record-routing", str(trace)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenlocal.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        # SIGINT at its default, as in a user's terminal: a suite started as a background job of a
        # script inherits it ignored, and Python (so `generate`) rightly keeps it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        proc.stdout.read(1)  # the reply has begun to stream
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.decode().strip().endswith("interrupted") and b"Traceback" not in stderr
    assert len(trace.read_text().splitlines()) > 3  # the prompt's tokens at least, closed on the way out


def generate_processes(cmd: list[str], tiny_ckpt, bad_folder, *flags):
    """`cmd generate` as real processes: on the tiny model with `flags`, then on a missing folder."""

    def run(*args):
        return subprocess.run([*cmd, "generate", *args], capture_output=True, text=True, timeout=120)

    return run(str(tiny_ckpt), "Hi", *flags), run(str(bad_folder), "Hi")


def test_installed_console_script(tiny_ckpt, tmp_path):
    script = Path(sys.executable).parent / "qwenlocal"
    assert script.is_file(), "the qwenlocal console script is not installed (pip install -e .)"
    ok, bad = generate_processes(
        [str(script)], tiny_ckpt, tmp_path / "x", "-n", "2", "--json", "--quant", "bf16"
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["generated_tokens"] == 2
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "fp7"], "Unknown dtype 'fp7'"),
        (["--device", "tpu"], "Unknown device 'tpu'"),
        (["--ctx-size", "200k"], "past what this model supports"),
        (["--ctx-size", "lots"], "Cannot read 'lots' as a token count"),
        (["-n", "0"], "--max-tokens must be positive"),
        (["--top-p", "2"], "top_p must be in"),
        (["--ctx-size", "4"], "the context holds 4"),
        (["--moe", "fast"], "Unknown --moe 'fast'"),
    ],
)
def test_bad_flags_exit_2(tiny_ckpt, args, message):
    r = invoke("generate", tiny_ckpt, "Hello there", *args)
    assert r.exit_code == 2
    assert message in r.stderr
    assert "Traceback" not in r.output


def test_missing_model_exit_2(tmp_path):
    r = invoke("generate", tmp_path / "nowhere", "hi")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_parse_tokens():
    assert parse_tokens("32k") == 32768 and parse_tokens("128K") == 131072 and parse_tokens(4096) == 4096


def test_console_script_process(tiny_ckpt, tmp_path):
    """The installed entry point, as a real process: output, then exit 2 on a bad folder."""
    cmd = [sys.executable, "-m", "qwenlocal.cli"]
    ok, bad = generate_processes(cmd, tiny_ckpt, tmp_path / "x", "-n", "3", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["generated_tokens"] == 3
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_quant_auto_loads_16bit_when_it_fits_else_quantizes_once(tiny_ckpt, tmp_path, monkeypatch):
    """`--quant auto` (the default): the tiny model fits the free RAM and loads as it is; with a
    budget smaller than its 16-bit weights it is quantized once into the cache, then reused."""
    import qwenlocal.planning.plan

    monkeypatch.setenv("QWENLOCAL_CACHE_DIR", str(tmp_path / "cache"))
    fits = invoke("generate", tiny_ckpt, "Hi", "-n", 2, "--temp", 0, "--device", "cpu")
    assert fits.exit_code == 0, fits.output
    assert fits.stderr.count("--quant auto: 16-bit weights fit") == 1 and "quantizing" not in fits.stderr
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(qwenlocal.planning.plan, "host_free_bytes", lambda: 1_000_000)
    first = invoke("generate", tiny_ckpt, "Hi", "-n", 2, "--temp", 0, "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert "--quant auto: 16-bit weights do not fit" in first.stderr and "quantizing" in first.stderr
    [cached] = list((tmp_path / "cache").iterdir())
    assert cached.name.endswith(f"-mixed-v{FORMAT_VERSION}") and (cached / "config.json").is_file()
    second = invoke("generate", tiny_ckpt, "Hi", "-n", 2, "--temp", 0, "--device", "cpu")
    assert second.exit_code == 0 and "quantizing" not in second.stderr
    assert second.stdout == first.stdout


def test_quant_auto_both_ways(tiny_ckpt):
    import torch

    from qwenlocal.model.config import Qwen3MoeConfig
    from qwenlocal.planning.plan import Sizing, decide_recipe

    config = Qwen3MoeConfig.from_file(tiny_ckpt / "config.json")
    cpu = torch.device("cpu")
    big = decide_recipe(config, "auto", Sizing(cpu, torch.bfloat16, 256, budget=1 << 34))
    assert big.recipe is None and big.reason.startswith("16-bit weights fit") and not big.quantize_once
    small = decide_recipe(config, "auto", Sizing(cpu, torch.bfloat16, 256, budget=1 << 20))
    assert small.recipe is not None and small.recipe.preset == "mixed" and small.quantize_once
    assert "do not fit" in small.reason


def lru_counts(steps: list[list[list[int]]], slots: int) -> tuple[int, int]:
    """Hits and misses of one layer's LRU cache of `slots` experts over forward steps (each a list
    of tokens' expert ids), written apart from offload.py but to its rules under --moe loop: a
    step counts each distinct expert once, a hit if it was resident when the step began; hits
    are touched in expert order; a prefill's misses are admitted in order of the last token that
    uses them, one decode token's in expert order; misses beyond the room the hits leave stream
    through the slots in waves and may evict this step's hits."""
    cache: list[int] = []  # least recently used first
    hits = misses = 0

    def admit(e: int, protect: set[int]) -> None:
        if len(cache) == slots:
            cache.remove(next(r for r in cache if r not in protect))
        cache.append(e)

    for tokens in steps:
        needed = sorted({e for ids in tokens for e in ids})
        hit = [e for e in needed if e in cache]
        miss = [e for e in needed if e not in cache]
        hits, misses = hits + len(hit), misses + len(miss)
        for e in hit:
            cache.remove(e)
            cache.append(e)
        if len(tokens) > 1:
            miss.sort(key=lambda e: max(t for t, ids in enumerate(tokens) if e in ids))
        first, rest = miss[: slots - len(hit)], miss[slots - len(hit) :]
        for e in first:
            admit(e, {*hit, *first})
        for i in range(0, len(rest), slots):
            wave = rest[i : i + slots]
            for e in wave:
                admit(e, set(wave))
    return hits, misses


def test_lru_counts_by_hand():
    # 2 slots. Prefill [1,2] [3,1]: 3 misses, admitted by last use 2, 1, 3 -> resident 1, 3.
    # Decode [3, 4]: 3 hits, 4 evicts 1. Decode [1, 4]: 4 hits, 1 evicts 3.
    assert lru_counts([[[1, 2], [3, 1]], [[3, 4]], [[1, 4]]], 2) == (2, 5)


def test_offload_flags(tiny_ckpt, tmp_path):
    trace = tmp_path / "routing.jsonl"
    gpu_experts = 6
    r = invoke(
        "generate",
        tiny_ckpt,
        "Hi",
        "-n",
        12,
        "--temp",
        0,
        "--json",
        "--quant",
        "mixed",
        "--gpu-experts",
        gpu_experts,
        "--record-routing",
        trace,
        "--cache-policy",
        "lru",
        "--moe",
        "loop",  # the path lru_counts follows (grouped steps admit a prefill's misses in expert order)
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    tokens = [json.loads(line)["experts"] for line in trace.read_text().splitlines()]
    prompt = d["prompt_tokens"]
    assert len(tokens) == prompt + d["generated_tokens"] - 1  # the last token is never fed back
    # one prefill chunk, then one step per fed-back token; the loader splits the slots evenly
    steps = [tokens[:prompt]] + [[t] for t in tokens[prompt:]]
    layers, slots = len(tokens[0]), gpu_experts // len(tokens[0])
    counts = [lru_counts([[ids[layer] for ids in step] for step in steps], slots) for layer in range(layers)]
    hits, misses = sum(h for h, _ in counts), sum(m for _, m in counts)
    assert hits > 0 and misses > 0
    assert d["expert_hit_rate"] == round(hits / (hits + misses), 4)
    bad = invoke("generate", tiny_ckpt, "Hi", "--cache-policy", "fifo")
    assert bad.exit_code == 2 and "Unknown --cache-policy" in bad.stderr
    bad = invoke("generate", tiny_ckpt, "Hi", "--quant", "mixed", "--gpu-experts", 1)
    assert bad.exit_code == 2 and "too few" in bad.stderr


def test_options_import_nothing_of_the_cli():
    """cli_util imports options; the other way round would be a cycle."""
    import ast

    import qwenlocal.planning.options

    tree = ast.parse(Path(qwenlocal.planning.options.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"cli", "cli_util", "chat", "server"}, imported


def test_help_imports_no_command_module():
    """`qwenlocal --help` lists every command without importing torch or the modules that
    declare the commands; a command is imported when it runs."""
    code = (
        "import sys\n"
        "from qwenlocal.cli import main\n"
        "sys.argv = ['qwenlocal', '--help']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = {'torch', 'qwenlocal.app.chat', 'qwenlocal.app.server', 'qwenlocal.planning.vram', 'qwenlocal.weights.loader'}\n"
        "print('imported:', sorted(heavy & set(sys.modules)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "imported: []" in r.stdout
    for command in ("generate", "quantize", "chat", "serve", "vram"):
        assert command in r.stdout
    assert "Chat in the terminal" in r.stdout  # chat's docstring, read without importing chat.py
    assert invoke("serve", "--help").exit_code == 0 and "--max-queue" in invoke("serve", "--help").stdout
