"""Model folders: finding them (local path or Hugging Face hub id), checking them, reading
tensors lazily from the safetensors memory map, and writing folders atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from qwenlocal.errors import UserError
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.model.names import EXPERT_PROJS, expert_tensor_name

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files a model folder carries besides weights (copied by the quantizer, read by the tokenizer).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "LICENSE",
)
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


# -- what a checkpoint must contain ------------------------------------------------------------
def dense_tensor_shapes(config: Qwen3MoeConfig) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor of a Qwen3-MoE checkpoint, HF name -> shape."""
    h, d = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "self_attn.q_proj.weight"] = (config.num_attention_heads * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (config.num_key_value_heads * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (config.num_key_value_heads * d, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, config.num_attention_heads * d)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (config.num_attention_heads * d,)
            shapes[p + "self_attn.k_proj.bias"] = (config.num_key_value_heads * d,)
            shapes[p + "self_attn.v_proj.bias"] = (config.num_key_value_heads * d,)
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "self_attn.q_norm.weight"] = (d,)
        shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if config.is_moe_layer(layer):
            shapes[p + "mlp.gate.weight"] = (config.num_experts, h)
        else:
            i = config.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def expert_proj_shapes(config: Qwen3MoeConfig) -> dict[str, tuple[int, int]]:
    """One expert's projections, HF layout [out, in]."""
    h, i = config.hidden_size, config.moe_intermediate_size
    return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def expert_tensor_shapes(config: Qwen3MoeConfig) -> dict[str, tuple[int, ...]]:
    proj_shape = expert_proj_shapes(config)
    return {
        expert_tensor_name(layer, e, proj): proj_shape[proj]
        for layer in config.moe_layers
        for e in range(config.num_experts)
        for proj in EXPERT_PROJS
    }


def checkpoint_shapes(config: Qwen3MoeConfig) -> dict[str, tuple[int, ...]]:
    return {**dense_tensor_shapes(config), **expert_tensor_shapes(config)}


# -- finding a model ------------------------------------------------------------------------
def looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not s.startswith((".", "/", "~"))
        and not any(c in s for c in "\\: ")
    )


