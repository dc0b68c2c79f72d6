"""Checkpoint I/O: safetensors files, single or sharded with ``model.safetensors.index.json``.

Models are built on the meta device and filled tensor by tensor from memory-mapped shards, so peak
memory stays near one copy of the weights. Every failure raises ``CheckpointError`` naming the file,
the keys or the shapes involved.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from twotower.config import NemotronHConfig

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Tensors kept in fp32 whatever dtype the model is loaded in: the router's bias decides near-ties.
FP32_TENSORS = ("e_score_correction_bias",)
# Multi-token-prediction heads of some Nemotron-H releases; this library does not use them.
IGNORED_PREFIXES = ("mtp.",)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, unreadable or does not match the model."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is invalid; expected one of {sorted(names)} or a torch.dtype")
    return names[dtype]


def parse_size(size: int | str) -> int:
    """Parse ``"2GB"``, ``"500MB"`` or a byte count."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} is invalid; expected bytes or a string such as '2GB'")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    return int(float(match.group(1)) * units[match.group(2)])


# ---------------------------------------------------------------------- reading


def list_shards(directory: str | Path) -> dict[str, Path]:
    """Map each tensor name of the checkpoint in ``directory`` to the shard file that stores it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {error}") from error
        shards = {name: directory / file for name, file in weight_map.items()}
        for file in sorted({p for p in shards.values()}):
            if not file.is_file():
                raise CheckpointError(f"shard {file.name} listed in {index} is missing from {directory}")
        return shards

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {directory} (expected {SINGLE_NAME} or {INDEX_NAME})")
    shards = {}
    for file in files:
        for name in _open(file).keys():
            shards[name] = file
    return shards


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error type for bad headers and short files
        raise CheckpointError(f"shard {file} is unreadable or truncated: {error}") from error


def iter_tensors(shards: dict[str, Path], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` shard by shard, keeping one shard open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(shards[name], []).append(name)
    for file, file_names in by_file.items():
        handle = _open(file)
        for name in file_names:
            try:
                yield name, handle.get_tensor(name)
            except Exception as error:
                raise CheckpointError(f"tensor {name} in shard {file} is unreadable: {error}") from error


def stored_shapes(shards: dict[str, Path], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Read the shape of each tensor in ``names`` from its shard's header, without loading data."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(shards[name], []).append(name)
    shapes = {}
    for file, file_names in by_file.items():
        handle = _open(file)
        for name in file_names:
            shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:  # names come from the model's own state dict
        raise AssertionError(f"{name} is neither a parameter nor a buffer")


def load_weights(
    model: nn.Module,
    directory: str | Path,
    rename: Callable[[str], str | None] = lambda name: name,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Fill ``model`` (usually on the meta device) from the checkpoint in ``directory``.

    ``rename`` maps a checkpoint name to a model name, or to ``None`` for tensors deliberately
    skipped (such as the other tower). Missing, unexpected and mis-shaped tensors raise
    ``CheckpointError`` listing every offending key.
    """
    shards = list_shards(directory)
    expected = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}

    wanted: dict[str, str] = {}
    unexpected = []
    for name in shards:
        target = rename(name)
        if target is None or name.startswith(IGNORED_PREFIXES):
            continue
        if target in expected:
            wanted[name] = target
        else:
            unexpected.append(name)
    missing = sorted(set(expected) - set(wanted.values()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected))}")
        raise CheckpointError(f"checkpoint {directory} does not match the model: " + "; ".join(parts))

    # Shapes come from the shard headers, so every mismatched key is reported before any data is read.
    mismatched = [
        f"{name}: the model expects {tuple(expected[wanted[name]].shape)}, the checkpoint has {shape}"
        for name, shape in stored_shapes(shards, list(wanted)).items()
        if shape != tuple(expected[wanted[name]].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {directory} does not match the model: mismatched shapes ({len(mismatched)}): "
            + "; ".join(mismatched)
        )

    for name, tensor in iter_tensors(shards, list(wanted)):
        target = wanted[name]
        if target.endswith(FP32_TENSORS):
            tensor = tensor.float()
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        # A fresh allocation (not a view into the mapped file) keeps the usual memory alignment,
        # so kernels take the same paths as for a model built in memory.
        _set_tensor(model, target, tensor.to(device, copy=True))


def checkpoint_dtype(directory: str | Path) -> torch.dtype:
    """Return the dtype of the checkpoint's embedding table, read from the shard header without loading data."""
    shards = list_shards(directory)
    name = next((n for n in shards if n.endswith("embeddings.weight")), next(iter(shards)))
    stored = _open(shards[name]).get_slice(name).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def read_config(directory: str | Path) -> NemotronHConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {directory}: a checkpoint directory needs its model config")
    return NemotronHConfig.from_json_file(path)


def load_causal_lm(cls, path: str | Path, dtype=None, device="cpu"):
    """Build ``cls`` (a single-tower causal LM) from a single-tower or two-tower checkpoint."""
    config = read_config(path)
    dtype = parse_dtype(dtype) or checkpoint_dtype(path)
    shards = list_shards(path)
    two_tower = any(name.startswith("context_tower.") for name in shards)

    def rename(name: str) -> str | None:
        if not two_tower:
            return name
        if name.startswith("context_tower."):
            return "backbone." + name[len("context_tower."):]
        if name == "context_lm_head.weight":
            return "lm_head.weight"
        return None  # the denoiser half of a two-tower checkpoint

    with torch.device("meta"):
        model = cls(config)
    load_weights(model, path, rename=rename, dtype=dtype, device=device)
    model.eval()
    logger.info("loaded %s from %s (%s, %s)", cls.__name__, path, dtype, device)
    return model


# ---------------------------------------------------------------------- writing


def save_state_dict(
    state_dict: dict[str, torch.Tensor], directory: str | Path, max_shard_size: int | str = "2GB"
) -> list[Path]:
    """Write ``state_dict`` as safetensors shards of at most ``max_shard_size`` bytes each.

    Every file is written under a temporary name and renamed, so an interrupted save never leaves a
    file that looks complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous().clone()
        size += nbytes

    for stale in list(directory.glob("*.safetensors")) + [directory / INDEX_NAME]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    written = []
    for name, shard in zip(names, shards):
        target = directory / name
        tmp = directory / (name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
        written.append(target)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        tmp = directory / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, directory / INDEX_NAME)
    return written
