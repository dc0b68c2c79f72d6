"""The inference cache of one Nemotron-H tower.

Per attention layer: preallocated K/V buffers (B, n_kv, capacity, P) filled up to ``length``.
Per Mamba layer: the conv state (last ``conv_kernel - 1`` raw xBC inputs) and the fp32 SSM state.
``key_mask`` (B, capacity) marks real tokens; left padding stays False and is never attended to.
With ``track_previous`` the cache also keeps every Mamba state one token before the end, which the
two-tower mock-AR mode reads.
"""

from __future__ import annotations

import torch

from twotower.config import ATTENTION, MAMBA, NemotronHConfig
from twotower.layers.mamba2 import MambaState


class HybridCache:
    def __init__(
        self,
        config: NemotronHConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 256,
        track_previous: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: expected a positive integer")
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.track_previous = track_previous
        self.length = 0
        self.capacity = max(int(capacity), 1)

        kv_shape = (batch_size, config.num_key_value_heads, self.capacity, config.head_dim)
        self.keys = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in config.layer_indices(ATTENTION)}
        self.values = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in config.layer_indices(ATTENTION)}
        self.key_mask = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)

        conv_shape = (batch_size, config.mamba_conv_dim, config.conv_kernel - 1)
        ssm_shape = (batch_size, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size)
        self.mamba: dict[int, MambaState] = {
            i: MambaState(
                torch.zeros(conv_shape, dtype=dtype, device=device),
                torch.zeros(ssm_shape, dtype=torch.float32, device=device),
            )
            for i in config.layer_indices(MAMBA)
        }
        self.mamba_previous: dict[int, MambaState] = {}

    # ------------------------------------------------------------------ growth and writes

    def reserve(self, extra_tokens: int) -> None:
        """Make room for ``extra_tokens`` more positions, doubling the buffers when they are full."""
        needed = self.length + extra_tokens
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, buffer in store.items():
                grown = buffer.new_zeros(*buffer.shape[:2], new_capacity, buffer.shape[-1])
                grown[:, :, : self.length] = buffer[:, :, : self.length]
                store[i] = grown
        mask = self.key_mask.new_zeros(self.batch_size, new_capacity)
        mask[:, : self.length] = self.key_mask[:, : self.length]
        self.key_mask = mask
        self.capacity = new_capacity

    def write_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, L, P) at ``start`` and return the K/V of positions ``[0, start + L)``."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    # ------------------------------------------------------------------ batch rows

    def select_rows(self, rows: torch.Tensor | list[int]) -> "HybridCache":
        """Keep (or reorder, or repeat) batch rows in place; ``rows`` indexes the current batch."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise ValueError(f"rows={rows.tolist()} is invalid: expected indices in [0, {self.batch_size})")
        self.keys = {i: t[rows] for i, t in self.keys.items()}
        self.values = {i: t[rows] for i, t in self.values.items()}
        self.key_mask = self.key_mask[rows]
        self.mamba = {i: MambaState(s.conv[rows], s.ssm[rows]) for i, s in self.mamba.items()}
        self.mamba_previous = {i: MambaState(s.conv[rows], s.ssm[rows]) for i, s in self.mamba_previous.items()}
        self.batch_size = int(rows.numel())
        return self

    def clone(self) -> "HybridCache":
        other = HybridCache.__new__(HybridCache)
        other.__dict__.update(self.__dict__)
        other.keys = {i: t.clone() for i, t in self.keys.items()}
        other.values = {i: t.clone() for i, t in self.values.items()}
        other.key_mask = self.key_mask.clone()
        other.mamba = {i: MambaState(s.conv.clone(), s.ssm.clone()) for i, s in self.mamba.items()}
        other.mamba_previous = {i: MambaState(s.conv.clone(), s.ssm.clone()) for i, s in self.mamba_previous.items()}
        return other

    def to(self, device: torch.device | str) -> "HybridCache":
        """Move every tensor to ``device`` (the two-tower model reads the cache on the denoiser's device)."""
        self.device = torch.device(device)
        self.keys = {i: t.to(device) for i, t in self.keys.items()}
        self.values = {i: t.to(device) for i, t in self.values.items()}
        self.key_mask = self.key_mask.to(device)
        self.mamba = {i: MambaState(s.conv.to(device), s.ssm.to(device)) for i, s in self.mamba.items()}
        self.mamba_previous = {
            i: MambaState(s.conv.to(device), s.ssm.to(device)) for i, s in self.mamba_previous.items()
        }
        return self
