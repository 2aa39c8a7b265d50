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

from qwenlocal.weights.checkpoint import INDEX_NAME

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


# -- GPTQ ------------------------------------------------------------------------------------
# No GPTQ library installs on this CPU-only machine without a CUDA build (auto-gptq ships CUDA
# kernels in its wheel; gptqmodel builds from source with its CUDA stack), so the pack routine is
# written here from the published layout (GPTQModel's `pack_original`, transformers' GPTQ docs).
def gptq_config(bits=4, group_size=128, sym=True, desc_act=False, checkpoint_format="gptq", **extra) -> dict:
    """Qwen3-30B-A3B-GPTQ-Int4's quantization_config, with the knobs the tests turn."""
    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        **extra,
    }


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int [rows, cols] -> int32 [rows * bits / 32, cols]: 32 / bits codes per word, first in the low bits."""
    per = 32 // bits
    c = codes.long().reshape(codes.shape[0] // per, per, codes.shape[1])
    word = sum(c[:, j] << (bits * j) for j in range(per))
    return (word - (word >= 2**31).long() * 2**32).to(torch.int32)  # the same 32 bits, signed


def gptq_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor, gen):
    """Round-to-nearest GPTQ codes of w [out, in] over the groups g_idx gives each input row.
    Asymmetric zero points are drawn at random (0 and 2^bits - 1 included) so that every zero a
    checkpoint can hold is exercised. Returns (qweight, qzeros v2, scales, the dequantized w)."""
    maxq = 2**bits - 1
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, w.shape[0])
    zeros = torch.empty(groups, w.shape[0], dtype=torch.long)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scales[g] = cols.abs().amax(1) * 2 / maxq
            zeros[g] = (maxq + 1) // 2
        else:
            scales[g] = (cols.amax(1) - cols.amin(1)) / maxq
            zeros[g] = torch.randint(0, maxq + 1, (w.shape[0],), generator=gen)
    scales = scales.half()
    s, z = scales.float()[g_idx].T, zeros[g_idx].T  # [out, in]
    codes = (w / s + z).round().clamp(0, maxq).long()
    plain = (codes - z).float() * s
    # what qwenlocal's int4 format holds for it (quant/int4.py, README): bf16 scale, and the
    # value of code 8, scale * (8 - zero), as the zero, also bf16
    s16 = s.bfloat16().float()
    as_int4 = (codes - 8).float() * s16 + ((8 - z).float() * s).bfloat16().float()
    return pack_words(codes.T, bits), pack_words(zeros.T, bits).T.contiguous(), scales, plain, as_int4


def write_gptq(
    src: Path,
    out: Path,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    checkpoint_format: str = "gptq",
    desc_act: bool = False,
    keep_16bit=lambda name: False,
    seed: int = 0,
    **config_extra,
) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """src in the GPTQ layout; returns the folder, the dequantized weights (fp32) it stands for, and
    the weights the `int4` format holds for its 4-bit tensors.
    `desc_act` gives each input row a random group (the layout act-order writes)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, plain, as_int4 = {}, {}, {}
    for name, w in read_tensors(src).items():
        if not is_linear(name) or keep_16bit(name):
            tensors[name] = w.to(torch.bfloat16)
            continue
        n_in = w.shape[1]
        size = n_in if group_size == -1 else group_size
        g_idx = torch.arange(n_in) // size
        if desc_act:
            g_idx = g_idx[torch.randperm(n_in, generator=gen)]
        qweight, qzeros, scales, plain[name], as_int4[name] = gptq_quantize(
            w.float(), bits, group_size, sym, g_idx, gen
        )
        if checkpoint_format == "gptq":  # v1: GPTQModel's v2 -> v1 subtracts one from each field, word-wise
            offset = {4: 0x11111111, 8: 0x01010101}[bits]
            word = (qzeros.long() & 0xFFFFFFFF) - offset
            word = word & 0xFFFFFFFF
            qzeros = (word - (word >= 2**31).long() * 2**32).to(torch.int32)
        prefix = name.removesuffix(".weight")
        tensors.update(
            {
                f"{prefix}.qweight": qweight,
                f"{prefix}.qzeros": qzeros,
                f"{prefix}.scales": scales,
                f"{prefix}.g_idx": g_idx.to(torch.int32),
            }
        )
    qc = gptq_config(bits, group_size, sym, desc_act, checkpoint_format, **config_extra)
    folder = write_folder(src, out, tensors, {"quantization_config": qc, "torch_dtype": "bfloat16"})
    return folder, plain, as_int4


def int8_rowwise(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' int8 vectorwise round trip in fp32: round(w * 127 / row absmax) * absmax / 127."""
    absmax = w.float().abs().amax(1, keepdim=True)
    return torch.round(w.float() * (127 / absmax)) * (absmax / 127)


def gptq_dequantized_copy(src: Path, out: Path, plain: dict[str, torch.Tensor], dtype=torch.float32) -> Path:
    """The GPTQ folder src with its quantized linears replaced by the packer's own dequantized weights
    (and any 16-bit tensor that `plain` names, by its entry)."""

    def one(name, tensors):
        if name in plain:
            return {name: plain[name]}
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            if name.endswith("." + part):
                prefix = name.removesuffix("." + part)
                return {prefix + ".weight": plain[prefix + ".weight"]} if part == "qweight" else {}
        return None

    return dequantized_copy(src, out, one, dtype)
