"""Tests of the generation-mode comparison on a tiny random model (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from twotower.config import NemotronHConfig
from twotower.evaluation import CARD_END, CARD_START, continuation_lengths, main, repetition_rate
from twotower.two_tower import TwoTowerForCausalLM


def test_repetition_rate_counts_repeated_ngrams():
    assert repetition_rate([1, 2, 3, 4, 5, 6]) == 0.0
    # 4-grams: (1,2,3,4) (2,3,4,1) (3,4,1,2) (4,1,2,3) (1,2,3,4): one of five repeats.
    assert repetition_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(0.2)
    assert repetition_rate([7, 7]) == 0.0


def test_continuation_lengths_stop_after_eos():
    import torch

    tokens = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]])
    assert continuation_lengths(tokens, eos_token_id=2) == [2, 4]


def test_evaluation_fills_model_card(tmp_path, capsys):
    config = NemotronHConfig.tiny(vocab_size=64, initializer_range=0.1)
    model_dir = tmp_path / "model"
    TwoTowerForCausalLM.from_config(config, seed=0).save_pretrained(model_dir, remote_code=False)

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    np.random.default_rng(0).integers(4, 64, size=2000).astype("<u2").tofile(corpus / "val.bin")
    meta = {"vocab_size": 64, "dtype": "uint16", "tokens": {"val": 2000}, "special_tokens": {},
            "bos_id": 1, "eos_id": 2, "pad_id": 0, "mask_id": 3, "tokenizer": "tokenizer.json"}
    (corpus / "meta.json").write_text(json.dumps(meta))
    card = tmp_path / "README.md"
    card.write_text(f"# card\n\n{CARD_START}\nto be filled\n{CARD_END}\n")

    code = main([
        "--model", str(model_dir), "--data-dir", str(corpus), "--prompts", "2", "--prompt-tokens", "8",
        "--max-new-tokens", "8", "--block-size", "4", "--steps-per-block", "4", "--thresholds", "0.5", "1.0",
        "--json", str(tmp_path / "results.json"), "--update-card", str(card),
    ])
    assert code == 0

    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert len(rows) == 4, table  # ar, mock-ar and one diffusion row per threshold
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["mode"] for r in results] == ["ar", "mock-ar", "diffusion", "diffusion"]
    for result in results:
        assert result["generative_perplexity"] > 1.0
        assert 0.0 <= result["repetition"] <= 1.0
        assert result["generated_tokens"] > 0
    assert results[0]["passes_per_token"] == pytest.approx(1.0)

    text = card.read_text()
    assert "to be filled" not in text
    assert "| mock-ar |" in text
    assert text.index(CARD_START) < text.index("| ar |") < text.index(CARD_END)
