"""A CPU decode token through cpu_decode's layer operator equals the Python layers bit for bit
(logits and the KV cache, step after step), greedy tokens through it equal transformers', and the
Python path computes whatever the operator does not take, or all of it where it is not built."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from qwenlocal import load_model
from qwenlocal.model import cpu_decode

from .conftest import SMALL_VOCAB

# TINY's attention (4 query heads on 2 KV heads, q/k norms), experts wide enough for the int4 kernels
SHAPE = {**SMALL_VOCAB, "hidden_size": 128, "moe_intermediate_size": 64}
PROMPT = torch.tensor([[17, 923, 4, 511, 77]])
TOKENS = (5, 900, 33, 7, 1000, 64)


@pytest.fixture(scope="module")
def built():
    if not cpu_decode.OPERATOR.build():
        pytest.skip("no C++ compiler for torch extensions here")


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """How many times the layers called the operator."""
    count = [0]
    call = cpu_decode.decode_layer

    def counted(*args):
        count[0] += 1
        return call(*args)

    monkeypatch.setattr(cpu_decode, "decode_layer", counted)
    return count


@contextmanager
def python_layers(model):
    """The layers as the Python path computes them: the reference."""
    saved = [layer.decode_args for layer in model.model.layers]
    for layer in model.model.layers:
        layer.__dict__["decode_args"] = None
    try:
        yield
    finally:
        for layer, args in zip(model.model.layers, saved, strict=True):
            layer.__dict__["decode_args"] = args


def assert_decodes_as_python(model, calls: list[int], layers_with_op: int) -> None:
    """A prompt, then decode steps, with the operator and without it (each its own cache): equal
    logits at every step and equal caches at the end; the operator ran on `layers_with_op` layers
    a step."""
    op_cache, py_cache = model.new_cache(32), model.new_cache(32)
    with torch.inference_mode():
        assert torch.equal(model(PROMPT, op_cache), model(PROMPT, py_cache))  # prefill: Python
        for token in TOKENS:
            ids = torch.tensor([[token]])
            calls[0] = 0
            got = model(ids, op_cache)
            assert calls[0] == layers_with_op
            with python_layers(model):
                want = model(ids, py_cache)
            assert calls[0] == layers_with_op
            assert torch.equal(got, want)
    assert op_cache.length == py_cache.length == PROMPT.shape[1] + len(TOKENS)
    for got, want in zip(op_cache.k + op_cache.v, py_cache.k + py_cache.v, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "quant, dtype",
    [
        ("mixed", torch.bfloat16),  # int8 attention, int4 experts: the default recipe
        ("none", torch.bfloat16),  # 16-bit attention
        ("int8", torch.float16),
        ("none", torch.float32),  # no cast anywhere in a float32 model's 16-bit layers
    ],
)
def test_the_operator_decodes_as_the_python_layers_bit_for_bit(
    quant, dtype, built, calls, checkpoint_factory
):
    folder = checkpoint_factory("cpu-decode", SHAPE, dtype=torch.bfloat16)
    model = load_model(folder, dtype=dtype, quant=quant)
    assert all(layer.decode_args is not None for layer in model.model.layers)
    assert_decodes_as_python(model, calls, model.config.num_hidden_layers)


@pytest.mark.parametrize(
    "name, overrides",
    [
        # attention bias (q/k/v/o), the top-k weights not renormalised
        ("bias", {"attention_bias": True, "norm_topk_prob": False}),
        # a dense-MLP layer between MoE ones, wider heads, top-3
        (
            "dense-layer",
            {"num_hidden_layers": 3, "mlp_only_layers": [1], "head_dim": 32, "num_experts_per_tok": 3},
        ),
        ("no-gqa", {"num_key_value_heads": 4}),
    ],
)
def test_the_operator_takes_bias_dense_layers_and_other_shapes(
    name, overrides, built, calls, checkpoint_factory
):
    folder = checkpoint_factory(f"cpu-decode-{name}", {**SHAPE, **overrides}, dtype=torch.bfloat16)
    for quant in ("mixed", "none"):
        model = load_model(folder, dtype=torch.bfloat16, quant=quant)
        assert_decodes_as_python(model, calls, model.config.num_hidden_layers)


@pytest.mark.parametrize("name", ["bias-no-norm-topk", "mlp-only-layers"])
def test_greedy_tokens_through_the_operator_equal_transformers(name, built, calls, checkpoint_factory):
    test_model = pytest.importorskip("tests.test_model")
    overrides, kw = test_model.CONFIGS[name]
    folder = checkpoint_factory(f"model-{name}", {**SMALL_VOCAB, **overrides}, **kw)
    ours = load_model(folder, dtype=torch.float32)
    test_model.test_32_greedy_tokens((ours, test_model.reference(folder)))
    assert calls[0] >= 31 * ours.config.num_hidden_layers  # every decode step went through it


def test_steps_the_operator_does_not_take_go_through_python(built, calls, checkpoint_factory):
    folder = checkpoint_factory("cpu-decode", SHAPE, dtype=torch.bfloat16)
    model = load_model(folder, dtype=torch.bfloat16, quant="mixed")
    with torch.inference_mode():
        fp8 = model.new_cache(32, dtype=torch.float8_e4m3fn)  # a 1-byte cache: written as bytes
        model(PROMPT, fp8)
        model(torch.tensor([[5]]), fp8)
        both = model.new_cache(32, batch=2)  # two rows
        model(PROMPT.repeat(2, 1), both)
        model(torch.tensor([[5], [6]]), both)
        short = model.new_cache(len(PROMPT[0]))  # no room for the token: the Python path says so
        model(PROMPT, short)
        with pytest.raises(ValueError, match="KV cache holds"):
            model(torch.tensor([[5]]), short)
    assert calls[0] == 0


def test_layers_the_operator_cannot_compute_are_not_prepared(checkpoint_factory):
    folder = checkpoint_factory("cpu-decode", SHAPE, dtype=torch.bfloat16)
    for quant, dtype in (
        ("int4", torch.bfloat16),  # 4-bit attention
        ("mixed", torch.float32),  # int8 attention under a float32 token: the Python path casts to bf16
    ):
        model = load_model(folder, dtype=dtype, quant=quant)
        assert all(layer.decode_args is None for layer in model.model.layers)
    model = load_model(folder, dtype=torch.bfloat16, quant="none")
    assert all(layer.decode_args is not None for layer in model.model.layers)
    model.to(torch.float32)  # cast: the operands are no longer the weights
    assert all(layer.decode_args is None for layer in model.model.layers)


def test_until_the_operator_is_built_the_python_layers_decode(calls, checkpoint_factory, monkeypatch):
    folder = checkpoint_factory("cpu-decode", SHAPE, dtype=torch.bfloat16)
    model = load_model(folder, dtype=torch.bfloat16, quant="mixed")
    for status in ("building", "failed"):
        monkeypatch.setattr(cpu_decode.OPERATOR, "status", status)
        assert_decodes_as_python(model, calls, 0)


def test_an_operator_that_does_not_build_is_never_ready(tmp_path, monkeypatch):
    from quant.extensions import CppOperator

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))
    broken = CppOperator("qwenlocal_test_broken", cpu_decode.OPERATOR.source)
    assert not broken.build() and broken.status == "failed"
    assert not broken.ready() and broken.status == "failed"  # no second build
