"""Checkpoint reading: every bad input is one clear sentence (UserError), exit code 2 in the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwenlocal import UserError, load_model
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.weights.checkpoint import Checkpoint, atomic_folder, resolve_model

from .conftest import SMALL_VOCAB


@pytest.fixture
def ckpt_copy(small_ckpt, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(small_ckpt, dst)
    return dst


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_shard(ckpt_copy):
    victim = shards(ckpt_copy)[1]
    victim.unlink()
    with pytest.raises(UserError, match=f"Shard .*{victim.name} is missing"):
        Checkpoint(ckpt_copy)


def test_truncated_shard(ckpt_copy):
    victim = shards(ckpt_copy)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match=f"{victim.name} is truncated"):
        Checkpoint(ckpt_copy)


def test_corrupt_header(ckpt_copy):
    victim = shards(ckpt_copy)[0]
    data = bytearray(victim.read_bytes())
    data[8:20] = b"\xff" * 12
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{victim.name} is corrupt"):
        Checkpoint(ckpt_copy)


def test_tiny_file_is_truncated(ckpt_copy):
    victim = shards(ckpt_copy)[0]
    victim.write_bytes(b"abc")
    with pytest.raises(UserError, match="truncated"):
        Checkpoint(ckpt_copy)


def test_missing_tensor(ckpt_copy):
    index_path = ckpt_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.self_attn.k_norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight is missing"):
        load_model(ckpt_copy)


def test_index_points_to_wrong_shard(ckpt_copy):
    index_path = ckpt_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    names = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == names[0])
    index["weight_map"][name] = names[-1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"Tensor {name} is not in"):
        Checkpoint(ckpt_copy)


def test_shape_mismatch(ckpt_copy):
    config_path = ckpt_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["moe_intermediate_size"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"has shape \[32, 64\]; the config needs \[16, 64\]"):
        load_model(ckpt_copy)


def test_other_architecture(ckpt_copy):
    config_path = ckpt_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "llama"
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="type 'llama'; qwenlocal supports 'qwen3_moe'"):
        load_model(ckpt_copy)


def test_config_not_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_model(ckpt_copy)


def test_no_weights(tmp_path, small_ckpt):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copyfile(small_ckpt / "config.json", folder / "config.json")
    with pytest.raises(UserError, match="has no weights"):
        Checkpoint(folder)


def test_single_file_checkpoint(tmp_path, small_ckpt):
    from safetensors.torch import save_file

    src = Checkpoint(small_ckpt)
    folder = tmp_path / "single"
    folder.mkdir()
    shutil.copyfile(small_ckpt / "config.json", folder / "config.json")
    save_file({n: src.get(n) for n in src.weight_map}, str(folder / "model.safetensors"))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(load_model(folder)(ids), load_model(small_ckpt)(ids))


def test_context_past_maximum():
    config = Qwen3MoeConfig.builtin()
    assert config.with_context(32768).rope_scaling is None
    yarn = config.with_context(131072).rope_scaling
    assert yarn.factor == 4.0 and yarn.original_max_position_embeddings == 32768
    with pytest.raises(UserError, match="past what this model supports"):
        config.with_context(131073)
    with pytest.raises(UserError, match="must be positive"):
        config.with_context(0)


def test_config_spellings_agree():
    from qwenlocal.weights.random_checkpoint import config_dict

    old = Qwen3MoeConfig.from_dict(config_dict(SMALL_VOCAB, "4.x"))
    new = Qwen3MoeConfig.from_dict(config_dict(SMALL_VOCAB, "5.x"))
    assert old == new
    scaled = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert Qwen3MoeConfig.from_dict(config_dict(scaled, "4.x")) == Qwen3MoeConfig.from_dict(
        config_dict(scaled, "5.x")
    )


def test_builtin_config_is_qwen3_30b_a3b():
    c = Qwen3MoeConfig.builtin()
    assert (c.num_hidden_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok) == (48, 2048, 128, 8)
    assert c.num_params == 30_532_122_624  # llama.cpp's count


def test_atomic_folder_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("crash mid-way")
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_full_disk(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="disk is full"), atomic_folder(out):
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_refuses_existing(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists; pass --force"), atomic_folder(tmp_path / "out"):
        pass


def test_hub_id_from_local_cache(tmp_path, small_ckpt, monkeypatch):
    """A repo id already in the Hugging Face cache resolves without the network."""
    cache = tmp_path / "hub"
    snap = cache / "models--Qwen--Tiny" / "snapshots" / "0123456789abcdef"
    shutil.copytree(small_ckpt, snap)
    (cache / "models--Qwen--Tiny" / "refs").mkdir()
    (cache / "models--Qwen--Tiny" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model("Qwen/Tiny") == snap


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the local Hugging Face cache.*hf download Qwen/Nothing"):
        resolve_model("Qwen/Nothing")
