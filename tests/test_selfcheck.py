"""The self-check of the fast paths, on the CPU: a fast path made to raise, or to return wrong
values, is turned off with one line, and the answer equals the plain path's; verdicts are kept
per machine; forced paths and QWENLOCAL_SELF_CHECK=0 skip it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from quant import moe_kernels
from qwenlocal import load_model
from qwenlocal.generation.generate import Generator, SamplingParams
from qwenlocal.model import selfcheck

from .conftest import TINY

PROMPT = [17, 923, 4, 511, 77, 1000, 3, 250]


@pytest.fixture(scope="module")
def folder(checkpoint_factory):
    return checkpoint_factory("selfcheck", TINY, dtype=torch.bfloat16)


def greedy(model) -> list[int]:
    gen = Generator(model, ctx_size=64)
    return gen.run(PROMPT, SamplingParams(temperature=0), max_tokens=12, eos_ids=()).token_ids


@pytest.fixture(scope="module")
def plain_answer(folder):
    return greedy(load_model(folder, dtype=torch.bfloat16, quant="mixed", moe="loop"))


def grouped(folder):
    return load_model(folder, dtype=torch.bfloat16, quant="mixed", moe="grouped")


def test_a_sound_fast_path_passes_once_per_machine(folder, tmp_path, monkeypatch):
    model = grouped(folder)
    (v,) = selfcheck.self_check(model, folder=tmp_path)
    assert v.path == "grouped" and v.ok and not v.cached and v.seconds > 0
    assert model.experts.moe == "grouped"
    saved = json.loads((tmp_path / selfcheck.VERDICTS_FILE).read_text())
    assert list(saved) == [selfcheck.machine_key(model.device)]
    monkeypatch.setattr(selfcheck, "decode_step", lambda *a, **k: pytest.fail("checked twice"))
    (again,) = selfcheck.self_check(grouped(folder), folder=tmp_path)
    assert again.ok and again.cached


def _raise(*args, **kwargs):
    raise RuntimeError("PTX .version 8.7 does not support .target sm_75")


def _wrong(real):
    return lambda *args, **kwargs: real(*args, **kwargs) * -3


@pytest.mark.parametrize("how", ["raises", "wrong values"])
def test_a_failing_grouped_path_falls_back_to_loop(folder, tmp_path, monkeypatch, plain_answer, how):
    monkeypatch.setattr(
        moe_kernels, "torch_down", _raise if how == "raises" else _wrong(moe_kernels.torch_down)
    )
    model = grouped(folder)
    (v,) = selfcheck.self_check(model, folder=tmp_path)
    assert not v.ok and model.experts.moe == "loop"
    assert (
        v.line.startswith("self-check: the grouped fast path failed here (")
        and "loop experts instead" in v.line
    )
    assert (
        ("RuntimeError: PTX" in v.detail) if how == "raises" else ("off by" in v.detail or "top" in v.detail)
    )
    assert greedy(model) == plain_answer
    # the verdict is remembered: the next start falls back without checking
    model = grouped(folder)
    (again,) = selfcheck.self_check(model, folder=tmp_path)
    assert again.cached and not again.ok and model.experts.moe == "loop"


class FakeGraph:
    """Stands in for the CUDA graph decoder on the CPU: the eager step, then broken as asked."""

    how = "raises"

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def __call__(self, token):
        if self.how == "raises":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        logits = self.model(torch.tensor([[token]]), cache=self.cache)[0, -1]
        return logits.flip(0)


@pytest.mark.parametrize("how", ["raises", "wrong values"])
def test_a_failing_graph_falls_back_to_eager_decode(folder, tmp_path, monkeypatch, how):
    eager_answer = greedy(grouped(folder))  # the plain path of this part: eager decode, grouped experts
    monkeypatch.setattr(
        selfcheck, "graphs_supported", lambda m: m.graph_decode and m.experts.moe == "grouped"
    )
    monkeypatch.setattr(FakeGraph, "how", how)
    monkeypatch.setattr(selfcheck, "GraphDecoder", FakeGraph)
    model = grouped(folder)
    verdicts = {v.path: v for v in selfcheck.self_check(model, folder=tmp_path)}
    assert verdicts["grouped"].ok and not verdicts["graph"].ok
    assert not model.graph_decode and model.experts.moe == "grouped"  # only the graph is off
    assert "eager decode instead" in verdicts["graph"].line
    assert greedy(model) == eager_answer


def test_forced_paths_and_the_variable_skip_the_check(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(selfcheck, "decode_step", lambda *a, **k: pytest.fail("checked a forced path"))
    model = grouped(folder)
    assert selfcheck.self_check(model, forced=selfcheck.forced_paths("grouped"), folder=tmp_path) == []
    monkeypatch.setenv("QWENLOCAL_SELF_CHECK", "0")
    assert selfcheck.self_check(model, folder=tmp_path) == []
    monkeypatch.setenv("QWENLOCAL_CUDA_GRAPHS", "1")
    monkeypatch.setenv("QWENLOCAL_TRITON_GEMV", "0")
    assert selfcheck.forced_paths("auto") == {"graph", "gemv"}


def test_gemv_turned_off_takes_the_torch_matmul(monkeypatch):
    from .test_gpu_paths import OnGpu

    monkeypatch.setattr(moe_kernels, "_triton_available", lambda: True)
    monkeypatch.setattr(moe_kernels, "TRITON_OFF", set())
    x = torch.zeros(2).as_subclass(OnGpu)
    assert moe_kernels.use_triton(x, "gemv")
    selfcheck.turn_off(SimpleNamespace(), "gemv")
    assert not moe_kernels.use_triton(x, "gemv") and moe_kernels.use_triton(x, "grouped")


def test_pre_sm80_note(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    card = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    note = selfcheck.device_note(card)
    assert note.startswith("note: Tesla T4 (sm_75) has no native bf16") and "--dtype fp16" in note
    assert selfcheck.device_note(SimpleNamespace(device=card.device, dtype=torch.float16)) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert selfcheck.device_note(card) is None


def test_the_cli_prints_one_line_and_answers_with_the_plain_path(tiny_ckpt, tmp_path, monkeypatch):
    """`generate` on a machine where the grouped path fails: one line on stderr, the loop's answer."""
    from typer.testing import CliRunner

    from qwenlocal.cli import app

    monkeypatch.setenv("QWENLOCAL_CACHE_DIR", str(tmp_path))
    args = ["generate", str(tiny_ckpt), "Hello", "-n", "6", "--temp", "0", "--json", "--quant", "bf16"]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    monkeypatch.setattr(selfcheck, "active_paths", lambda model: ["grouped"])  # as on a GPU
    monkeypatch.setattr(moe_kernels, "torch_down", _raise)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("self-check:")]
    assert len(lines) == 1 and "loop experts instead" in lines[0]
    assert (
        json.loads(r.stdout.splitlines()[-1])["token_ids"]
        == json.loads(plain.stdout.splitlines()[-1])["token_ids"]
    )


def test_a_gpu_run_without_triton_says_why(monkeypatch):
    from quant import triton_env

    monkeypatch.setattr(triton_env, "triton_missing", lambda: ("a C compiler (gcc, clang or $CC)",))
    card = SimpleNamespace(device=torch.device("cuda", 0))
    assert selfcheck.triton_note(card) == (
        "note: Triton's kernels are not used here (missing a C compiler (gcc, clang or $CC)); "
        "the torch path runs instead."
    )
    assert selfcheck.triton_note(SimpleNamespace(device=torch.device("cpu"))) is None
