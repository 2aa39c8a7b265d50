"""Streaming conversion: a 16-bit checkpoint becomes quantized tensors, one source tensor at a time.

The same stream feeds `qwenlocal quantize` (written to shards) and quantize-while-loading (assigned
to the model). Each expert's gate, up and down projections, with their statistics, are packed into
one contiguous blob `model.layers.L.mlp.experts.E.blob`, so one copy moves an expert.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quant.formats import dequantize, quantize
from quant.int4 import cpu_packable
from quant.kernels import to_kernel_layout
from quant.pack import PackLayout, pack, pack_layout
from quant.recipe import Recipe
from quant.spec import QSpec
from qwenlocal.errors import UserError
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.model.names import EXPERT_PROJS, expert_blob_name, expert_tensor_name, tensor_class
from qwenlocal.weights.checkpoint import (
    Checkpoint,
    ShardWriter,
    atomic_folder,
    copy_side_files,
    dense_tensor_shapes,
    expert_proj_shapes,
    expert_tensor_shapes,
)
from qwenlocal.weights.sources import ModelSource, open_source

DEFAULT_SHARD_SIZE = 5 * 1000**3


def expert_specs(
    config: Qwen3MoeConfig, recipe: Recipe, dtype: torch.dtype, packing: str | None = None
) -> dict[str, QSpec]:
    """The spec of each expert projection; with `packing` (a CPU kernel layout, quant/int4.py),
    int4 projections that the layout can hold are in it instead of the stored layout."""
    shapes = expert_proj_shapes(config)
    specs = {proj: recipe.spec("experts", shapes[proj], dtype) for proj in EXPERT_PROJS}
    return {
        proj: dataclasses.replace(s, packing=packing)
        if s is not None and s.fmt == "int4" and cpu_packable(s.shape, packing)
        else s
        for proj, s in specs.items()
    }


def expert_layout(
    config: Qwen3MoeConfig, recipe: Recipe, dtype: torch.dtype = torch.bfloat16, packing: str | None = None
) -> PackLayout:
    return pack_layout(expert_specs(config, recipe, dtype, packing))


def quantized_shapes(
    config: Qwen3MoeConfig, recipe: Recipe, dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor of a quantized checkpoint: name -> (dtype, shape). 16-bit tensors keep `dtype`."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, shape in dense_tensor_shapes(config).items():
        cls = tensor_class(name)
        spec = recipe.spec(cls, shape, dtype) if cls else None
        if spec is None:
            out[name] = (dtype, tuple(shape))
        else:
            prefix = name.removesuffix(".weight")
            for part, dt, pshape in spec.parts():
                out[f"{prefix}.{part}"] = (dt, tuple(pshape))
    layout = expert_layout(config, recipe, dtype)
    for layer in config.moe_layers:
        for e in range(config.num_experts):
            out[expert_blob_name(layer, e)] = (torch.uint8, (layout.nbytes,))
    return out


@dataclass
class ClassStats:
    tensors: int = 0
    params: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    err_sq: float = 0.0  # sum of squared errors over the sampled tensors
    ref_sq: float = 0.0  # sum of squares of those tensors

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_out / self.params if self.params else 0.0

    @property
    def rel_error(self) -> float | None:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else None


@dataclass
class ConvertStats:
    classes: dict[str, ClassStats] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)  # tensors per storage format
    seconds: float = 0.0

    def add(
        self, cls: str, fmt: str, params: int, bytes_in: int, bytes_out: int, tensors: int = 1
    ) -> ClassStats:
        s = self.classes.setdefault(cls, ClassStats())
        s.tensors += tensors
        s.params += params
        s.bytes_in += bytes_in
        s.bytes_out += bytes_out
        self.formats[fmt] = self.formats.get(fmt, 0) + tensors
        return s

    @property
    def bytes_in(self) -> int:
        return sum(s.bytes_in for s in self.classes.values())

    @property
    def bytes_out(self) -> int:
        return sum(s.bytes_out for s in self.classes.values())

    @property
    def params(self) -> int:
        return sum(s.params for s in self.classes.values())

    def as_dict(self) -> dict:
        return {
            "seconds": round(self.seconds, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "bits_per_weight": 8 * self.bytes_out / self.params if self.params else 0.0,
            "tensors_per_format": self.formats,
            "classes": {
                k: {
                    "tensors": s.tensors,
                    "params": s.params,
                    "bytes_in": s.bytes_in,
                    "bytes_out": s.bytes_out,
                    "bits_per_weight": s.bits_per_weight,
                    "rel_weight_error": s.rel_error,
                }
                for k, s in self.classes.items()
            },
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _measure(stats: ClassStats, w: torch.Tensor, q) -> None:
    ref = w.float()
    stats.err_sq += float((dequantize(q, torch.float32) - ref).pow(2).sum())
    stats.ref_sq += float(ref.pow(2).sum())


def _quantized(ckpt, name: str, spec: QSpec, device: torch.device, measure: bool):
    """(QTensor in `spec`'s storage, the 16-bit weight or None). A source that stores `name`
    quantized already (a GPTQ checkpoint) hands it over repacked, with no float step, straight into
    spec.packing; the 16-bit weight is read only to quantize it or to `measure` the error."""
    q = ckpt.repacked(name, spec)
    w = ckpt.get(name) if q is None or measure else None
    if q is None:
        q = quantize(w.to(device), spec.fmt, spec.blocksize, spec.double_quant).to("cpu")
        if spec.packing != "plain":
            q = to_kernel_layout(q)
    assert q.packing == spec.packing, (name, q.packing, spec.packing)
    return q, w


def quantized_stream(
    ckpt: Checkpoint,
    recipe: Recipe,
    device: torch.device | None = None,
    stats: ConvertStats | None = None,
    progress: Callable[[int, int], None] | None = None,
    error_sample: int = 64,
    packing: str | None = None,
    blob_out: Callable[[int, int], torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the quantized checkpoint, read and quantized one source tensor at a time.

    Shards are read one after the other and released when done, so the source's mapped pages
    never add up to more than one shard. `device` is where quantization runs (the GPU when there
    is one); results come back on the CPU. Every `error_sample`-th expert (and every dense
    tensor) is dequantized to measure the error (0: none is). `packing`: the CPU kernel layout the
    int4 expert blobs are to come in (`expert_layout(..., packing)` describes them), for a loader
    whose experts the CPU computes or keeps; None for the stored layout of a checkpoint.
    `blob_out(layer, expert)`: where to pack that expert's blob (a row of the loader's store,
    on the CPU), which is then what the stream yields; None: a new tensor.
    """
    config = ckpt.config
    device = device or torch.device("cpu")
    stats = stats if stats is not None else ConvertStats()
    dense = dense_tensor_shapes(config)
    experts = {
        expert_tensor_name(layer, e, proj): (layer, e, proj)
        for layer in config.moe_layers
        for e in range(config.num_experts)
        for proj in EXPERT_PROJS
    }
    order = [n for n in ckpt.weight_map if n in dense or n in experts]
    by_shard: dict[str, list[str]] = {}
    for name in order:
        by_shard.setdefault(ckpt.weight_map[name], []).append(name)
    total = sum(ckpt.nbytes(n) for n in order)
    done = 0
    t0 = time.perf_counter()
    specs = None
    pending: dict[tuple[int, int], dict] = {}  # an expert's projections until all three are read
    for shard, names in sorted(by_shard.items()):
        for name in names:
            nbytes = ckpt.nbytes(name)
            done += nbytes
            if name in experts:
                layer, e, proj = experts[name]
                specs = specs or expert_specs(config, recipe, ckpt.dtype_of(name), packing)
                spec = specs[proj]
                if spec is None:
                    raise UserError(
                        "Experts must be quantized (4 or 8 bits) to be packed; use --expert-bits 4 or 8."
                    )
                measure = error_sample > 0 and e % error_sample == 0
                q, w = _quantized(ckpt, name, spec, device, measure)
                if measure:
                    _measure(stats.classes.setdefault("experts", ClassStats()), w, q)
                got = pending.setdefault((layer, e), {"bytes": 0})
                got[proj] = q
                got["bytes"] += nbytes
                if all(p in got for p in EXPERT_PROJS):
                    del pending[(layer, e)]
                    qs = {p: got[p] for p in EXPERT_PROJS}
                    blob, _ = pack(qs, out=blob_out(layer, e) if blob_out else None)
                    fmt = spec.fmt + ("+dq" if spec.double_quant else "")
                    stats.add(
                        "experts", fmt, sum(x.numel for x in qs.values()), got["bytes"], blob.numel(), 3
                    )
                    yield expert_blob_name(layer, e), blob
            else:
                cls = tensor_class(name)
                spec = recipe.spec(cls, ckpt.shape(name)) if cls else None
                if spec is None:
                    w = ckpt.get(name)
                    dt = str(w.dtype).removeprefix("torch.")
                    stats.add(cls or "16-bit", dt, w.numel(), _nbytes(w), _nbytes(w))
                    yield name, w
                else:
                    q, w = _quantized(ckpt, name, spec, device, measure=error_sample > 0)
                    fmt = spec.fmt + ("+dq" if spec.double_quant else "")
                    class_stats = stats.add(cls, fmt, q.numel, nbytes, q.nbytes)
                    if error_sample > 0:
                        _measure(class_stats, w, q)
                    yield from q.to_tensors(name.removesuffix(".weight")).items()
            if progress:
                progress(done, total)
        ckpt.release(shard)
    stats.seconds = time.perf_counter() - t0


def quantization_config(config: Qwen3MoeConfig, recipe: Recipe, dtype: torch.dtype) -> dict:
    qc = recipe.to_config()
    qc["expert_layout"] = expert_layout(config, recipe, dtype).to_dict()
    return qc


def quantize_checkpoint(
    src: str | Path | ModelSource,
    out: str | Path,
    recipe: Recipe,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_bytes: Callable[[int, int], None] | None = None,
) -> tuple[Path, ConvertStats]:
    """Quantize SRC (folder or hub id) into OUT; OUT appears only when everything is written."""
    if not recipe.quantizes_anything:
        raise UserError(
            "This recipe keeps every tensor 16-bit; pick a preset that quantizes (nf4, mixed, int8)."
        )
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it.")
    source = src if isinstance(src, ModelSource) else ModelSource.resolve(src, on_bytes=on_bytes)
    folder = source.folder
    if out.resolve() == folder.resolve():
        raise UserError("OUT must be a different folder from SRC.")
    ckpt = open_source(source)  # FP8 and GPTQ folders read as 16-bit sources
    try:
        if ckpt.config.quantization_config:
            raise UserError(
                f"{folder} is already quantized ({ckpt.config.quantization_config.get('preset')})."
            )
        ckpt.check({**dense_tensor_shapes(ckpt.config), **expert_tensor_shapes(ckpt.config)})
        config_json = dict(source.metadata["config.json"])
        return write_quantized(ckpt, out, recipe, folder, shard_size, force, device, progress, config_json)
    finally:
        ckpt.close()


def write_quantized(
    source,
    out: Path,
    recipe: Recipe,
    side_files_from: Path | None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    config_json: dict | None = None,
) -> tuple[Path, ConvertStats]:
    """Stream `source` (a Checkpoint, or anything with its reading methods) through the quantizer
    into the folder OUT, atomically."""
    src_dtype = source.get("model.norm.weight").dtype
    stats = ConvertStats()
    with atomic_folder(out, force=force) as tmp:
        with ShardWriter(tmp, shard_size) as writer:
            for name, tensor in quantized_stream(source, recipe, device, stats, progress):
                writer.add(name, tensor)
            writer.finish()
        config = (
            config_json
            if config_json is not None
            else json.loads((side_files_from / "config.json").read_text())
        )
        config["quantization_config"] = quantization_config(source.config, recipe, src_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        (tmp / "quant_stats.json").write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
    return out, stats
