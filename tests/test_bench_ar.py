"""A short run of benchmarks/bench_ar.py, so the script keeps working as the library changes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ar.py"


def load_bench_ar():
    spec = importlib.util.spec_from_file_location("bench_ar", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_ar_short_run(tmp_path):
    import torch

    path = tmp_path / "ar.json"
    threads = torch.get_num_threads()
    try:
        status = load_bench_ar().main([
            "--sizes", "tiny", "--batches", "1,2", "--prompt-length", "16", "--new-tokens", "4",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--skip-memory", "--json", str(path),
        ])
    finally:
        torch.set_num_threads(threads)  # --threads changes the whole test process
    assert status == 0

    rows = json.loads(path.read_text())["throughput"]
    assert [(row["phase"], row["batch"]) for row in rows] == [
        ("prefill", 1), ("decode", 1), ("prefill", 2), ("decode", 2)
    ]
    for row in rows:
        assert row["ours_tokens_per_s"] > 0
        assert row["transformers_tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["transformers_ms"] / row["ours_ms"])
    # The tiny model's greedy tokens agree exactly with transformers (the tower tests check this too).
    assert [row["greedy_token_agreement"] for row in rows if row["phase"] == "decode"] == [1.0, 1.0]


@pytest.mark.parametrize("size, params", [("30m", 32_315_024), ("150m", 144_139_880)])
def test_config_sizes(size, params):
    import torch

    from twotower.model import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(load_bench_ar().SIZES[size]())
    assert sum(p.numel() for p in model.parameters()) == params


def test_bench_ar_bfloat16_run(tmp_path):
    import torch

    path = tmp_path / "ar.json"
    threads = torch.get_num_threads()
    try:
        status = load_bench_ar().main([
            "--sizes", "tiny", "--batches", "1", "--prompt-length", "8", "--new-tokens", "2", "--dtype", "bfloat16",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--skip-memory", "--json", str(path),
        ])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    rows = json.loads(path.read_text())["throughput"]
    assert {row["dtype"] for row in rows} == {"bfloat16"}


def test_bench_ar_rejects_unknown_size():
    with pytest.raises(SystemExit):
        load_bench_ar().main(["--sizes", "tiny,huge"])


def test_profile_ar_short_run(capsys):
    import torch

    spec = importlib.util.spec_from_file_location("profile_ar", SCRIPT.with_name("profile_ar.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        status = module.main(["--size", "tiny", "--prompt-length", "8", "--steps", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| twotower") or line.startswith("| transformers")]
    assert len(rows) == 2
