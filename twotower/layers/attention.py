"""Grouped-query attention without positional encoding (Nemotron-H uses none), on SDPA.

Masks are explicit booleans (True = may attend) built by the caller, so one module serves causal
prefill over a cache, single-token decoding, the two-tower denoiser's bidirectional attention over
``[context K/V | block K/V]`` and the block-causal training pattern.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twotower.config import NemotronHConfig


class Attention(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return q (B, nh, L, P) and k, v (B, n_kv, L, P) for ``hidden`` (B, L, H)."""
        q = self.q_proj(hidden).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(hidden).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(hidden).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        return q, k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of q over k, v with a boolean ``mask`` broadcastable to (B, nh, Lq, Lk); returns (B, Lq, H).

        Every query row of ``mask`` must allow at least one key, or SDPA returns NaN for that row.
        """
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


def eager_attention(q, k, v, mask, scale):
    """Slow reference: explicit GQA expansion and fp32 softmax; returns (B, nh, Lq, P)."""
    repeats = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(repeats, dim=1)
    v = v.repeat_interleave(repeats, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)