def resolve_model(model: str | Path, on_bytes: ProgressFn | None = None) -> Path:
    """A local folder as it is, or a hub id: the local Hugging Face cache first, then a download."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{path} is a file; give a model folder or a Hugging Face repo id.")
    if not looks_like_repo_id(str(model)):
        raise UserError(f"Model folder {path} does not exist.")
    return Path(_hub_snapshot(str(model), on_bytes))


def _hub_snapshot(repo_id: str, on_bytes: ProgressFn | None) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a runtime dependency
        raise UserError(
            "huggingface_hub is needed to download models: pip install huggingface_hub."
        ) from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "LICENSE"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    how = (
        f"download it on a connected machine with `hf download {repo_id}` "
        "(it lands in the Hugging Face cache), or pass a local folder"
    )
    if offline:
        raise UserError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {how}.")
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, tqdm_class=_byte_forwarder(on_bytes))
    except Exception as e:  # network errors, unknown repo, gated repo: one sentence for all
        raise UserError(f"Could not download {repo_id} ({type(e).__name__}: {e}); {how}.") from None


def _byte_forwarder(on_bytes: ProgressFn | None):
    """A tqdm class for huggingface_hub that prints nothing and forwards byte counts."""
    from tqdm.auto import tqdm

    totals = {"done": 0, "total": 0}

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
            super().__init__(*args, **kwargs)
            self._bytes = self.unit == "B"
            if self._bytes and self.total:
                totals["total"] += int(self.total)

        def update(self, n=1):
            if self._bytes and on_bytes is not None and n:
                totals["done"] += int(n)
                on_bytes(totals["done"], max(totals["total"], totals["done"]))
            return super().update(n)

        def close(self):
            f = self.fp
            super().close()
            with contextlib.suppress(Exception):
                f.close()

    return Forward


# -- reading ---------------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse a shard's header and check the file holds every byte it announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{path} is truncated: it is too short to be a safetensors file.")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size, 100_000_000):
                raise UserError(f"{path} is corrupt: its header length ({n} bytes) is impossible.")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt: its safetensors header is not valid JSON.") from None
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror}.") from None
    header.pop("__metadata__", None)
    data_end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if size < 8 + n + data_end:
        raise UserError(
            f"{path} is truncated: {size:,} bytes on disk, its header announces {8 + n + data_end:,}."
        )
    return header


class Checkpoint:
    """A checked model folder: config, where each tensor lives, and lazy reads from the mmap."""

    def __init__(self, folder: str | Path, config: Qwen3MoeConfig | None = None):
        """`config`: the folder's config.json, when it was read already (sources.ModelSource)."""
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"Model folder {self.folder} does not exist.")
        self.config = config or Qwen3MoeConfig.from_file(self.folder / "config.json")
        self.weight_map = self._weight_map()
        self.headers: dict[str, dict[str, dict]] = {}
        for shard in sorted(set(self.weight_map.values())):
            path = self.folder / shard
            if not path.is_file():
                raise UserError(f"Shard {path} is missing (the index lists it).")
            self.headers[shard] = read_safetensors_header(path)
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard]:
                raise UserError(f"Tensor {name} is not in {self.folder / shard}, where the index says it is.")
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index} is not a valid safetensors index (no weight_map).") from None
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return dict.fromkeys(read_safetensors_header(single), SINGLE_NAME)
        raise UserError(f"{self.folder} has no weights: neither {SINGLE_NAME} nor {INDEX_NAME}.")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> dict:
        return self.headers[self.weight_map[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info(name)["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.info(name)["data_offsets"]
        return end - start

    def dtype_of(self, name: str) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.info(name)["dtype"])

    def repacked(self, name: str, spec) -> object | None:
        """`name` in the storage of `spec` (a quant QSpec) when this checkpoint holds it quantized
        already and can move it there without a float step (GPTQ into int4); None otherwise."""
        return None

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor present with its shape, before anything is loaded."""
        for name, shape in expected.items():
            if name not in self.weight_map:
                raise UserError(f"Tensor {name} is missing from the checkpoint in {self.folder}.")
            if self.shape(name) != tuple(shape):
                raise UserError(
                    f"Tensor {name} in {self.folder / self.weight_map[name]} has shape "
                    f"{list(self.shape(name))}; the config needs {list(shape)}."
                )

    def get(self, name: str) -> torch.Tensor:
        """One tensor from the memory map (the pages are the file's, not a second copy)."""
        shard = self.weight_map[name]
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(self.folder / shard), framework="pt")
            except Exception as e:
                raise UserError(f"{self.folder / shard} cannot be opened as safetensors: {e}.") from None
            self._handles[shard] = handle
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise UserError(f"Tensor {name} in {self.folder / shard} cannot be read: {e}.") from None

    def release(self, shard: str) -> None:
        """Drop a shard's memory map (its pages stop counting toward this process's RSS)."""
        self._handles.pop(shard, None)

    def close(self) -> None:
        self._handles.clear()


# A dequantizing reader (sources.py: FP8; gptq.py: GPTQ) is defined here, below both, so that
# neither imports the other.
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DequantizingCheckpoint(Checkpoint):
    """A checkpoint whose quantized tensors are dequantized as they are read. It reads like a 16-bit
    checkpoint of `dtype`: `config` carries no quantization_config (the source's is in
    `source_quantization`), and every floating tensor comes back in `dtype`."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype | None):
        # the read-only headers shared; its own name map (a reader adds names) and memory maps
        self.folder, self.headers = ckpt.folder, ckpt.headers
        self.weight_map = dict(ckpt.weight_map)
        self._handles = {}
        self.source_quantization = dict(ckpt.config.quantization_config)
        declared = TORCH_DTYPES.get(ckpt.config.torch_dtype, torch.bfloat16)
        self.dtype = dtype or declared
        self.config = dataclasses.replace(
            ckpt.config, quantization_config=None, torch_dtype=_name(self.dtype)
        )

    def dtype_of(self, name: str) -> torch.dtype | None:
        return self.dtype

    def raw(self, name: str) -> torch.Tensor:
        """A tensor as stored, not dequantized."""
        return super().get(name)

    def get(self, name: str) -> torch.Tensor:
        t = self.dequantized(name)
        return t.to(self.dtype) if t.is_floating_point() else t

    def dequantized(self, name: str) -> torch.Tensor:
        raise NotImplementedError


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- writing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_folder(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.
    Ctrl-C, an exception or a full disk leave no half-written `out` behind."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == 28:  # ENOSPC
            raise UserError(f"The disk is full while writing {out}; nothing was left behind.") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file() and name != "config.json":
            shutil.copyfile(src / name, dst / name)


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardWriter:
    """Streams tensors into safetensors shards of at most `shard_size` bytes plus an index.

    A full shard is written by a background thread while the next one fills (the quantizer's loop
    uses one core, so the other writes): at most two shards' worth of tensors are held in RAM.
    Use it as a context manager, so a failure waits for the write in flight before the caller
    removes the folder."""

    def __init__(self, folder: Path, shard_size: int, metadata: dict[str, str] | None = None):
        self.folder, self.shard_size = Path(folder), shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._pool: ThreadPoolExecutor | None = None
        self._writing: Future | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._wait()
        except Exception:
            if exc_type is None:
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_size:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _wait(self) -> None:
        """Wait for the shard being written; its error (a full disk, say) is raised here."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        self._wait()
        path = self.folder / f"part-{len(self.parts):05d}.safetensors"
        tensors, self.pending, self.pending_bytes = self.pending, {}, 0
        self.parts.append((path, list(tensors)))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._writing = self._pool.submit(save_file, tensors, str(path), metadata=self.metadata)

    def finish(self) -> list[str]:
        """Name the shards as Hugging Face does and write the index; returns the shard names."""
        if self.pending or not self.parts:
            self._flush()
        self._wait()
        names = shard_names(len(self.parts))
        weight_map = {}
        for (path, tensors), name in zip(self.parts, names, strict=True):
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names
