"""Atomic, verifiable training checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXXXX`` containing

* ``model/``: ``config.json`` and safetensors weights in the layout ``save_pretrained`` writes,
  so the folder loads with ``NemotronHForCausalLM.from_pretrained`` or
  ``TwoTowerForCausalLM.from_pretrained``;
* ``trainer_state.pt``: optimizer state, step, RNG states and the training config;
* ``manifest.json``: size and SHA-256 of every other file, written last.

The folder is assembled under a temporary name, every file and folder is fsynced, and the folder is
renamed into place. Only then is ``<run>/checkpoints/latest``, a text file with the folder name,
replaced atomically. A killed run therefore leaves either the previous checkpoint as latest or the
new one complete. ``load_checkpoint`` re-checks the manifest and raises ``CheckpointCorruptError``
when a file is missing, truncated or changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from twotower.checkpoint import save_state_dict
from twotower.config import NemotronHConfig

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
STATE_NAME = "trainer_state.pt"
MODEL_DIR = "model"
LATEST_NAME = "latest"
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class CheckpointCorruptError(RuntimeError):
    """A checkpoint folder is incomplete or its files do not match its manifest."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_model_dir(
    state_dict: dict[str, torch.Tensor], config: NemotronHConfig, two_tower: bool, path: str | Path,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``config.json`` and safetensors weights as the models' ``save_pretrained`` does.

    ``dtype`` casts floating-point tensors (for example to bfloat16 to halve a released model).
    """
    path = Path(path)
    extra = {"architectures": ["TwoTowerForCausalLM"], "two_tower": True} if two_tower else None
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    config.save(path, extra=extra)
    save_state_dict(state_dict, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    config: NemotronHConfig,
    two_tower: bool,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` atomically, point ``latest`` at it and keep the newest ``keep``."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{STEP_PREFIX}{step:08d}"
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    write_model_dir(model_state, config, two_tower, tmp / MODEL_DIR)
    torch.save(trainer_state, tmp / STATE_NAME)

    files = _files_under(tmp)
    manifest = {
        "step": step,
        "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    for path in files:
        _fsync_file(path)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _fsync_file(tmp / MANIFEST_NAME)
    _fsync_dir(tmp / MODEL_DIR)
    _fsync_dir(tmp)

    if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)

    pointer_tmp = root / f"{LATEST_NAME}.tmp"
    pointer_tmp.write_text(name + "\n")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, root / LATEST_NAME)
    _fsync_dir(root)
    logger.info("saved checkpoint %s", final)

    _prune(root, keep=keep, protect=name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    if keep < 1:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    for old in steps[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Return the folder that ``latest`` names, or None when the run has no checkpoint yet."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not path.is_dir():
        raise CheckpointCorruptError(
            f"{pointer} names {name!r}, which does not exist; delete {pointer} to start over "
            "or point it at an existing step-* folder"
        )
    return path


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against the manifest and return the manifest; raise CheckpointCorruptError."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointCorruptError(
            f"checkpoint {path} has no {MANIFEST_NAME}: it was not completely written; "
            "resume from an earlier checkpoint"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointCorruptError(f"checkpoint manifest {manifest_path} is unreadable: {error}") from error
    for relative, expected in entries.items():
        file = path / relative
        if not file.is_file():
            raise CheckpointCorruptError(f"checkpoint {path} is missing {relative} listed in its manifest")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointCorruptError(
                f"checkpoint file {file} has {size} bytes but the manifest lists {expected['bytes']}: "
                "it is truncated or was overwritten; resume from an earlier checkpoint"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointCorruptError(
                f"checkpoint file {file} does not match the SHA-256 in its manifest: it is corrupt; "
                "resume from an earlier checkpoint"
            )
    return manifest


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Verify the checkpoint at ``path`` and return its trainer state (loaded to CPU)."""
    path = Path(path)
    verify_checkpoint(path)
    return torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
