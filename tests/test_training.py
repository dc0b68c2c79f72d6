"""Tests of the trainer on a tiny model and a synthetic corpus (CPU, a few seconds each)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.config import NemotronHConfig
from twotower.model import NemotronHForCausalLM
from twotower.training import checkpointing
from twotower.training.checkpointing import CheckpointCorruptError
from twotower.training.schedule import WarmupStableDecay
from twotower.training.trainer import TrainConfig, TrainingObjective, build_model, train
from twotower.two_tower import TwoTowerForCausalLM

VOCAB = 256
PATTERN_LENGTH = 64


def write_corpus(directory: Path) -> Path:
    """Write a corpus whose text repeats one random 64-token pattern, so a tiny model can overfit it."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pattern = rng.integers(4, VOCAB, size=PATTERN_LENGTH)
    train_tokens = np.tile(pattern, 200).astype("<u2")
    val_tokens = np.tile(pattern, 20).astype("<u2")
    train_tokens.tofile(directory / "train.bin")
    val_tokens.tofile(directory / "val.bin")
    meta = {
        "vocab_size": VOCAB,
        "dtype": "uint16",
        "tokens": {"train": len(train_tokens), "val": len(val_tokens)},
        "special_tokens": {"<pad>": 0, "<s>": 1, "</s>": 2, "<mask>": 3},
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 0,
        "mask_id": 3,
        "tokenizer": "tokenizer.json",
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def tiny_config_file(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    NemotronHConfig.tiny().save(directory)
    return str(directory / "config.json")


def base_config(tmp: Path, corpus: Path, **changes) -> TrainConfig:
    values = dict(
        stage=1,
        data_dir=str(corpus),
        run_dir=str(tmp / "run"),
        model_config="tiny",
        seq_len=32,
        batch_size=2,
        grad_accum=1,
        max_steps=6,
        warmup_steps=1,
        decay_fraction=0.5,
        lr=3e-3,
        min_lr=3e-4,
        eval_interval=3,
        eval_batches=2,
        save_interval=3,
        log_interval=1,
        block_size=8,
        threads=1,
        device="cpu",
        progress=False,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def stage1_tower(tmp_path_factory, corpus) -> Path:
    """A tiny tower after a few stage-1 steps, saved in the single-tower layout."""
    tmp = tmp_path_factory.mktemp("stage1")
    summary = train(base_config(tmp, corpus, max_steps=4))
    return Path(summary["checkpoint"]) / checkpointing.MODEL_DIR


# ---------------------------------------------------------------------- schedule


def test_wsd_schedule_linear_values():
    schedule = WarmupStableDecay(peak_lr=1.0, total_steps=10, warmup_steps=2, decay_fraction=0.4, min_lr=0.1)
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1]
    for step, value in enumerate(expected):
        assert schedule(step) == pytest.approx(value), f"step {step}"


def test_wsd_schedule_cosine_values():
    schedule = WarmupStableDecay(
        peak_lr=2.0, total_steps=8, warmup_steps=0, decay_fraction=0.5, min_lr=0.0, decay_shape="cosine"
    )
    assert schedule(0) == pytest.approx(2.0)
    assert schedule(3) == pytest.approx(2.0)
    assert schedule(4) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert schedule(5) == pytest.approx(1.0)
    assert schedule(7) == pytest.approx(0.0)


def test_wsd_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupStableDecay(peak_lr=1.0, total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="decay_shape"):
        WarmupStableDecay(peak_lr=1.0, total_steps=5, decay_shape="step")


# ---------------------------------------------------------------------- stage 1


def test_stage1_runs_and_writes_outputs(tmp_path, corpus):
    summary = train(base_config(tmp_path, corpus))
    assert summary["step"] == 6
    assert sorted(summary["losses"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(summary["val_losses"]) == [3, 6]

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]

    latest = checkpointing.latest_checkpoint(run)
    assert latest.name == "step-00000006"
    model = NemotronHForCausalLM.from_pretrained(latest / checkpointing.MODEL_DIR)
    assert model.config.hidden_size == NemotronHConfig.tiny().hidden_size


def test_stage1_overfits_repeated_pattern(tmp_path, corpus):
    summary = train(base_config(tmp_path, corpus, max_steps=40, warmup_steps=4, eval_interval=40, save_interval=40))
    losses = summary["losses"]
    assert losses[1] > math.log(VOCAB) - 0.5
    assert losses[40] < 0.5 * losses[1]
    assert summary["val_losses"][40] < 0.5 * losses[1]


def test_stage1_accepts_config_file(tmp_path, corpus):
    config_path = tiny_config_file(tmp_path / "cfg")
    summary = train(base_config(tmp_path, corpus, model_config=config_path, max_steps=2))
    assert summary["step"] == 2


# ---------------------------------------------------------------------- stage 2


def test_stage2_grads_reach_only_denoiser(stage1_tower, corpus, tmp_path):
    config = base_config(tmp_path, corpus, stage=2, init_path=str(stage1_tower))
    model = build_model(config, None, {"vocab_size": VOCAB})
    objective = TrainingObjective(model, stage=2, block_size=8, mock_ar_weight=0.5)
    ids = torch.randint(4, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    objective(ids, noise_seed=1).backward()

    frozen_prefixes = ("context_tower.", "context_lm_head.")
    for name, parameter in model.named_parameters():
        if name.startswith(frozen_prefixes):
            assert not parameter.requires_grad, name
            assert parameter.grad is None, name
        else:
            assert parameter.requires_grad, name
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    for prefix in ("denoiser_tower.", "lm_head.", "t_embedder.", "t_block.", "scale_shift_tables"):
        assert any(name.startswith(prefix) for name in with_grad), f"no gradient reaches {prefix}"


def test_stage2_keeps_context_tower_fixed(stage1_tower, corpus, tmp_path):
    summary = train(base_config(tmp_path, corpus, stage=2, init_path=str(stage1_tower), max_steps=3, mock_ar_weight=0.5))
    trained = TwoTowerForCausalLM.from_pretrained(Path(summary["checkpoint"]) / checkpointing.MODEL_DIR)
    start = TwoTowerForCausalLM.from_single_tower(str(stage1_tower))

    trained_state, start_state = trained.state_dict(), start.state_dict()
    for name, tensor in start_state.items():
        if name.startswith(("context_tower.", "context_lm_head.")):
            assert torch.equal(trained_state[name], tensor), f"{name} changed during stage 2"
    changed = [
        name for name, tensor in start_state.items()
        if name.startswith("denoiser_tower.") and not torch.equal(trained_state[name], tensor)
    ]
    assert changed, "stage 2 did not update the denoiser tower"


def test_stage2_without_init_path_fails(tmp_path, corpus):
    with pytest.raises(ValueError, match="init_path"):
        train(base_config(tmp_path, corpus, stage=2))


def test_stage2_rejects_unaligned_seq_len(tmp_path, corpus, stage1_tower):
    with pytest.raises(ValueError, match="block_size"):
        train(base_config(tmp_path, corpus, stage=2, init_path=str(stage1_tower), seq_len=30))


# ---------------------------------------------------------------------- resume and corruption


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_matches_uninterrupted_run(tmp_path, corpus, stage1_tower, stage):
    extra = {"init_path": str(stage1_tower)} if stage == 2 else {}
    whole = train(base_config(tmp_path / "whole", corpus, stage=stage, **extra))
    first = train(base_config(tmp_path / "split", corpus, stage=stage, stop_at_step=4, **extra))
    assert first["step"] == 4
    second = train(base_config(tmp_path / "split", corpus, stage=stage, **extra))
    assert second["step"] == 6
    assert sorted(second["losses"]) == [5, 6]

    resumed = {**first["losses"], **second["losses"]}
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(whole["losses"][step], rel=1e-6, abs=1e-7), f"step {step}"
    assert second["val_losses"][6] == pytest.approx(whole["val_losses"][6], rel=1e-6)


def test_truncated_checkpoint_is_detected(tmp_path, corpus):
    config = base_config(tmp_path, corpus, max_steps=3)
    train(config)
    latest = checkpointing.latest_checkpoint(config.run_dir)
    weights = latest / checkpointing.MODEL_DIR / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(size // 2)

    with pytest.raises(CheckpointCorruptError, match="truncated"):
        train(base_config(tmp_path, corpus, max_steps=6))


def test_checkpoint_without_manifest_is_detected(tmp_path, corpus):
    config = base_config(tmp_path, corpus, max_steps=3)
    train(config)
    latest = checkpointing.latest_checkpoint(config.run_dir)
    (latest / checkpointing.MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointCorruptError, match="not completely written"):
        checkpointing.verify_checkpoint(latest)


def test_changed_checkpoint_file_is_detected(tmp_path, corpus):
    config = base_config(tmp_path, corpus, max_steps=3)
    train(config)
    latest = checkpointing.latest_checkpoint(config.run_dir)
    state = latest / checkpointing.STATE_NAME
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="SHA-256"):
        checkpointing.verify_checkpoint(latest)


def test_interrupted_save_keeps_previous_latest(tmp_path, corpus):
    config = base_config(tmp_path, corpus, max_steps=3)
    train(config)
    root = checkpointing.checkpoint_root(config.run_dir)
    # What a save killed before its rename leaves behind: a temporary folder without a manifest.
    partial = root / f"{checkpointing.TMP_PREFIX}step-00000006-1"
    shutil.copytree(root / "step-00000003", partial)
    (partial / checkpointing.MANIFEST_NAME).unlink()

    latest = checkpointing.latest_checkpoint(config.run_dir)
    assert latest.name == "step-00000003"
    checkpointing.verify_checkpoint(latest)
    summary = train(base_config(tmp_path, corpus, max_steps=6))
    assert summary["step"] == 6
    assert not partial.exists()


# ---------------------------------------------------------------------- distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args: list[str], processes: int) -> dict:
    """Run ``python -m twotower.training`` (under torchrun when processes > 1); return its summary line."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "twotower.training", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "twotower.training", *args,
        ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Two processes reduce gradients in a different order than one process accumulating two
# micro-batches, so losses after a few steps agree to float32 rounding, not bit for bit.
DISTRIBUTED_TOLERANCE = 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, corpus, stage1_tower, strategy):
    common = [
        "--stage", "2", "--data-dir", str(corpus), "--init-path", str(stage1_tower), "--seq-len", "32",
        "--block-size", "8", "--batch-size", "2", "--max-steps", "3", "--warmup-steps", "1",
        "--eval-interval", "3", "--eval-batches", "3", "--device", "cpu", "--threads", "1", "--no-progress",
    ]
    single = run_cli([*common, "--run-dir", str(tmp_path / "one"), "--grad-accum", "2"], processes=1)
    # The two-process run is interrupted after step 2 and resumed, which also tests resuming a sharded run.
    distributed = [*common, "--run-dir", str(tmp_path / "two"), "--grad-accum", "1", "--distributed", strategy]
    interrupted = run_cli([*distributed, "--stop-at-step", "2"], processes=2)
    assert interrupted["step"] == 2
    double = run_cli(distributed, processes=2)
    assert double["step"] == single["step"] == 3
    assert double["final_loss"] == pytest.approx(single["final_loss"], rel=DISTRIBUTED_TOLERANCE)
    assert double["val_losses"]["3"] == pytest.approx(single["val_losses"]["3"], rel=DISTRIBUTED_TOLERANCE)

    one = TwoTowerForCausalLM.from_pretrained(Path(single["checkpoint"]) / checkpointing.MODEL_DIR).state_dict()
    two = TwoTowerForCausalLM.from_pretrained(Path(double["checkpoint"]) / checkpointing.MODEL_DIR).state_dict()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
