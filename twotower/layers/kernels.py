"""Optional fused CUDA kernels from the ``mamba_ssm`` package.

The fused scan runs only when ``mamba_ssm`` is installed, the tensors are on CUDA and
``TWOTOWER_KERNELS`` is not ``0``. Otherwise the pure-PyTorch scan runs, which is also the oracle
the tests check. Install the kernels with ``pip install twotower[cuda]``.

TODO: the ``causal_conv1d`` kernel is not wired in yet; the conv always runs in PyTorch.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

try:  # pragma: no cover - only on machines with the CUDA packages
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:  # the usual case on CPU machines
    mamba_chunk_scan_combined = None


def kernels_enabled(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("TWOTOWER_KERNELS", "1") != "0"


def fused_chunk_scan(x, dt, A, B, C, chunk_size: int, initial_state: torch.Tensor | None):
    """The SSD scan with mamba_ssm's Triton kernel; returns (y, final_state) or None when unavailable.

    NOTE: this path has not run in this project's CI, which has no GPU; the tests compare only the
    pure-PyTorch scan against its sequential reference.
    """
    if mamba_chunk_scan_combined is None or not kernels_enabled(x):
        return None
    y, final_state = mamba_chunk_scan_combined(
        x.float(), dt.float(), A.float(), B.float(), C.float(), chunk_size,
        initial_states=initial_state, return_final_states=True,
    )
    return y.float(), final_state.float()
