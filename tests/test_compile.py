"""Compiled generation (TwoTowerForCausalLM.compile_steps) gives the tokens of eager generation.

torch.compile builds C++ kernels on the CPU, so this module takes about a minute; one model is
compiled once and every test reuses it.
"""

from __future__ import annotations

import pytest
import torch

from twotower import NemotronHConfig, TwoTowerForCausalLM

DIFFUSION = dict(max_new_tokens=12, block_size=4, steps_per_block=4, confidence_threshold=0.9, temperature=0.0)


@pytest.fixture(scope="module")
def models():
    config = NemotronHConfig.tiny(vocab_size=320, initializer_range=0.1)
    eager = TwoTowerForCausalLM.from_config(config, seed=0).eval()
    compiled = TwoTowerForCausalLM.from_config(config, seed=0).eval().compile_steps()
    return eager, compiled


def prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch, length", [(2, 10), (2, 15)])
def test_compiled_diffusion_matches_eager(models, batch, length):
    eager, compiled = models
    ids = prompts(batch, length)
    with torch.inference_mode():
        expected = eager.generate_mask_diffusion(ids, **DIFFUSION)
        actual = compiled.generate_mask_diffusion(ids, **DIFFUSION)
    assert torch.equal(actual, expected)


def test_compiled_ar_matches_eager(models):
    eager, compiled = models
    ids = prompts(2, 10, seed=1)
    with torch.inference_mode():
        expected = eager.generate(ids, max_new_tokens=6)
        actual = compiled.generate(ids, max_new_tokens=6)
    assert torch.equal(actual, expected)


def test_compiled_denoiser_logits_close(models):
    eager, compiled = models
    ids = prompts(2, 10, seed=2)
    block = torch.full((2, 4), 3)
    with torch.inference_mode():
        logits = []
        for model in (eager, compiled):
            cache = model.new_cache(2, capacity=16)
            model.extend_context(ids, cache)
            logits.append(model.denoise(block, cache, torch.ones(2)))
    # Fused kernels reorder fp32 sums, so the logits agree to rounding, not bit for bit.
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
