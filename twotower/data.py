"""Read the packed token files that scripts/build_corpus.py writes.

A corpus folder contains ``train.bin`` and ``val.bin``, each one flat array of
little-endian uint16 token ids in which every document is stored as
``<s> tokens </s>`` and documents follow each other without padding, plus
``meta.json`` (vocabulary size, token counts, special-token ids) and
``tokenizer.json``. This module only reads local files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

TOKEN_DTYPE = np.dtype("<u2")
META_FILE = "meta.json"
REQUIRED_META_KEYS = frozenset(
    {
        "vocab_size",
        "dtype",
        "tokens",
        "special_tokens",
        "bos_id",
        "eos_id",
        "pad_id",
        "mask_id",
        "tokenizer",
    }
)


def load_meta(directory: str | Path) -> dict:
    """Load meta.json from a corpus folder and check that it has the keys readers rely on.

    Raises FileNotFoundError when the folder has no meta.json and ValueError
    when keys are missing or the dtype is not uint16.
    """
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus metadata not found: {path}; build the corpus with "
            f"'python scripts/build_corpus.py --out {directory}'"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    missing = sorted(REQUIRED_META_KEYS - meta.keys())
    if missing:
        raise ValueError(f"{path} is missing keys {', '.join(missing)}; rebuild the corpus")
    if meta["dtype"] != "uint16":
        raise ValueError(
            f"{path} has dtype {meta['dtype']!r}; only uint16 token files are supported"
        )
    return meta


class TokenDataset:
    """Read-only view of one token file as a numpy memmap of uint16 ids."""

    def __init__(self, path: str | Path, dtype: np.dtype | str = TOKEN_DTYPE):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if not self.path.is_file():
            raise FileNotFoundError(f"token file not found: {self.path}")
        size = self.path.stat().st_size
        if size == 0:
            raise ValueError(f"token file {self.path} is empty")
        if size % self.dtype.itemsize:
            raise ValueError(
                f"token file {self.path} has {size} bytes, not a multiple of "
                f"{self.dtype.itemsize}; it is truncated or not a {self.dtype} file"
            )
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        """Return the number of tokens in the file."""
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, tokens={len(self)})"

    # A memmap would be pickled as a full in-memory copy, so DataLoader workers
    # receive the path instead and open their own memmap.
    def __getstate__(self) -> dict:
        return {"path": self.path, "dtype": self.dtype.str}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["dtype"])

    def batch(
        self, offsets: Sequence[int] | np.ndarray | torch.Tensor, seq_len: int
    ) -> torch.Tensor:
        """Gather windows tokens[offset : offset + seq_len] into a LongTensor of shape [B, seq_len].

        offsets are token positions, one per row. Each must satisfy
        0 <= offset <= len(self) - seq_len, otherwise IndexError is raised.
        Windows may cross document boundaries, where </s> is followed by <s>.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if isinstance(offsets, torch.Tensor):
            offsets = offsets.detach().cpu().numpy()
        starts = np.asarray(offsets, dtype=np.int64)
        if starts.ndim != 1:
            raise ValueError(f"offsets must be one-dimensional, got shape {tuple(starts.shape)}")

        last_start = len(self) - seq_len
        if last_start < 0:
            raise IndexError(f"seq_len {seq_len} is longer than {self.path} ({len(self)} tokens)")
        bad = (starts < 0) | (starts > last_start)
        if bad.any():
            raise IndexError(
                f"offset {int(starts[bad][0])} is out of range: with seq_len {seq_len}, "
                f"offsets must be in [0, {last_start}] for {self.path}"
            )

        positions = starts[:, None] + np.arange(seq_len, dtype=np.int64)
        return torch.from_numpy(self.tokens[positions].astype(np.int64))

    def sample_offsets(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw batch_size offsets uniformly from the valid range for windows of seq_len tokens."""
        high = len(self) - seq_len + 1
        if high <= 0:
            raise ValueError(f"seq_len {seq_len} is longer than {self.path} ({len(self)} tokens)")
        return torch.randint(0, high, (batch_size,), generator=generator)


def write_token_file(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens as a little-endian uint16 memmap, through a temporary file and a rename.

    A run stopped half-way therefore never leaves a partial token file under ``path``.
    """
    path = Path(path)
    if tokens.size == 0:
        raise ValueError(f"cannot write {path}: the token array is empty")
    temporary = path.with_name(path.name + ".tmp")
    array = np.memmap(temporary, dtype=TOKEN_DTYPE, mode="w+", shape=(tokens.size,))
    array[:] = tokens
    array.flush()
    del array
    os.replace(temporary, path)
