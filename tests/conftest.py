"""Shared fixtures: random checkpoints in the exact Hugging Face layout, written once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from qwenlocal.weights.random_checkpoint import TINY, write_random_checkpoint

DATA = Path(__file__).parent / "data"
# Quantized copies made by the CLI (chat/serve/generate quantize a 16-bit model once) go to a
# throwaway folder, never the user's cache; child processes inherit it.
os.environ.setdefault("QWENLOCAL_CACHE_DIR", tempfile.mkdtemp(prefix="qwenlocal-test-cache-"))
SMALL_VOCAB = {**TINY, "vocab_size": 1024}


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(name, overrides, **kw) -> folder; the same name is written only once per session."""
    made: dict[str, Path] = {}

    def make(name: str, overrides: dict | None = None, **kw) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp("ckpt") / name
            made[name] = write_random_checkpoint(out, overrides, **kw)
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(checkpoint_factory) -> Path:
    """Tiny widths, the real vocabulary and tokenizer, fp32, three shards."""
    return checkpoint_factory("tiny", TINY, dtype=torch.float32, shard_size=12_000_000)


@pytest.fixture(scope="session")
def small_ckpt(checkpoint_factory) -> Path:
    """Tiny widths and a small vocabulary, fp32, sharded: fast equality tests."""
    return checkpoint_factory("small", SMALL_VOCAB, dtype=torch.float32, shard_size=200_000)
