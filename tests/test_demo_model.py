"""The bundled demo model: its files, its size limit, and generation in all three modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import twotower
from twotower.pipeline import load_pipeline

DEMO = Path(twotower.__file__).parent / "demo"
SIZE_LIMIT = 40 * 1024 * 1024  # bytes: the demo ships inside the package


@pytest.fixture(scope="module")
def demo():
    return load_pipeline(DEMO)


def test_demo_files_present_and_small():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (DEMO / name).is_file(), name
    total = sum(f.stat().st_size for f in DEMO.iterdir() if f.is_file())
    assert total <= SIZE_LIMIT


def test_demo_defaults_are_diffusion():
    defaults = json.loads((DEMO / "generation_config.json").read_text())
    assert defaults["mode"] == "diffusion"
    assert defaults["block_size"] == 16
    assert defaults["mask_token_id"] == 3


def test_demo_covers_all_layer_types(demo):
    assert set(demo.model.config.hybrid_override_pattern) == {"M", "*", "E", "-"}


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_demo_generates_in_each_mode(demo, mode):
    with torch.inference_mode():
        results = demo.generate(["To be, or not to be", "def main():"], mode=mode, max_new_tokens=20)
    mask_id = demo.model.config.mask_token_id
    for result in results:
        assert 1 <= len(result.token_ids) <= 20
        assert mask_id not in result.token_ids
        assert result.finish_reason in ("stop", "length")
        assert result.text  # may be only whitespace: the demo model is small
