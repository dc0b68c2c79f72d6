"""Tests for checkpoint I/O: bit-exact round trips, sharding, the two-tower layout and bad checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twotower.checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointError, save_state_dict
from twotower.model import NemotronHForCausalLM

from tower_helpers import (  # noqa: F401 (inference_on_one_thread is an autouse fixture)
    LATENT,
    TINY,
    build_model,
    inference_on_one_thread,
    random_ids,
    routers,
    save_transformers_checkpoint,
)

# The tiny model has about 110k fp32 parameters (~440 kB), so 60 kB shards give several files.
SMALL_SHARD = "60KB"


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, seed=0)


def assert_same_model(loaded: NemotronHForCausalLM, original: NemotronHForCausalLM) -> None:
    """State dicts bit-identical (names, dtypes, values) and logits identical."""
    expected = original.state_dict()
    actual = loaded.state_dict()
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name
    ids = random_ids(2, 19, seed=1)
    assert torch.equal(loaded(ids), original(ids))


def write_checkpoint(directory: Path, state_dict: dict, config=TINY, max_shard_size="2GB") -> Path:
    config.save(directory)
    save_state_dict(state_dict, directory, max_shard_size=max_shard_size)
    return directory


def load_error(directory: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        NemotronHForCausalLM.from_pretrained(directory)
    return str(info.value)


# ---------------------------------------------------------------------- round trips


def test_single_file_round_trip_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SINGLE_NAME]
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_model(loaded, model)


def test_sharded_round_trip_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert not list(tmp_path.glob("*.tmp"))

    assert_same_model(NemotronHForCausalLM.from_pretrained(tmp_path), model)


def test_shards_respect_max_size(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    for shard in tmp_path.glob("*.safetensors"):
        tensors = load_file(shard)
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        # A shard may exceed the limit only when it contains a single tensor larger than the limit.
        assert payload <= 60_000 or len(tensors) == 1, shard.name


def test_resave_single_file_removes_old_shards(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SINGLE_NAME]
    assert_same_model(NemotronHForCausalLM.from_pretrained(tmp_path), model)


def test_latent_moe_round_trip(tmp_path):
    original = build_model(LATENT, seed=2)
    original.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    assert_same_model(NemotronHForCausalLM.from_pretrained(tmp_path), original)


def test_bf16_round_trip_keeps_dtypes(model, tmp_path):
    bf16 = build_model(TINY, seed=0).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path)  # dtype read from the checkpoint
    assert loaded.dtype == torch.bfloat16
    assert_same_model(loaded, bf16)
    for router in routers(loaded):
        assert router.e_score_correction_bias.dtype == torch.float32


def test_dtype_string_accepted(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert NemotronHForCausalLM.from_pretrained(tmp_path, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='float8' is invalid"):
        NemotronHForCausalLM.from_pretrained(tmp_path, dtype="float8")


# ---------------------------------------------------------------------- other layouts


def two_tower_state_dict(model: NemotronHForCausalLM) -> dict:
    """The model's weights as the context tower of a two-tower checkpoint, plus denoiser tensors."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("backbone."):
            state["context_tower." + name[len("backbone."):]] = tensor
            # A denoiser copy with different values: loading it by mistake changes the logits.
            state["denoiser_tower." + name[len("backbone."):]] = tensor + 1.0
        elif name == "lm_head.weight":
            state["context_lm_head.weight"] = tensor
            state["denoiser_lm_head.weight"] = tensor * 2.0
        else:
            raise AssertionError(f"unexpected model key {name}")
    state["denoiser_tower.time_embedding.linear.weight"] = torch.randn(16, 64)
    return state


@pytest.mark.parametrize("max_shard_size", ["2GB", SMALL_SHARD])
def test_context_tower_of_two_tower_checkpoint(model, tmp_path, max_shard_size):
    write_checkpoint(tmp_path, two_tower_state_dict(model), max_shard_size=max_shard_size)
    assert_same_model(NemotronHForCausalLM.from_pretrained(tmp_path), model)


