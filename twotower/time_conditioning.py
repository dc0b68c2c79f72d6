"""Time conditioning of the denoiser tower (adaLN-single, as in PixArt-alpha).

``t`` in [0, 1] is the masked fraction of the block. ``t_embedder`` maps ``1000 * t`` to 256
sinusoidal features ``[cos | sin]`` with frequencies ``exp(-ln(10000) * k / 128)``, then
Linear(256, H) -> SiLU -> Linear(H, H). ``t_block`` is SiLU -> Linear(H, 3H), shared by all layers;
layer i adds its own table: ``(shift, scale, gate) = scale_shift_tables[i] + t_block(emb).view(3, H)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FREQUENCY_FEATURES = 256
TIME_SCALE = 1000.0


def timestep_features(t: torch.Tensor, dim: int = FREQUENCY_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of ``TIME_SCALE * t`` for t (B,), in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (TIME_SCALE * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_FEATURES, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


def make_t_block(hidden_size: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))


def make_scale_shift_tables(hidden_size: int, num_layers: int) -> nn.ParameterList:
    return nn.ParameterList(nn.Parameter(torch.empty(3, hidden_size)) for _ in range(num_layers))


@torch.no_grad()
def reset_time_conditioning(
    t_embedder: TimestepEmbedder, t_block: nn.Sequential, tables: nn.ParameterList, generator: torch.Generator | None = None
) -> None:
    """PyTorch's default Linear init and ``randn(3, H) / sqrt(H)`` tables, as the release did (gates not zeroed)."""
    for linear in (t_embedder.mlp[0], t_embedder.mlp[2], t_block[1]):
        bound = 1.0 / math.sqrt(linear.in_features)
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.uniform_(-bound, bound, generator=generator)
    for table in tables:
        hidden_size = table.shape[-1]
        table.copy_(torch.randn(table.shape, generator=generator) / hidden_size**0.5)


def time_embedding(t_embedder: TimestepEmbedder, t_block: nn.Sequential, t: torch.Tensor) -> torch.Tensor:
    """Compute the modulation shared by all layers, (B, 3, H), for per-row timesteps t (B,)."""
    out = t_block(t_embedder(t))
    return out.unflatten(-1, (3, out.shape[-1] // 3))


def layer_modulation(
    tables: nn.ParameterList, embedding: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, scale, gate) of ``layer``, each (B, 1, H)."""
    shift, scale, gate = (tables[layer].to(embedding.dtype) + embedding).unbind(dim=1)
    return shift[:, None], scale[:, None], gate[:, None]
