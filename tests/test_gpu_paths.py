"""The CUDA-only code read on the CPU: Triton's prerequisites, the device index, the paths a first
GPU user meets (no GPU here: a tensor that says it is on CUDA, monkeypatched checks)."""

from __future__ import annotations

import ast
import inspect
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from quant import moe_kernels, triton_env
from qwenlocal import load_model
from qwenlocal.generation import engine
from qwenlocal.generation.generate import Generator
from qwenlocal.model import qwen3_moe as model_mod
from qwenlocal.planning import memory

from .conftest import TINY


class OnGpu(torch.Tensor):
    """A CPU tensor that says it is on a GPU: reaches CUDA-only branches on this machine."""

    @property
    def is_cuda(self) -> bool:
        return True


@pytest.fixture
def triton_ready(monkeypatch, tmp_path):
    """Every Triton prerequisite present; a test then takes one away."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("TRITON_LIBCUDA_PATH", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setattr(triton_env.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(triton_env.ctypes.util, "find_library", lambda name: f"lib{name}.so.1")
    monkeypatch.setattr(triton_env.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    (tmp_path / "Python.h").write_text("")
    triton_env.triton_missing.cache_clear()
    yield monkeypatch
    triton_env.triton_missing.cache_clear()


def test_triton_taken_when_everything_is_there(triton_ready):
    assert triton_env.triton_missing() == ()
    assert moe_kernels.use_triton(torch.zeros(2).as_subclass(OnGpu))


@pytest.mark.parametrize("what", ["compiler", "headers", "libcuda", "cache"])
def test_missing_triton_prerequisite_takes_the_torch_path(triton_ready, tmp_path, what):
    if what == "compiler":
        triton_ready.setattr(triton_env.shutil, "which", lambda name: None)
    elif what == "headers":
        (tmp_path / "Python.h").unlink()
    elif what == "libcuda":
        triton_ready.setattr(triton_env.ctypes.util, "find_library", lambda name: None)
    else:
        (tmp_path / "a-file").write_text("")  # no folder can be made under a file
        triton_ready.setenv("TRITON_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    missing = triton_env.triton_missing()
    assert len(missing) == 1
    assert not moe_kernels.use_triton(torch.zeros(2).as_subclass(OnGpu))


# ---------------------------------------------------------------------------------- --device cuda:N


def _unguarded(module, is_launch, guards: tuple[str, ...]) -> list[str]:
    """Calls in `module` matching `is_launch` that no enclosing `with <guard>(...)` covers."""
    tree = ast.parse(inspect.getsource(module))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and is_launch(node)):
            continue
        p, guarded = node, False
        while p in parents and not guarded:
            p = parents[p]
            if isinstance(p, ast.With):
                guarded = any(
                    isinstance(i.context_expr, ast.Call) and ast.unparse(i.context_expr.func).endswith(guards)
                    for i in p.items
                )
        if not guarded:
            bad.append(f"{module.__name__}:{node.lineno} {ast.unparse(node.func)}")
    return bad


def test_triton_launches_on_the_tensors_device():
    def launch(call: ast.Call) -> bool:  # kernel[grid](...)
        return isinstance(call.func, ast.Subscript) and ast.unparse(call.func.value).endswith("_kernel")

    assert _unguarded(moe_kernels, launch, ("on_device",)) == []
    assert "on_device" in inspect.getsource(moe_kernels.triton_gate_up)  # the check sees launches


def test_engine_worker_thread_takes_the_models_device():
    source = inspect.getsource(engine.Engine.__init__)
    call = next(
        n
        for n in ast.walk(ast.parse(textwrap.dedent(source)))
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "ThreadPoolExecutor"
    )
    assert "initializer" in {k.arg for k in call.keywords}
    assert "torch.cuda.set_device(device)" in source


# ---------------------------------------------------------------------------------- prefill scores


def test_masked_attention_equals_sdpa_in_slices(monkeypatch):
    monkeypatch.setattr(model_mod, "ATTENTION_SCORE_KEYS", 16)
    g = torch.Generator().manual_seed(0)
    b, h, kv, t, s, d = 1, 8, 2, 24, 100, 16
    q, k, v = (torch.randn(b, n, m, d, generator=g) for n, m in ((h, t), (kv, s), (kv, s)))
    positions = torch.arange(s - t, s)
    mask = torch.arange(s)[None, :] <= positions[:, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(model_mod.masked_attention(q, k, v, mask), want, atol=1e-6, rtol=1e-5)


def test_prefill_scores_stay_within_the_memory_model(checkpoint_factory, monkeypatch):
    """Chunks after the first against a context longer than ATTENTION_SCORE_KEYS: no attention call
    scores more query rows x keys than the memory model's `scores` term holds."""
    keys, chunk, ctx = 64, 32, 256
    monkeypatch.setattr(model_mod, "ATTENTION_SCORE_KEYS", keys)
    monkeypatch.setattr(memory, "ATTENTION_SCORE_KEYS", keys)
    real = F.scaled_dot_product_attention
    largest = [0]

    def sdpa(q, k, v, *args, **kw):
        largest[0] = max(largest[0], math.prod(q.shape[:-1]) * k.shape[-2])  # scores it may hold
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", sdpa)
    folder = checkpoint_factory("gpu-paths-tiny", TINY, dtype=torch.float32)
    model = load_model(folder, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    whole = model(ids)[0, -1]
    largest[0] = 0  # the prefill's calls only
    gen = Generator(model, ctx_size=ctx, prefill_chunk=chunk)
    chunked = gen.prefill(ids[0].tolist())
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    plan = memory.model_plan(model, ctx).replace(prefill_chunk=chunk)
    assert largest[0] * 4 <= memory.activation_terms(model.config, plan)["scores"]


def test_int8_lm_head_on_gpu_is_dequantized_in_slices(monkeypatch):
    """Many rows through an int8 weight on a GPU (a forward without last_only): never the whole
    matrix dequantized at once (the lm_head would take ~1.7 GiB)."""
    from quant import formats, kernels

    w = torch.randn(kernels.PLAIN_CHUNK_ELEMS // 512 + 300, 1024)
    q = formats.quantize(w, "int8")
    largest = [0]
    real = kernels.dequantize

    def dequantize(q, *args, **kw):
        largest[0] = max(largest[0], q.numel)
        return real(q, *args, **kw)

    monkeypatch.setattr(kernels, "dequantize", dequantize)
    x = torch.randn(40, 1024)
    got = kernels.plain(x.as_subclass(OnGpu), q).as_subclass(torch.Tensor)
    assert largest[0] <= kernels.PLAIN_CHUNK_ELEMS
    torch.testing.assert_close(got, x @ real(q, torch.float32).T, atol=1e-4, rtol=1e-4)


def test_graph_capture_and_replay_on_the_models_device():
    """Capture makes its streams and pool on the current device: __call__ makes it the model's."""
    from qwenlocal.model import graphs

    def launch(call: ast.Call) -> bool:
        return ast.unparse(call.func) in ("self._capture", "self.graphs[self.span].replay")

    assert _unguarded(graphs, launch, ("torch.cuda.device",)) == []
    assert "self._capture(self.span)" in inspect.getsource(graphs.GraphDecoder.__call__)
