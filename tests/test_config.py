"""Tests for NemotronHConfig: reading config.json variants, validation messages and presets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from twotower.config import NemotronHConfig
from twotower.model import NemotronHForCausalLM

from tower_helpers import TINY, inference_on_one_thread, transformers_config  # noqa: F401 (autouse fixture)


def tiny_dict(**changes) -> dict:
    data = TINY.to_dict()
    data.update(changes)
    return data


# ---------------------------------------------------------------------- layer patterns


def test_pattern_string_sets_layer_types():
    config = NemotronHConfig.from_dict(tiny_dict(hybrid_override_pattern="M*E-"))
    assert config.num_hidden_layers == 4
    assert config.layer_types == ["M", "*", "E", "-"]
    assert config.layer_indices("M") == [0]
    assert config.layer_indices("E") == [2]


def test_layers_block_type_list_read():
    data = tiny_dict()
    del data["hybrid_override_pattern"]
    data["layers_block_type"] = ["mamba", "moe", "attention", "mlp", "linear_attention", "full_attention"]
    config = NemotronHConfig.from_dict(data)
    assert config.hybrid_override_pattern == "ME*-M*"


def test_pattern_string_wins_over_block_types():
    data = tiny_dict(hybrid_override_pattern="M*E")
    data["layers_block_type"] = ["mlp", "mlp"]
    assert NemotronHConfig.from_dict(data).hybrid_override_pattern == "M*E"


def test_transformers_config_json_read(tmp_path):
    # transformers 5 writes layers_block_type (no pattern) and {"__float__": "Infinity"}.
    transformers_config(TINY).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "hybrid_override_pattern" not in raw
    assert raw["time_step_limit"][1] == {"__float__": "Infinity"}

    config = NemotronHConfig.from_pretrained(tmp_path)
    assert config == TINY


# ---------------------------------------------------------------------- legacy keys and floats


def test_legacy_keys_renamed():
    data = {
        key: value
        for key, value in tiny_dict().items()
        if key not in ("n_groups", "conv_kernel", "chunk_size", "ssm_state_size", "mamba_head_dim",
                       "mamba_num_heads", "expand", "n_routed_experts", "time_step_limit", "use_conv_bias")
    }
    data.update(
        mamba_n_groups=4,
        mamba_d_conv=3,
        mamba_chunk_size=16,
        mamba_d_state=8,
        mamba_d_head=8,
        mamba_n_heads=12,
        mamba_expand=3,
        num_local_experts=16,
        mamba_dt_limit=[0.01, 50.0],
        mamba_conv_bias=False,
    )

    config = NemotronHConfig.from_dict(data)

    assert config.n_groups == 4
    assert config.conv_kernel == 3
    assert config.chunk_size == 16
    assert config.ssm_state_size == 8
    assert config.mamba_head_dim == 8
    assert config.mamba_num_heads == 12
    assert config.expand == 3
    assert config.n_routed_experts == 16
    assert config.time_step_limit == (0.01, 50.0)
    assert config.use_conv_bias is False
    assert "mamba_n_groups" not in config.extra


def test_current_key_wins_over_legacy_key():
    config = NemotronHConfig.from_dict(tiny_dict(n_groups=2, mamba_n_groups=4))
    assert config.n_groups == 2


def test_bare_infinity_in_json_file(tmp_path):
    text = json.dumps(tiny_dict(time_step_limit=[0.0, 1.0])).replace("1.0]", "Infinity]")
    assert "Infinity" in text
    (tmp_path / "config.json").write_text(text)
    config = NemotronHConfig.from_pretrained(tmp_path)
    assert config.time_step_limit == (0.0, math.inf)


@pytest.mark.parametrize("high", ["Infinity", "inf", {"__float__": "Infinity"}, 1e309])
def test_infinity_spellings_read(high):
    config = NemotronHConfig.from_dict(tiny_dict(time_step_limit=[0.0, high]))
    assert config.time_step_limit == (0.0, math.inf)


def test_finite_time_step_limit_read():
    config = NemotronHConfig.from_dict(tiny_dict(time_step_limit=[{"__float__": "0.001"}, "100"]))
    assert config.time_step_limit == (0.001, 100.0)


def test_eos_list_keeps_first_id():
    config = NemotronHConfig.from_dict(tiny_dict(eos_token_id=[2, 11]))
    assert config.eos_token_id == 2
    assert config.extra["extra_eos_token_ids"] == [11]


def test_unknown_keys_survive_save(tmp_path):
    config = NemotronHConfig.from_dict(tiny_dict(rope_theta=123.0))
    assert config.extra["rope_theta"] == 123.0
    config.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == 123.0


def test_save_load_round_trip(tmp_path):
    config = TINY.replace(time_step_limit=(0.0, math.inf), moe_latent_size=24)
    config.save(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "Infinity" in text
    assert NemotronHConfig.from_pretrained(tmp_path) == config


def test_invalid_json_file_raises(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        NemotronHConfig.from_pretrained(tmp_path)


def test_missing_config_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        NemotronHConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- validation

# (overrides, field name, value as the message shows it, words of the rule)
INVALID_CASES = [
    ({"hidden_size": 0}, "hidden_size", "0", "positive integer"),
    ({"vocab_size": -5}, "vocab_size", "-5", "positive integer"),
    ({"chunk_size": 2.5}, "chunk_size", "2.5", "positive integer"),
    ({"num_attention_heads": True}, "num_attention_heads", "True", "positive integer"),
    ({"hybrid_override_pattern": ""}, "hybrid_override_pattern", "''", "non-empty string"),
    ({"hybrid_override_pattern": "M*X"}, "hybrid_override_pattern", "'M*X'", "['X']"),
    ({"num_key_value_heads": 3}, "num_key_value_heads", "3", "must divide num_attention_heads=4"),
    ({"n_groups": 3}, "n_groups", "3", "must divide mamba_num_heads=8"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok", "9", "at most n_routed_experts=8"),
    ({"n_group": 3}, "n_group", "3", "must divide n_routed_experts=8"),
    ({"topk_group": 3}, "topk_group", "3", "at most n_group=2"),
    ({"n_group": 8, "topk_group": 1}, "n_group", "8", ">= 2 experts"),
    ({"n_group": 4, "topk_group": 1}, "num_experts_per_tok", "3", "topk_group groups"),
    ({"moe_latent_size": 0}, "moe_latent_size", "0", "positive integer or null"),
    ({"moe_shared_expert_intermediate_size": -1}, "moe_shared_expert_intermediate_size", "-1", ">= 0"),
    ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon", "0.0", "positive number"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon", "'1e-5'", "positive number"),
    ({"routed_scaling_factor": -2.5}, "routed_scaling_factor", "-2.5", "positive number"),
    ({"time_step_limit": (0.5, 0.1)}, "time_step_limit", "(0.5, 0.1)", "0 <= low <= high"),
    ({"time_step_limit": (-1.0, 1.0)}, "time_step_limit", "(-1.0, 1.0)", "0 <= low <= high"),
    ({"time_step_limit": (0.5,)}, "time_step_limit", "(0.5,)", "[low, high]"),
    ({"eos_token_id": 256}, "eos_token_id", "256", "[0, vocab_size=256)"),
    ({"pad_token_id": -1}, "pad_token_id", "-1", "[0, vocab_size=256)"),
]


@pytest.mark.parametrize(("overrides", "name", "shown", "rule"), INVALID_CASES)
def test_invalid_value_message(overrides, name, shown, rule):
    with pytest.raises(ValueError) as info:
        NemotronHConfig.tiny(**overrides)
    message = str(info.value)
    assert f"NemotronHConfig.{name}={shown} is invalid" in message
    assert rule in message


def test_invalid_value_from_dict_raises():
    with pytest.raises(ValueError, match=r"NemotronHConfig\.n_groups=3 is invalid"):
        NemotronHConfig.from_dict(tiny_dict(n_groups=3))


def test_unknown_block_type_raises():
    data = tiny_dict()
    del data["hybrid_override_pattern"]
    data["layers_block_type"] = ["mamba", "conv"]
    with pytest.raises(ValueError) as info:
        NemotronHConfig.from_dict(data)
    assert "layers_block_type" in str(info.value)
    assert "'conv'" in str(info.value)
    assert "allowed values" in str(info.value)


def test_block_type_string_raises():
    data = tiny_dict()
    del data["hybrid_override_pattern"]
    data["layers_block_type"] = "mamba"
    with pytest.raises(ValueError, match="layers_block_type='mamba' is invalid: expected a list"):
        NemotronHConfig.from_dict(data)


def test_unreadable_time_step_limit_raises():
    with pytest.raises(ValueError) as info:
        NemotronHConfig.from_dict(tiny_dict(time_step_limit=[0.0, "lots"]))
    assert "time_step_limit" in str(info.value)
    assert "'lots'" in str(info.value)
    assert "expected a number or 'Infinity'" in str(info.value)


# ---------------------------------------------------------------------- presets


def test_tiny_preset_covers_all_layer_types():
    config = NemotronHConfig.tiny()
    assert set(config.layer_types) == {"M", "*", "E", "-"}
    assert config.n_group > 1


def test_30b_preset_sizes():
    # Published descriptions of NVIDIA-Nemotron-3-Nano-30B-A3B give 52 layers (23 Mamba-2, 23 MoE,
    # 6 attention), hidden size 2688, 32 query and 2 key-value heads, and 128 routed experts plus one
    # shared expert with 6 active. The other sizes are this library's defaults for the preset.
    config = NemotronHConfig.nemotron_30b_a3b()
    assert config.num_hidden_layers == 52
    assert len(config.layer_indices("M")) == 23
    assert len(config.layer_indices("E")) == 23
    assert len(config.layer_indices("*")) == 6
    assert config.layer_indices("-") == []
    assert config.hidden_size == 2688
    assert config.vocab_size == 131072
    assert config.num_attention_heads == 32
    assert config.num_key_value_heads == 2
    assert config.head_dim == 128
    assert config.mamba_num_heads == 64
    assert config.mamba_head_dim == 64
    assert config.ssm_state_size == 128
    assert config.n_groups == 8
    assert config.n_routed_experts == 128
    assert config.num_experts_per_tok == 6
    assert config.moe_intermediate_size == 1856
    assert config.moe_shared_expert_intermediate_size == 3712
    assert config.routed_scaling_factor == 2.5


def test_30b_preset_parameter_count():
    # Published descriptions of the release give 31.6B parameters in total. Building one block per
    # layer type on the meta device and multiplying is much faster than building all 52 layers.
    config = NemotronHConfig.nemotron_30b_a3b()
    with torch.device("meta"):
        model = NemotronHForCausalLM(config.replace(hybrid_override_pattern="ME*"))
    per_layer = {block.block_type: sum(p.numel() for p in block.parameters()) for block in model.backbone.layers}
    outside_layers = sum(p.numel() for name, p in model.named_parameters() if ".layers." not in name)
    total = outside_layers + sum(per_layer[symbol] for symbol in config.hybrid_override_pattern)
    assert 31.55e9 < total < 31.65e9


@pytest.mark.parametrize("raw", [None, 5, [1, 2], [["hidden_size", 64]]])
def test_from_dict_rejects_non_objects(raw):
    with pytest.raises(ValueError, match="JSON object"):
        NemotronHConfig.from_dict(raw)


def test_from_dict_warns_on_layer_count_mismatch(caplog):
    raw = {**NemotronHConfig.tiny().to_dict(), "hybrid_override_pattern": "M*E", "num_hidden_layers": 9}
    with caplog.at_level("WARNING", logger="twotower.config"):
        config = NemotronHConfig.from_dict(raw)
    assert config.num_hidden_layers == 3
    assert "num_hidden_layers=9" in caplog.text


@pytest.mark.parametrize("field", ["tie_word_embeddings", "norm_topk_prob", "use_conv_bias"])
def test_boolean_fields_reject_strings(field):
    raw = {**NemotronHConfig.tiny().to_dict(), field: "no"}
    with pytest.raises(ValueError, match=field):
        NemotronHConfig.from_dict(raw)
