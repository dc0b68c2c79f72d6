"""RMSNorm and the grouped, gated RMSNorm of the Mamba-2 mixer."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight is applied in fp32 before casting back."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * silu(z))`` normalised separately within each of ``n_groups`` channel groups."""

    def __init__(self, hidden_size: int, n_groups: int, eps: float = 1e-5):
        super().__init__()
        if hidden_size % n_groups:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by n_groups={n_groups}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.n_groups = n_groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() * nn.functional.silu(z.float())
        grouped = y.unflatten(-1, (self.n_groups, -1))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * grouped.flatten(-2)).to(dtype)
