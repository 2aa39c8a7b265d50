"""Random-weight checkpoints in the exact Hugging Face layout of Qwen3-30B-A3B.

config.json, generation_config.json, the real tokenizer files, per-expert tensor names, shards of
a chosen size and model.safetensors.index.json: a folder that behaves like the real one in every
way but the words it picks. Used by the tests and the benchmarks.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import torch

from qwenlocal.model.config import BUILTIN_DIR, Qwen3MoeConfig
from qwenlocal.weights.checkpoint import ShardWriter, atomic_folder, checkpoint_shapes

TOKENIZER_DIR = BUILTIN_DIR  # the real tokenizer files ship with the package
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

# A small model for tests: real vocabulary and head layout, tiny widths.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}
# The real layer shapes of Qwen3-30B-A3B with fewer layers (for benchmarks).
REAL_SHAPES = {"num_hidden_layers": 2}


def config_dict(overrides: dict | None = None, spelling: str = "4.x") -> dict:
    """Qwen3-30B-A3B's config.json with overrides, in transformers 4.x or 5.x key spelling."""
    d = json.loads((BUILTIN_DIR / "config.json").read_text())
    d.update(overrides or {})
    if spelling == "5.x":
        d["num_local_experts"] = d.pop("num_experts")
        rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        scaling = d.pop("rope_scaling", None)
        if scaling:
            rope.update(scaling)
        d["rope_parameters"] = rope
    return d


def random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device="cpu"
) -> torch.Tensor:
    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    if name.endswith("norm.weight"):
        t = 1.0 + 0.1 * randn()
    elif name.endswith(".bias"):
        t = 0.02 * randn()
    elif name.endswith("mlp.gate.weight"):
        t = 0.5 * randn() / shape[1] ** 0.5  # decisive routing
    else:
        t = randn() / shape[-1] ** 0.5
    return t.to(dtype)


def write_random_checkpoint(
    out: str | Path,
    overrides: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int = 2 * 1024**3,
    seed: int = 0,
    spelling: str = "4.x",
    tokenizer_dir: Path | None = TOKENIZER_DIR,
    force: bool = False,
) -> Path:
    """Write a random checkpoint of the config (Qwen3-30B-A3B + overrides); returns its folder."""
    d = config_dict(overrides, spelling)
    d["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    config = Qwen3MoeConfig.from_dict(d)
    gen = torch.Generator().manual_seed(seed)
    out = Path(out)
    with atomic_folder(out, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
        shutil.copyfile(BUILTIN_DIR / "generation_config.json", tmp / "generation_config.json")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        with ShardWriter(tmp, shard_size) as writer:
            for name, shape in checkpoint_shapes(config).items():
                writer.add(name, random_tensor(name, shape, gen, dtype))
            writer.finish()
    return out


class RandomSource:
    """Random tensors with a checkpoint's names, shapes and reading methods, made on demand (on
    `device`, e.g. the GPU): a quantized checkpoint of any size can be written without its 16-bit
    source ever existing on disk (the full 48-layer shape is 61 GB in bf16)."""

    def __init__(self, config_json: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device="cpu"):
        self.config = Qwen3MoeConfig.from_dict(config_json)
        self.shapes = checkpoint_shapes(self.config)
        self.dtype, self.seed, self.device = dtype, seed, torch.device(device)
        # one pseudo-shard per layer, as the real checkpoint groups tensors
        self.weight_map = {
            n: f"layer-{n.split('.')[2] if n.startswith('model.layers.') else 'rest'}" for n in self.shapes
        }
        self.folder = Path("<random>")

    def nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * self.dtype.itemsize

    def get(self, name: str) -> torch.Tensor:
        gen = torch.Generator(self.device).manual_seed(self.seed + zlib.crc32(name.encode()))
        return random_tensor(name, self.shapes[name], gen, self.dtype, self.device)

    def release(self, shard: str) -> None:
        pass

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shapes[name])

    def dtype_of(self, name: str) -> torch.dtype:
        return self.dtype

    def repacked(self, name: str, spec) -> None:
        return None


def write_random_quantized_checkpoint(
    out: str | Path,
    overrides: dict | None = None,
    preset: str = "mixed",
    device="cpu",
    shard_size: int = 2 * 1024**3,
    force: bool = False,
    progress=None,
) -> Path:
    """A quantized checkpoint of random weights, written straight from random tensors made on
    `device` (the GPU benchmark builds the full 48-layer model this way in a minute or two)."""
    from quant.recipe import Recipe
    from qwenlocal.weights.quantize import write_quantized

    d = config_dict(overrides)
    source = RandomSource(d, device=device)
    out = Path(out)
    path, _ = write_quantized(
        source,
        out,
        Recipe.from_preset(preset),
        TOKENIZER_DIR,
        shard_size,
        force,
        torch.device(device),
        progress,
        d,
    )
    return path
