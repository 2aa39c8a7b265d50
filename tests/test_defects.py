"""Defects found by reading (issue 19), each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qwenlocal import UserError, load_model
from qwenlocal.weights.checkpoint import Checkpoint

from .prequant_packers import write_gptq
from .test_fp8_source import FP8_SHAPES


def test_an_old_quantize_once_copy_is_made_again(small_ckpt, tmp_path, monkeypatch):
    """A cached copy written by an older format is not loaded: it is made again, saying so."""
    from quant import recipe as recipe_module
    from qwenlocal.weights import quant_cache

    monkeypatch.setenv("QWENLOCAL_CACHE_DIR", str(tmp_path / "cache"))
    notes: list[str] = []
    first = quant_cache.quantized_once(small_ckpt, note=notes.append).folder
    assert len(notes) == 1 and "quantizing" in notes[0]
    monkeypatch.setattr(recipe_module, "FORMAT_VERSION", recipe_module.FORMAT_VERSION + 1)
    notes.clear()
    again = quant_cache.quantized_once(small_ckpt, note=notes.append).folder
    assert again != first
    qc = json.loads((again / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == recipe_module.FORMAT_VERSION
    assert len(notes) == 2 and "older format" in notes[0]
    assert not first.exists()  # the stale copy is removed, not left to fill the disk


def test_a_reader_does_not_change_the_checkpoint_it_wraps(checkpoint_factory, tmp_path):
    from qwenlocal.weights.gptq import GptqCheckpoint

    src = checkpoint_factory("gptq-src", FP8_SHAPES, dtype=torch.float32)
    folder, _, _ = write_gptq(src, tmp_path / "gptq")
    plain = Checkpoint(folder)
    names = dict(plain.weight_map)
    some = next(iter(names))
    plain.get(some)
    reader = GptqCheckpoint(plain)
    assert plain.weight_map == names  # no X.weight entries added to the wrapped map
    reader.close()
    assert plain.get(some) is not None and plain._handles  # its own memory maps stay open


def test_a_failed_load_closes_the_memory_maps(small_ckpt, monkeypatch):
    closed, reads = [], []
    real_get, real_close = Checkpoint.get, Checkpoint.close

    def failing_get(self, name):
        reads.append(name)
        if len(reads) == 5:
            raise UserError(f"Tensor {name} cannot be read.")
        return real_get(self, name)

    def close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(Checkpoint, "get", failing_get)
    monkeypatch.setattr(Checkpoint, "close", close)
    with pytest.raises(UserError, match="cannot be read"):
        load_model(small_ckpt)
    assert len(closed) == 1 and not closed[0]._handles


def test_the_api_loads_in_the_checkpoints_16_bit_dtype(checkpoint_factory, small_ckpt, tmp_path):
    from .conftest import SMALL_VOCAB

    fp16 = checkpoint_factory("small-fp16", SMALL_VOCAB, dtype=torch.float16)
    assert load_model(fp16).dtype == torch.float16
    assert load_model(small_ckpt).dtype == torch.bfloat16  # an fp32 folder: the CLI's bf16
    assert load_model(small_ckpt, dtype=torch.float32).dtype == torch.float32  # oracles ask for it


def test_generate_imports_without_the_resource_module():
    """Windows has no `resource`; the peak then comes from psutil, still the process's."""
    code = (  # psutil first: on Linux it imports resource itself, on Windows it needs none
        "import sys, psutil; sys.modules['resource'] = None\n"
        "import torch\n"
        "from qwenlocal.generation.generate import peak_memory\n"
        "n, scope = peak_memory(torch.device('cpu'))\n"
        "assert n > 0 and scope == 'process', (n, scope)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_summary_says_whose_peak_it_reports(small_ckpt):
    from qwenlocal.generation.generate import Generator, SamplingParams, Summary

    model = load_model(small_ckpt, dtype=torch.float32)
    records = list(
        Generator(model, ctx_size=32).stream([1, 2, 3], SamplingParams(temperature=0), max_tokens=2)
    )
    summary = records[-1]
    assert isinstance(summary, Summary)
    assert summary.peak_memory_scope == "process" and summary.peak_memory_bytes > 0
