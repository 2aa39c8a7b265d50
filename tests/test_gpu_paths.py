"""The CUDA-only code read on the CPU: Triton's prerequisites, the device index, the paths a first
GPU user meets (no GPU here: a tensor that says it is on CUDA, monkeypatched checks)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

from quant import moe_kernels, triton_env
from qwenlocal import engine


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
