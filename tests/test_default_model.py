"""With no model argument, chat, generate and serve pick Qwen's smallest official checkpoint for the
recipe; vram plans for it and says what each checkpoint costs to download."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwenlocal.cli import app
from qwenlocal.planning.vram import read_config
from qwenlocal.weights.sources import FP8_ID, GPTQ_INT4_ID, default_model, own_recipe

runner = CliRunner()


@pytest.mark.parametrize(
    "quant, expected",
    [
        (None, GPTQ_INT4_ID),
        ("auto", GPTQ_INT4_ID),
        ("nf4", GPTQ_INT4_ID),
        ("mixed", GPTQ_INT4_ID),
        ("int8", FP8_ID),
        ("bf16", FP8_ID),
    ],
)
def test_default_model_follows_the_recipe(quant, expected):
    assert default_model(quant) == expected


def test_vram_plans_for_the_default_and_says_the_download():
    d = json.loads(runner.invoke(app, ["vram", "--json"]).stdout)
    assert d["model"] == GPTQ_INT4_ID and d["download_gb"] == 17
    assert d["quant"] == own_recipe(read_config(GPTQ_INT4_ID)[0]).preset  # "gptq" with the int4 format
    d = json.loads(runner.invoke(app, ["vram", "--json", "--quant", "int8"]).stdout)
    assert d["model"] == FP8_ID and d["download_gb"] == 31 and d["quant"] == "int8"
    r = runner.invoke(app, ["vram"])
    assert (
        "download: Qwen/Qwen3-30B-A3B-GPTQ-Int4 ~17 GB" in r.stdout
        and "Qwen/Qwen3-30B-A3B ~61 GB" in r.stdout
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["generate", "hello", "--device", "cpu"], GPTQ_INT4_ID),
        (["generate", "hello", "--quant", "int8", "--device", "cpu"], FP8_ID),
        (["chat", "--quant", "bf16", "--device", "cpu"], FP8_ID),
        (["serve", "--device", "cpu"], GPTQ_INT4_ID),
    ],
)
def test_commands_without_a_model_pick_it(args, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # an empty cache, whatever this machine holds: nothing is found, nothing is fetched
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert f"{expected} is not in the local Hugging Face cache" in " ".join(r.output.split())