def test_mtp_keys_ignored(model, tmp_path):
    state = dict(model.state_dict())
    state["mtp.layers.0.mixer.q_proj.weight"] = torch.randn(64, 64)
    state["mtp.layers.0.norm.weight"] = torch.ones(64)
    write_checkpoint(tmp_path, state)
    assert_same_model(NemotronHForCausalLM.from_pretrained(tmp_path), model)


def test_transformers_layout_loads(tmp_path):
    # transformers' save_pretrained writes its own config.json (layers_block_type, no pattern).
    save_transformers_checkpoint(TINY, tmp_path, seed=4)
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path)
    stored = load_file(tmp_path / SINGLE_NAME)
    assert sorted(stored) == sorted(loaded.state_dict())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


# ---------------------------------------------------------------------- bad checkpoints


def test_missing_keys_listed(model, tmp_path):
    state = dict(model.state_dict())
    del state["backbone.layers.2.mixer.q_proj.weight"]
    del state["backbone.norm_f.weight"]
    message = load_error(write_checkpoint(tmp_path, state))
    assert "missing keys (2)" in message
    assert "backbone.layers.2.mixer.q_proj.weight" in message
    assert "backbone.norm_f.weight" in message
    assert "unexpected" not in message


def test_unexpected_keys_listed(model, tmp_path):
    state = dict(model.state_dict())
    state["backbone.layers.0.mixer.extra_proj.weight"] = torch.zeros(4)
    state["classifier.weight"] = torch.zeros(4)
    message = load_error(write_checkpoint(tmp_path, state))
    assert "unexpected keys (2)" in message
    assert "backbone.layers.0.mixer.extra_proj.weight" in message
    assert "classifier.weight" in message
    assert "missing" not in message


def test_shape_mismatch_names_key_and_shapes(model, tmp_path):
    state = dict(model.state_dict())
    state["backbone.layers.3.mixer.up_proj.weight"] = torch.zeros(95, 64)
    message = load_error(write_checkpoint(tmp_path, state))
    assert "mismatched shapes (1)" in message
    assert "backbone.layers.3.mixer.up_proj.weight: the model expects (96, 64), the checkpoint has (95, 64)" in message


def test_config_mismatch_reports_shapes(model, tmp_path):
    # Weights of the tiny model under a config with a wider MLP: every affected key has the wrong shape.
    write_checkpoint(tmp_path, model.state_dict(), config=TINY.replace(intermediate_size=128))
    message = load_error(tmp_path)
    assert "mismatched shapes (2)" in message
    assert "backbone.layers.3.mixer.up_proj.weight: the model expects (128, 64), the checkpoint has (96, 64)" in message
    assert "backbone.layers.3.mixer.down_proj.weight: the model expects (64, 128), the checkpoint has (64, 96)" in message


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(int(size * keep_fraction))


def test_truncated_single_file(model, tmp_path):
    model.save_pretrained(tmp_path)
    truncate(tmp_path / SINGLE_NAME)
    message = load_error(tmp_path)
    assert SINGLE_NAME in message
    assert "truncated" in message


def test_truncated_shard(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    truncate(shard)
    message = load_error(tmp_path)
    assert shard.name in message
    assert "truncated" in message


def test_shard_cut_inside_header(model, tmp_path):
    model.save_pretrained(tmp_path)
    truncate(tmp_path / SINGLE_NAME, keep_fraction=0.001)
    message = load_error(tmp_path)
    assert SINGLE_NAME in message


def test_index_names_missing_shard(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    os.remove(shard)
    message = load_error(tmp_path)
    assert f"shard {shard.name} listed in" in message
    assert INDEX_NAME in message
    assert "is missing" in message


def test_index_without_weight_map(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    message = load_error(tmp_path)
    assert "weight_map" in message


def test_missing_config_json(model, tmp_path):
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    message = load_error(tmp_path)
    assert "no config.json" in message
    assert str(tmp_path) in message


def test_directory_without_weights(tmp_path):
    TINY.save(tmp_path)
    message = load_error(tmp_path)
    assert "no safetensors weights" in message
    assert str(tmp_path) in message


def test_missing_directory(tmp_path):
    message = load_error(tmp_path / "absent")
    assert "absent" in message


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)
