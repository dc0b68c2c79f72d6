"""Tests for scripts/distill_corpus.py: the context tower's own continuations as a training corpus."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.data import TokenDataset, load_meta
from twotower.two_tower import TwoTowerForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("distill_corpus", REPO_ROOT / "scripts" / "distill_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["distill_corpus"] = module
    spec.loader.exec_module(module)
    return module


dc = load_script()
PROMPT, NEW = 6, 10


@pytest.fixture(scope="module")
def source(tmp_path_factory, model_dir) -> Path:
    """A corpus of random ids in the tiny model's vocabulary, with the model's tokenizer."""
    directory = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    for split, size in (("train", 2000), ("val", 500)):
        rng.integers(4, 300, size=size).astype("<u2").tofile(directory / f"{split}.bin")
    shutil.copyfile(model_dir / "tokenizer.json", directory / "tokenizer.json")
    meta = {
        "vocab_size": 300, "dtype": "uint16", "tokens": {"train": 2000, "val": 500},
        "special_tokens": {"<pad>": 0, "<s>": 1, "</s>": 2, "<mask>": 3},
        "bos_id": 1, "eos_id": 2, "pad_id": 0, "mask_id": 3, "tokenizer": "tokenizer.json",
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def test_samples_are_prompt_then_greedy_continuation(tmp_path, model_dir, source):
    out = tmp_path / "distilled"
    argv = ["--model", str(model_dir), "--data-dir", str(source), "--out", str(out), "--train-samples", "5",
            "--val-samples", "3", "--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW), "--batch-size", "2",
            "--seed", "7", "--no-progress"]
    assert dc.main(argv) == 0

    meta = load_meta(out)
    assert meta["distilled"]["temperature"] == 0.0
    train = TokenDataset(out / "train.bin")
    assert len(train) == meta["tokens"]["train"]

    # Recompute the first sample independently: the same seeded offsets, then plain greedy AR.
    offsets = TokenDataset(source / "train.bin").sample_offsets(5, PROMPT, generator=torch.Generator().manual_seed(7))
    prompt = TokenDataset(source / "train.bin").batch(offsets[:1], PROMPT)
    model = TwoTowerForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    continuation = model.generate(prompt, max_new_tokens=NEW, eos_token_id=2, pad_token_id=2,
                                  return_dict_in_generate=True).new_token_lists()[0]
    if continuation and continuation[-1] == 2:
        continuation = continuation[:-1]
    expected = [1, *prompt[0].tolist(), *continuation, 2]
    assert train.tokens[: len(expected)].tolist() == expected

    # Every sample ends with </s>, so the file contains at least one </s> per sample and ends with one.
    ends = np.flatnonzero(train.tokens == 2)
    assert len(ends) >= 5
    assert ends[-1] == len(train) - 1
    assert len(train) <= 5 * (PROMPT + NEW + 2)
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("option, value", [("--train-samples", "0"), ("--new-tokens", "-1"), ("--temperature", "-0.5"), ("--temperature", "nan"), ("--temperature", "inf")])
def test_bad_arguments_are_rejected(option, value, capsys):
    with pytest.raises(SystemExit):
        dc.parse_args([option, value])
    assert option in capsys.readouterr().err


def test_out_equal_to_data_dir_is_rejected(tmp_path, model_dir, source):
    before = (source / "train.bin").read_bytes()
    with pytest.raises(SystemExit, match="overwrite the source corpus"):
        dc.main(["--model", str(model_dir), "--data-dir", str(source), "--out", str(source), "--no-progress"])
    assert (source / "train.bin").read_bytes() == before
    assert (source / "meta.json").is_file()


def test_other_tokenizer_is_rejected(tmp_path, model_dir, source):
    other = tmp_path / "other"
    shutil.copytree(source, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"<mask>"', '"<masked>"'))
    with pytest.raises(SystemExit, match="another tokenizer"):
        dc.main(["--model", str(model_dir), "--data-dir", str(other), "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()


def test_missing_model_is_one_line(tmp_path, source):
    with pytest.raises(SystemExit, match="--model .* is not a folder"):
        dc.main(["--model", str(tmp_path / "none"), "--data-dir", str(source), "--out", str(tmp_path / "out")])


def test_padded_vocabulary_ids_are_not_generated(tmp_path, model_dir, source):
    # The tiny model has 320 token ids and its tokenizer 300: ids 300..319 must never be written.
    out = tmp_path / "distilled"
    dc.main(["--model", str(model_dir), "--data-dir", str(source), "--out", str(out), "--train-samples", "6",
             "--val-samples", "2", "--prompt-tokens", "4", "--new-tokens", "24", "--batch-size", "3", "--no-progress"])
    assert int(TokenDataset(out / "train.bin").tokens.max()) < 300
