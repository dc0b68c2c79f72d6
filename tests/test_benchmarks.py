"""Smoke tests of the benchmark scripts in benchmarks/ on a tiny random model, and of the on-device builder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower import NemotronHConfig, TwoTowerForCausalLM
from twotower.benchmarking import build_on_device, corpus_prompts, format_table, random_prompts

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SHORT_RUN = ["--size", "tiny", "--new-tokens", "8", "--block-size", "4", "--steps", "4"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_modes_rows(tmp_path, capsys):
    path = tmp_path / "modes.json"
    status = load_script("bench_modes").main(
        SHORT_RUN + ["--repeats", "1", "--prompt-length", "12", "--thresholds", "0.9,1.0", "--json", str(path)]
    )
    assert status == 0
    rows = json.loads(path.read_text())["rows"]
    assert [row["label"] for row in rows] == ["ar", "mock_ar", "diffusion t=0.9", "diffusion t=1"]
    assert all(row["generated_tokens"] == 8 for row in rows)
    assert rows[0]["ratio_to_ar"] == pytest.approx(1.0)
    # Threshold 1.0 commits the minimum each step: 8 tokens in blocks of 4 over 4 steps take 8 passes.
    assert rows[3]["denoiser_passes"] == 8
    assert "| mode |" in capsys.readouterr().out


def test_bench_batch_ratios(tmp_path):
    path = tmp_path / "batch.json"
    status = load_script("bench_batch").main(
        SHORT_RUN + ["--repeats", "1", "--batches", "1,3", "--prompt-length", "10", "--json", str(path)]
    )
    assert status == 0
    rows = json.loads(path.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 3]
    assert rows[1]["prompt_lengths"] == [5, 7, 10]
    assert rows[1]["generated_tokens"] == 3 * 8
    assert rows[0]["ratio_to_batch_1"] == pytest.approx(1.0)


def test_bench_prompt_length_rows(tmp_path):
    path = tmp_path / "prompt.json"
    status = load_script("bench_prompt_length").main(SHORT_RUN + ["--lengths", "16,32", "--json", str(path)])
    assert status == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(row["prompt_length"], row["mode"]) for row in rows] == [(16, "ar"), (16, "diffusion"), (32, "ar"), (32, "diffusion")]
    assert all(row["prefill_s"] > 0 for row in rows)
    assert all(row["decode_ms_per_token"] > 0 for row in rows)


def test_prompt_length_defaults():
    module = load_script("bench_prompt_length")
    assert module.default_lengths(4096) == [256, 512, 1024, 2048, 4096]
    assert module.default_lengths(3000) == [256, 512, 1024, 2048, 3000]


def test_profile_components(tmp_path):
    path = tmp_path / "profile.json"
    status = load_script("profile_diffusion").main(SHORT_RUN + ["--prompt-length", "12", "--json", str(path)])
    assert status == 0
    result = json.loads(path.read_text())
    labels = {row["component"] for row in result["components"]}
    assert {"denoiser: mamba", "denoiser: moe", "denoiser: attention", "context: mamba"} <= labels
    assert sum(row["share"] for row in result["components"]) == pytest.approx(100.0, abs=1.0)
    assert result["operators"]


def test_gpu_30b_skips_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu.json"
    status = load_script("bench_gpu_30b").main(["--json", str(path)])
    assert status == 0
    assert capsys.readouterr().out.strip() == "skipped: no CUDA device"
    assert json.loads(path.read_text())["skipped"] == "skipped: no CUDA device"


def test_gpu_30b_dry_run_on_cpu(tmp_path):
    path = tmp_path / "gpu.json"
    status = load_script("bench_gpu_30b").main(
        ["--device", "cpu", "--size", "tiny", "--batches", "1,2", "--prompt-length", "8", "--new-tokens", "4",
         "--block-size", "4", "--steps", "4", "--json", str(path)]
    )
    assert status == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(row["batch"], row["mode"]) for row in rows] == [(1, "ar"), (1, "diffusion"), (2, "ar"), (2, "diffusion")]
    assert all(row["tokens_per_s"] > 0 for row in rows)


def test_build_on_device_matches_layout():
    config = NemotronHConfig.tiny()
    built = build_on_device(config, "cpu", torch.bfloat16, seed=1)
    reference = TwoTowerForCausalLM.from_config(config, dtype=torch.bfloat16)
    built_state, reference_state = built.state_dict(), reference.state_dict()
    assert built_state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert built_state[name].shape == tensor.shape, name
        assert built_state[name].dtype == tensor.dtype, name
        assert bool(torch.isfinite(built_state[name].float()).all()), name
    assert built.context_tower.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32


def test_random_prompts_left_padding():
    ids, mask = random_prompts([3, 5], vocab_size=50, seed=0)
    assert ids.shape == (2, 5)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert bool((ids[mask.bool()] >= 4).all())
    assert random_prompts([4, 4], vocab_size=50)[1] is None


def write_val_corpus(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.arange(100, 200, dtype="<u2").tofile(directory / "val.bin")
    meta = {"vocab_size": 256, "dtype": "uint16", "tokens": {"val": 100}, "special_tokens": {}, "bos_id": 1,
            "eos_id": 2, "pad_id": 0, "mask_id": 3, "tokenizer": "tokenizer.json"}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def test_corpus_prompts_cut_from_val(tmp_path):
    ids, mask = corpus_prompts(write_val_corpus(tmp_path), [3, 5])
    # Offsets are spread evenly over val.bin: 0 for the first row, the last full window for the second.
    assert ids.tolist() == [[0, 0, 100, 101, 102], [195, 196, 197, 198, 199]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_bench_modes_reads_corpus_prompts(tmp_path, capsys):
    corpus = write_val_corpus(tmp_path / "corpus")
    status = load_script("bench_modes").main(
        SHORT_RUN + ["--repeats", "1", "--prompt-length", "6", "--thresholds", "1.0", "--data-dir", str(corpus)]
    )
    assert status == 0
    assert f"prompts from {corpus}/val.bin" in capsys.readouterr().out


def test_format_table_marks_missing():
    table = format_table([{"a": 1.234, "b": None}], [("A", "a", ".1f"), ("B", "b", "")])
    assert table.splitlines()[-1] == "| 1.2 | - |"


def test_corpus_larger_than_model_vocabulary_is_rejected(tmp_path):
    corpus = write_val_corpus(tmp_path / "corpus")
    meta = json.loads((corpus / "meta.json").read_text())
    meta["vocab_size"] = 4096
    (corpus / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="--data-dir .*4096 token ids"):
        load_script("bench_modes").main(SHORT_RUN + ["--repeats", "1", "--thresholds", "1.0", "--data-dir", str(corpus)])


def test_benchmark_compile_option(tmp_path, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(TwoTowerForCausalLM, "compile_steps", lambda self, **options: compiled.append(self) or self)
    status = load_script("bench_modes").main(SHORT_RUN + ["--repeats", "1", "--thresholds", "1.0", "--compile"])
    assert status == 0
    assert len(compiled) == 1
    assert ", compiled" in capsys.readouterr().out
