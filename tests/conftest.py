"""Shared fixtures: a tiny two-tower model directory with a real byte-level BPE tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<mask>"]  # ids 0, 1, 2, 3, as the model config expects
TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320  # larger than the tokenizer, so ids 300..319 are padded rows that must be suppressed
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer trained on the validation sample, with the special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(FIXTURES / "validation_sample.txt")], trainer)
    return tokenizer


def build_model_dir(directory: Path, seed: int = 0) -> Path:
    """Write a random tiny two-tower checkpoint, its tokenizer and generation defaults to ``directory``."""
    from twotower import NemotronHConfig, TwoTowerForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    # initializer_range 0.1 spreads the logits, so greedy decoding produces varied tokens.
    config = NemotronHConfig.tiny(vocab_size=MODEL_VOCAB, initializer_range=0.1)
    TwoTowerForCausalLM.from_config(config, seed=seed).save_pretrained(directory, remote_code=False)
    train_tokenizer().save(str(directory / "tokenizer.json"))
    generation_config = {
        "max_new_tokens": 16,
        "block_size": 4,
        "steps_per_block": 4,
        "confidence_threshold": 0.9,
        "temperature": 0.0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "mask_token_id": 3,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return directory


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model directory without a chat template."""
    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, model_dir) -> Path:
    """The same model with a chat template in tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("models") / "tiny-chat"
    shutil.copytree(model_dir, directory)
    tokenizer_config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory
