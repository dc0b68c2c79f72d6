"""Optional fused CUDA kernels from the ``mamba_ssm`` and ``causal_conv1d`` packages.

They are used only when installed, when the tensors are on CUDA and when ``TWOTOWER_KERNELS`` is not
``0``; the pure-PyTorch scan is the default and the oracle. Install them with ``pip install
twotower[cuda]``.
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

try:  # pragma: no cover
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None


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
