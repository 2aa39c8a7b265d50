"""Each metadata file of the model folder is opened once per command (generate, chat, serve), on
16-bit, quantized, GPTQ and FP8 folders: the folder is read once (sources.ModelSource) and the
checkpoint reader, the tokenizer and the sampling defaults take what was read (a reply's sampling
comes from generation_config.json as read: SamplingParams.for_mode takes no folder)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwenlocal.cli import app

from .prequant_packers import write_fp8, write_gptq
from .test_fp8_source import FP8_SHAPES

METADATA = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
_opened: list[Path] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, Path)):
        _opened.append(Path(args[0]))


sys.addaudithook(_audit)  # a hook cannot be removed: it records only while a test listens


def opens_in(folder: Path, command: list[str], monkeypatch) -> Counter:
    """How often each metadata file of `folder` is opened while the command runs."""
    global _opened
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # serve: load, then no loop
    _opened = []
    try:
        # chat leaves at once: these folders' 1024-token vocabulary has no chat template ids
        r = CliRunner().invoke(app, command, input="/bye\n")
    finally:
        seen, _opened = _opened, None
    assert r.exit_code == 0, r.output
    root = folder.resolve()
    return Counter(p.name for p in seen if p.name in METADATA and p.resolve().parent == root)


@pytest.fixture(scope="module")
def folders(checkpoint_factory, tmp_path_factory) -> dict[str, Path]:
    src = checkpoint_factory("gptq-src", FP8_SHAPES, dtype=torch.float32)
    base = tmp_path_factory.mktemp("load-once")
    quantized = base / "quantized"
    r = CliRunner().invoke(app, ["quantize", str(src), str(quantized), "--preset", "mixed", "--no-report"])
    assert r.exit_code == 0, r.output
    return {
        "16-bit": src,
        "quantized": quantized,
        "gptq": write_gptq(src, base / "gptq")[0],
        "fp8": write_fp8(src, base / "fp8"),
    }


COMMANDS = {
    "generate": ["generate", "{folder}", "a b", "--raw", "-n", "2", "--temp", "0"],
    "chat": ["chat", "{folder}", "--max-tokens", "2", "--temp", "0", "--history-file", "{tmp}/history"],
    "serve": ["serve", "{folder}", "--port", "8765"],
}


@pytest.mark.parametrize("kind", ["16-bit", "quantized", "gptq", "fp8"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_metadata_file_is_opened_once(folders, kind, command, tmp_path, monkeypatch):
    monkeypatch.setenv("QWENLOCAL_CACHE_DIR", str(tmp_path / "cache"))
    folder = folders[kind]
    args = [a.format(folder=folder, tmp=tmp_path) for a in COMMANDS[command]]
    counts = opens_in(folder, [*args, "--device", "cpu", "--quant", "auto"], monkeypatch)
    assert counts["config.json"] == 1 and counts["generation_config.json"] == 1, counts
    assert all(n == 1 for n in counts.values()), counts
