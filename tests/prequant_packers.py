"""Writers of pre-quantized checkpoints in the exact Hugging Face layout, independent of qwenlocal's
readers: FP8 through transformers' own fine-grained FP8 quantizer, and the dequantized copies that
transformers' Qwen3MoeForCausalLM is the reference on."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwenlocal.checkpoint import INDEX_NAME

TOKENIZER_AND_GENERATION = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
)
LINEAR_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    """The weights Qwen quantizes in its FP8 and GPTQ releases: attention and MLP/expert projections
    (not the router `mlp.gate`, embeddings, norms or lm_head)."""
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR_PROJS


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def write_folder(
    src: Path,
    out: Path,
    tensors: dict[str, torch.Tensor],
    config_update: dict,
    shards: int = 3,
    drop: tuple[str, ...] = (),
) -> Path:
    """`tensors` in `shards` safetensors shards with an index, src's tokenizer files, src's config
    updated (keys set to None are removed)."""
    out.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config.update(config_update)
    for k in [k for k, v in config.items() if v is None]:
        del config[k]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_AND_GENERATION:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    names = [n for n in tensors if n not in drop]
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# -- FP8 -------------------------------------------------------------------------------------
def fp8_config(block=(128, 128)) -> dict:
    """Qwen3-30B-A3B-FP8's quantization_config."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }


def _fp8_ops(block):
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    hf_quantizer = SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=tuple(block)))
    return Fp8Quantize(hf_quantizer), Fp8Dequantize(hf_quantizer)


def write_fp8(src: Path, out: Path, block=(128, 128), dtype=torch.bfloat16) -> Path:
    """src (16/32-bit) in Qwen's FP8 layout, quantized by transformers' FineGrainedFP8 quantizer;
    the tensors it leaves alone are stored in `dtype`."""
    quantizer, _ = _fp8_ops(block)
    tensors = {}
    for name, w in read_tensors(src).items():
        if is_linear(name):
            tensors.update(quantizer._quantize_one(name, w.float()))
        else:
            tensors[name] = w.to(dtype)
    update = {"quantization_config": fp8_config(block), "torch_dtype": str(dtype).removeprefix("torch.")}
    return write_folder(src, out, tensors, update)


def dequantized_copy(
    src: Path, out: Path, dequantize: Callable[[str, dict[str, torch.Tensor]], dict | None], dtype
) -> Path:
    """A 16/32-bit folder of `src`'s weights. `dequantize(name, tensors)` turns a stored tensor into
    the plain tensors it stands for ({} for a part of another's; None: not quantized, cast to
    `dtype`)."""
    tensors = read_tensors(src)
    plain = {}
    for name, t in tensors.items():
        got = dequantize(name, tensors)
        for n, w in (got if got is not None else {name: t}).items():
            plain[n] = w.to(dtype)
    update = {"quantization_config": None, "torch_dtype": str(dtype).removeprefix("torch.")}
    return write_folder(src, out, plain, update, shards=1)


def fp8_dequantized_copy(src: Path, out: Path, dtype=torch.float32) -> Path:
    """src (an FP8 folder) dequantized by transformers' own Fp8Dequantize."""
    _, deq = _fp8_ops(
        json.loads((src / "config.json").read_text())["quantization_config"]["weight_block_size"]
    )

    def one(name, tensors):
        if name.endswith("_scale_inv"):
            return {}
        scale = tensors.get(name + "_scale_inv")
        return None if scale is None else {name: deq._dequantize_one(tensors[name], scale, torch.float32)}

    return dequantized_copy(src, out, one, dtype)
