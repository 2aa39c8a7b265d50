"""The pinned host store of offloaded experts takes what the memory model says, not torch's
power-of-two rounding of each pinned request (checked on the CPU: pinning is recorded, not done)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quant.recipe import Recipe
from qwenlocal.experts import pinned
from qwenlocal.experts.offload import OffloadedExperts
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.planning.memory import estimate, make_plan
from qwenlocal.weights.quantize import expert_layout

LAYERS = 4  # the real layer shape; four layers keep the (untouched) mappings small


def torch_host_rounding(nbytes: int) -> int:
    """torch's caching host allocator (pin_memory=True) rounds each request to a power of two."""
    return 1 << (nbytes - 1).bit_length()


@pytest.fixture
def pinned_requests(monkeypatch):
    """Every page-locked byte asked for, as the CUDA driver or torch's host allocator takes it."""
    taken: list[int] = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kw):
        t = real_empty(*args, **kw)
        if pin_memory:
            taken.append(torch_host_rounding(t.numel() * t.element_size()))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(pinned, "_register", lambda address, nbytes: taken.append(nbytes))
    monkeypatch.setattr(pinned, "_unregister", lambda address: None)
    return taken


@pytest.mark.parametrize("preset", ["nf4", "int8", "mixed"])
def test_pinned_store_is_its_size(pinned_requests, preset):
    config = dataclasses.replace(Qwen3MoeConfig.builtin(), num_hidden_layers=LAYERS)
    recipe = Recipe.from_preset(preset)
    layout = expert_layout(config, recipe, torch.bfloat16)
    with torch.device("meta"):
        experts = OffloadedExperts(config, layout, slots_per_layer=16, device="cpu")
    experts.allocate(pin=True)
    plan = make_plan(
        recipe=recipe, ctx_size=4096, dtype=torch.bfloat16, kv_dtype=None, device="cuda", expert_slots=64
    )
    store = estimate(config, plan).bytes_of("expert_store", "host")
    assert store == experts.nbytes
    staging = config.num_experts_per_tok * layout.nbytes
    page = 4096
    assert store <= sum(pinned_requests) <= store + staging + 2 * page
    assert all(b.is_contiguous() and b.device.type == "cpu" for b in experts.blobs.values())
    experts.blobs[0][-1].fill_(7)  # the slices are real, writable, and do not overlap
    assert int(experts.blobs[1][0].max()) == 0


def test_host_empty_unpinned_is_plain():
    t = pinned.host_empty((3, 5), pin=False)
    assert t.shape == (3, 5) and t.dtype == torch.uint8 and not t.is_pinned()
