"""Tests for loading a two-tower checkpoint through transformers with ``trust_remote_code=True``.

Each checkpoint is written by ``TwoTowerForCausalLM.save_pretrained`` and read back twice: by
``AutoModelForCausalLM`` (the remote code) and by ``TwoTowerForCausalLM.from_pretrained``. Both must
hold identical tensors and produce identical logits and tokens in every generation mode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

from twotower import NemotronHConfig, TwoTowerForCausalLM  # noqa: E402
from twotower.hf_remote import CONFIG_FILE, MODEL_TYPE, MODELING_FILE, install_remote_code  # noqa: E402
from twotower.hf_remote.configuration_twotower import TwoTowerNemotronHConfig  # noqa: E402

# initializer_range=0.1 spreads the logits of a random tiny model so greedy decoding picks varied tokens.
CONFIGS = {
    "tiny": NemotronHConfig.tiny(initializer_range=0.1),
    "latent": NemotronHConfig.tiny(initializer_range=0.1, n_group=4, topk_group=2, moe_latent_size=24),
}
DIFFUSION_ARGS = dict(max_new_tokens=20, block_size=8, steps_per_block=8, mask_token_id=3, eos_token_id=2)


@pytest.fixture(autouse=True)
def no_grad():
    # Enter no_grad per test: setting it globally would leak into the tests of other modules.
    with torch.no_grad():
        yield


def build_two_tower(config: NemotronHConfig, seed: int = 0) -> TwoTowerForCausalLM:
    """A seeded random model with nonzero router correction biases (initialisation zeroes them)."""
    model = TwoTowerForCausalLM.from_config(config, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 1000)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return model


def prompt_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts of 9 and 6 tokens, ids above the special tokens 0-3."""
    ids = torch.randint(4, vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(directory, config name) of a sharded fp32 checkpoint saved by twotower."""
    directory = tmp_path_factory.mktemp(f"twotower_{request.param}")
    build_two_tower(CONFIGS[request.param], seed=3).save_pretrained(directory, max_shard_size="200KB")
    return directory, request.param


@pytest.fixture(scope="module")
def model_pair(checkpoint):
    """(model loaded by transformers, model loaded by twotower) from the same checkpoint."""
    directory, _ = checkpoint
    remote = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    ours = TwoTowerForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return remote.eval(), ours


# ---------------------------------------------------------------------- files and config


def test_install_copies_files(tmp_path):
    entries = install_remote_code(tmp_path / "new")
    assert (tmp_path / "new" / CONFIG_FILE).is_file()
    assert (tmp_path / "new" / MODELING_FILE).is_file()
    assert entries["model_type"] == MODEL_TYPE
    assert entries["auto_map"]["AutoConfig"] == "configuration_twotower.TwoTowerNemotronHConfig"
    assert entries["auto_map"]["AutoModelForCausalLM"] == "modeling_twotower.TwoTowerNemotronHForCausalLM"


def test_saved_config_routes_auto_classes(checkpoint):
    directory, _ = checkpoint
    saved = json.loads((directory / "config.json").read_text())
    assert saved["model_type"] == MODEL_TYPE
    assert saved["auto_map"] == install_remote_code(directory)["auto_map"]
    assert saved["two_tower"] is True


def test_config_defaults_match_twotower():
    # The remote config must stay in step with NemotronHConfig, field by field.
    remote = TwoTowerNemotronHConfig()
    for field in dataclasses.fields(NemotronHConfig):
        if field.name == "extra":
            continue
        expected = getattr(NemotronHConfig(), field.name)
        actual = getattr(remote, field.name)
        if field.name == "time_step_limit":
            actual = tuple(actual)
        assert actual == expected, f"{field.name}: remote default {actual!r}, twotower default {expected!r}"
    assert remote.num_hidden_layers == NemotronHConfig().num_hidden_layers


def test_auto_config_round_trip(checkpoint):
    directory, name = checkpoint
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    assert config.model_type == MODEL_TYPE
    assert config.num_hidden_layers == len(CONFIGS[name].hybrid_override_pattern)
    assert config.time_step_limit[1] == float("inf")
    from twotower.hf_remote.modeling_twotower import native_config

    assert native_config(config) == CONFIGS[name]


# ---------------------------------------------------------------------- weights and logits


def test_weights_identical_fp32(model_pair):
    remote, ours = model_pair
    remote_state, our_state = remote.state_dict(), ours.state_dict()
    assert remote_state.keys() == our_state.keys()
    for name, tensor in our_state.items():
        assert remote_state[name].dtype == tensor.dtype, name
        assert torch.equal(remote_state[name], tensor), name


def test_auto_model_loads_same_class(checkpoint):
    directory, _ = checkpoint
    model = AutoModel.from_pretrained(directory, trust_remote_code=True)
    assert type(model).__name__ == "TwoTowerNemotronHForCausalLM"


def test_expert_tensors_not_merged(model_pair):
    remote, _ = model_pair
    names = set(remote.state_dict())
    assert "context_tower.layers.1.mixer.experts.0.up_proj.weight" in names
    assert "denoiser_tower.layers.6.mixer.experts.7.down_proj.weight" in names


def test_weights_identical_bf16(checkpoint):
    directory, _ = checkpoint
    remote = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.bfloat16)
    ours = TwoTowerForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    remote_state = remote.state_dict()
    for name, tensor in ours.state_dict().items():
        assert remote_state[name].dtype == tensor.dtype, name
        assert torch.equal(remote_state[name], tensor), name
    bias = remote.context_tower.layers[1].mixer.gate.e_score_correction_bias
    assert bias.dtype == torch.float32


def test_default_dtype_follows_checkpoint(tmp_path):
    build_two_tower(CONFIGS["tiny"]).to(torch.bfloat16).save_pretrained(tmp_path)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert remote.dtype == torch.bfloat16


def test_forward_logits_match_context_tower(model_pair):
    remote, ours = model_pair
    ids, mask = prompt_batch(ours.config.vocab_size)
    logits = remote(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    assert torch.equal(logits, ours.context_lm(ids, attention_mask=mask))


def test_denoiser_logits_match(model_pair):
    remote, ours = model_pair
    ids, _ = prompt_batch(ours.config.vocab_size)
    block = torch.full((2, 8), 3, dtype=torch.long)
    results = []
    for model in (remote.two_tower, ours):
        cache = model.new_cache(2)
        model.extend_context(ids, cache)
        results.append(model.denoise(block, cache, torch.tensor([1.0, 0.5])))
    assert torch.equal(results[0], results[1])


# ---------------------------------------------------------------------- generation


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_mask_diffusion_greedy_tokens(model_pair, threshold):
    remote, ours = model_pair
    ids, mask = prompt_batch(ours.config.vocab_size)
    kwargs = dict(DIFFUSION_ARGS, temperature=0.0, confidence_threshold=threshold, attention_mask=mask)
    remote.place_towers_on_devices("cpu", "cpu")
    expected = ours.generate_mask_diffusion(ids, **kwargs)
    actual = remote.generate_mask_diffusion(ids, **kwargs)
    assert actual.shape == (2, 9 + 20)
    assert torch.equal(actual, expected)


def test_mask_diffusion_sampled_tokens(model_pair):
    remote, ours = model_pair
    ids, mask = prompt_batch(ours.config.vocab_size)
    kwargs = dict(DIFFUSION_ARGS, temperature=0.7, confidence_threshold=0.8, attention_mask=mask, seed=11)
    assert torch.equal(remote.generate_mask_diffusion(ids, **kwargs), ours.generate_mask_diffusion(ids, **kwargs))


def test_mock_ar_greedy_tokens(model_pair):
    remote, ours = model_pair
    ids, mask = prompt_batch(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=12, temperature=0.0, eos_token_id=2, attention_mask=mask)
    actual = remote.generate_mock_ar(ids, **kwargs)
    assert actual.shape == (2, 9 + 12)
    assert torch.equal(actual, ours.generate_mock_ar(ids, **kwargs))


def test_ar_generate_tokenizer_inputs(model_pair):
    remote, ours = model_pair
    ids, mask = prompt_batch(ours.config.vocab_size)
    # A tokenizer's output may carry token_type_ids, which the model ignores.
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    actual = remote.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert actual.shape == (2, 9 + 12)
    assert torch.equal(actual, ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))


def test_stats_returned_in_dict(model_pair):
    remote, _ = model_pair
    ids, _ = prompt_batch(remote.config.vocab_size)
    output = remote.generate_mask_diffusion(ids, **DIFFUSION_ARGS, return_dict_in_generate=True)
    assert output.stats.denoiser_passes >= 3
    assert output.sequences.shape[0] == 2


# ---------------------------------------------------------------------- saving, fresh models, errors


def test_transformers_save_reloads_in_twotower(model_pair, tmp_path):
    remote, ours = model_pair
    remote.save_pretrained(tmp_path)
    assert (tmp_path / MODELING_FILE).is_file()
    reloaded = TwoTowerForCausalLM.from_pretrained(tmp_path)
    expected = ours.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert torch.equal(again.lm_head.weight, ours.lm_head.weight)


def test_from_config_initialises_weights(checkpoint):
    directory, _ = checkpoint
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu", name
        assert torch.isfinite(tensor.float()).all(), name
    norm = model.context_tower.layers[0].norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    assert model.denoiser_tower.layers[0].mixer.A_log[1].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert model.scale_shift_tables[0].abs().sum() > 0


def test_missing_package_raises_import_error(checkpoint):
    directory, _ = checkpoint
    # The child process hides the twotower package; transformers itself stays importable.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["twotower"] = None
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(directory)!r}, trust_remote_code=True)
        except ImportError as error:
            print("IMPORT ERROR:", error)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "IMPORT ERROR:" in result.stdout
    assert "pip install twotower" in result.stdout
