"""The Mamba-2 mixer of Nemotron-H.

``in_proj`` splits into ``[z | xBC | dt]``; a depthwise causal conv1d (with bias) and SiLU run over
``xBC``, which splits into ``[x | B | C]``; ``dt = softplus(dt + dt_bias)`` clamped to
``time_step_limit``; ``A = -exp(A_log)``; the SSD scan plus ``D * x``; then ``RMSNorm(y * silu(z))``
within ``n_groups`` channel groups, and ``out_proj``.

The mixer is stateless: callers pass the conv state (the last ``conv_kernel - 1`` raw ``xBC`` inputs)
and the fp32 SSM state, and receive the new ones, so one module serves prefill, chunked continuation,
single-token decoding and the two-tower denoiser (which reads the context tower's state read-only).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from twotower.config import NemotronHConfig
from twotower.layers.kernels import fused_chunk_scan
from twotower.layers.norms import GatedRMSNorm
from twotower.layers.ssd import ssd_block_scan, ssd_chunk_scan, ssd_sequential, ssd_step


class MambaState(NamedTuple):
    conv: torch.Tensor  # (B, conv_dim, conv_kernel - 1), model dtype
    ssm: torch.Tensor  # (B, nh, P, N), float32


class MambaOutput(NamedTuple):
    hidden: torch.Tensor  # (B, L, H)
    state: MambaState | None  # after the last token; None when return_state=False
    previous: MambaState | None  # after the second-to-last token, when asked for
    states_at: MambaState | None = None  # conv (B, M, D, K-1) and ssm (B, M, nh, P, N) after chosen positions


class Mamba2Mixer(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.n_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.conv_kernel = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.time_step_limit = config.time_step_limit
        self.inner = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim

        self.in_proj = nn.Linear(config.hidden_size, self.inner + self.conv_dim + self.n_heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim, bias=config.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.inner, config.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=config.use_bias)
        self._config = config

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise A, D and dt_bias as Mamba-2 does (dt log-uniform in [time_step_min, time_step_max])."""
        config = self._config
        self.A_log.copy_(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        low, high = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(self.n_heads, generator=generator) * (high - low) + low).clamp(min=config.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def empty_state(self, batch: int, dtype: torch.dtype, device: torch.device | str) -> MambaState:
        conv = torch.zeros(batch, self.conv_dim, self.conv_kernel - 1, dtype=dtype, device=device)
        ssm = torch.zeros(batch, self.n_heads, self.head_dim, self.state_size, dtype=torch.float32, device=device)
        return MambaState(conv, ssm)

    def _depthwise_conv(self, window: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv of ``window`` (B, D, K-1+L) -> (B, D, L), without padding."""
        if window.shape[-1] - (self.conv_kernel - 1) <= 64:
            # For up to a block of tokens (decoding, denoiser blocks, short chunks) a multiply-add
            # over K taps beats the conv kernel's setup cost several times over on CPU.
            # Accumulating in fp32 keeps bf16 models as accurate as the conv kernel.
            taps = window.unfold(-1, self.conv_kernel, 1).float()  # (B, D, L, K)
            out = (taps * self.conv1d.weight[:, 0, None, :].float()).sum(-1)
            if self.conv1d.bias is not None:
                out = out + self.conv1d.bias[:, None].float()
            return out.to(window.dtype)
        return F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)

    def forward(
        self,
        hidden: torch.Tensor,
        state: MambaState | None = None,
        pad_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
        return_previous: bool = False,
        scan: str = "chunked",
        return_states_at: list[int] | None = None,
        return_state: bool = True,
    ) -> MambaOutput:
        """Mix ``hidden`` (B, L, H) starting from ``state`` (zeros when ``None``).

        ``pad_mask`` (B, L), True on real tokens: padded positions feed zeros to the conv and use
        dt = 0, so they leave both states untouched. ``return_previous`` also returns the state one
        token before the end. ``return_states_at`` also returns both states after each listed
        position (chunked scan only). ``scan="sequential"`` runs the slow reference recurrence.
        ``return_state=False`` (the denoiser, which only reads its seed) skips the new state, and an
        input no longer than one chunk then takes a shorter scan.
        """
        batch, length, _ = hidden.shape
        if state is None:
            state = self.empty_state(batch, hidden.dtype, hidden.device)

        z, xBC, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.n_heads], dim=-1)
        if pad_mask is not None:
            xBC = xBC * pad_mask[..., None].to(xBC.dtype)

        # Causal depthwise conv over [conv history | new inputs]; the history is the conv state.
        window = torch.cat([state.conv.to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)  # (B, D, K-1+L)
        xBC = F.silu(self._depthwise_conv(window)).transpose(1, 2)
        new_conv = window[..., -(self.conv_kernel - 1) :]
        previous_conv = window[..., -self.conv_kernel : -1] if return_previous else None

        x, B, C = xBC.split([self.inner, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)
        x = x.unflatten(-1, (self.n_heads, self.head_dim))  # (B, L, nh, P)
        B = B.unflatten(-1, (self.n_groups, self.state_size))  # (B, L, G, N)
        C = C.unflatten(-1, (self.n_groups, self.state_size))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        low, high = self.time_step_limit
        if low > 0.0 or high != math.inf:
            dt = dt.clamp(min=low, max=high)
        if pad_mask is not None:
            dt = dt * pad_mask[..., None]
        A = -torch.exp(self.A_log.float())

        previous_ssm = None
        if scan == "sequential":
            y, new_ssm = ssd_sequential(x, dt, A, B, C, initial_state=state.ssm)
            if return_previous:
                previous_ssm = state.ssm if length == 1 else ssd_sequential(
                    x[:, :-1], dt[:, :-1], A, B[:, :-1], C[:, :-1], initial_state=state.ssm
                )[1]
        elif length == 1 and return_states_at is None:
            y, new_ssm = ssd_step(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
            y = y[:, None]
            previous_ssm = state.ssm if return_previous else None
        elif (
            not return_state and scan == "chunked" and not return_previous and return_states_at is None
            and length <= (chunk_size or self.chunk_size)
        ):
            y, new_ssm = ssd_block_scan(x, dt, A, B, C, state.ssm), None
        elif scan == "chunked" and not return_previous and return_states_at is None and (
            fused := fused_chunk_scan(x, dt, A, B, C, chunk_size or self.chunk_size, state.ssm)
        ) is not None:
            y, new_ssm = fused
        elif scan == "chunked":
            positions = list(return_states_at or [])
            if return_previous and length >= 2:
                positions.append(length - 2)
            y, new_ssm, at = ssd_chunk_scan(
                x, dt, A, B, C, chunk_size or self.chunk_size, initial_state=state.ssm,
                return_states_at=positions or None,
            )
            if return_previous:
                previous_ssm = at[:, -1] if length >= 2 else state.ssm
        else:
            raise ValueError(f"scan={scan!r} is invalid; expected 'chunked' or 'sequential'")

        y = y + x.float() * self.D.float()[:, None]
        y = self.norm(y.flatten(-2).to(hidden.dtype), z)
        out = self.out_proj(y)
        previous = MambaState(previous_conv, previous_ssm) if return_previous else None
        states_at = None
        if return_states_at is not None:
            if scan != "chunked":
                raise ValueError("return_states_at needs scan='chunked'")
            # After position p the conv state contains raw inputs p-K+2 .. p, which are window[p+1 : p+K].
            index = torch.as_tensor(return_states_at, dtype=torch.long, device=window.device)
            offsets = index[:, None] + 1 + torch.arange(self.conv_kernel - 1, device=window.device)[None]
            conv_at = window[:, :, offsets].permute(0, 2, 1, 3)  # (B, M, D, K-1)
            states_at = MambaState(conv_at, at[:, : len(return_states_at)])
        new_state = MambaState(new_conv, new_ssm) if return_state else None
        return MambaOutput(out, new_state, previous, states_at)
