"""The Mamba-2 state-space scan (SSD) in pure PyTorch: chunked, sequential reference, one step.

For each head h the recurrence over positions t is

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * outer(x_t, B_t)      state: (P, N)
    y_t     = state_t @ C_t

The chunked form computes it in blocks of ``chunk_size`` positions with matrix products: exact within
a chunk (a masked decay matrix) and a short recurrence over chunk boundary states. Everything runs in
fp32: a bf16 scan seeded from a large state overflows.

Shapes: x (B, L, nh, P), dt (B, L, nh), A (nh,), B and C (B, L, G, N), state (B, nh, P, N).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange, repeat


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """Return ``out[..., i, j] = x[..., j+1] + ... + x[..., i]`` for ``i >= j`` and ``-inf`` above the diagonal.

    Summing the masked, repeated input (rather than subtracting two cumulative sums) keeps the
    decays exact when the cumulative sums are large.
    """
    length = x.size(-1)
    above_or_on_diagonal, above_diagonal = _triangle_masks(length, x.device)
    x = repeat(x, "... l -> ... l m", m=length)
    x = x.masked_fill(above_or_on_diagonal, 0.0)
    sums = x.cumsum(dim=-2)
    return sums.masked_fill(above_diagonal, float("-inf"))


@functools.lru_cache(maxsize=64)
def _triangle_masks(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (length, device): rebuilding them took a tenth of a short scan's time. They are
    # made outside inference mode so that training, which autograd tracks, may use them too.
    with torch.inference_mode(False):
        ones = torch.ones(length, length, dtype=torch.bool, device=device)
        return ~ones.tril(-1), ~ones.tril()


def _heads_per_group(B: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Consecutive blocks of n_heads / G heads share one B/C group.
    return B.repeat_interleave(n_heads // B.shape[2], dim=2)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    return_states_at: torch.Tensor | list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the chunked scan; return ``(y, final_state, states_at)``.

    ``states_at`` (B, M, nh, P, N) holds the state after each position listed in ``return_states_at``
    (positions index the L input tokens), or ``None`` when no positions were asked for.
    """
    batch, length, n_heads, head_dim = x.shape
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid: expected a positive integer")
    # The chunk size changes only how the work is split, not the result, so a short input (such as
    # a 16-token denoiser block) is one chunk of its own length instead of being padded.
    chunk_size = min(chunk_size, length)
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    A = A.float()
    B = _heads_per_group(B, n_heads)
    C = _heads_per_group(C, n_heads)

    # Padding with dt = 0 leaves the state untouched (decay exp(0) = 1, input dt * x = 0).
    pad = (-length) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))

    x, B, C = (rearrange(t, "b (c l) h d -> b c l h d", l=chunk_size) for t in (x, B, C))
    dt = rearrange(dt, "b (c l) h -> b h c l", l=chunk_size)
    x_dt = x * rearrange(dt, "b h c l -> b c l h 1")
    dA = dt * A[:, None, None]  # (B, nh, chunks, l)
    dA_cumsum = dA.cumsum(-1)

    # 1. Outputs from inputs of the same chunk (the quadratic, attention-like part).
    decay = torch.exp(segment_sum(dA))  # (B, nh, chunks, l, l)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, x_dt)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x_dt)

    # 3. Recurrence over chunk boundaries, starting from the initial state.
    if initial_state is None:
        initial_state = torch.zeros(batch, n_heads, head_dim, B.shape[-1], dtype=torch.float32, device=x.device)
    chunk_states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)
    chunk_decay = torch.exp(segment_sum(F.pad(dA_cumsum[..., -1], (1, 0))))  # (B, nh, chunks+1, chunks+1)
    boundary_states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)
    start_states, final_state = boundary_states[:, :-1], boundary_states[:, -1]

    # 4. Outputs from the state carried into each chunk.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, start_states, torch.exp(dA_cumsum))
    y = rearrange(y_diag + y_off, "b c l h p -> b (c l) h p")[:, :length]

    states_at = None
    if return_states_at is not None:
        positions = torch.as_tensor(return_states_at, dtype=torch.long, device=x.device)
        if positions.numel() and (positions.min() < 0 or positions.max() >= length):
            raise ValueError(f"return_states_at={positions.tolist()} is invalid: positions must lie in [0, {length})")
        states_at = _states_at_positions(positions, chunk_size, dA_cumsum, B, x_dt, start_states)
    return y, final_state, states_at


def ssd_block_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
) -> torch.Tensor:
    """Return only the outputs y (B, L, nh, P) of a short input scanned as one chunk from ``initial_state``.

    A denoiser pass needs the outputs of its block but never the state after it, so this skips the
    chunk-state and boundary steps of ``ssd_chunk_scan`` and forms C·B once per group instead of per
    head. The result equals ``ssd_chunk_scan`` with a chunk as long as the input.
    """
    n_heads, groups = x.shape[2], B.shape[2]
    x, dt, B, C, A = x.float(), dt.float(), B.float(), C.float(), A.float()

    dA = (dt * A).transpose(1, 2)  # (B, nh, L)
    decay = torch.exp(segment_sum(dA))  # (B, nh, L, L), zero above the diagonal
    scores = torch.einsum("blgn,bsgn->bgls", C, B).repeat_interleave(n_heads // groups, dim=1)
    x_dt = (x * dt[..., None]).transpose(1, 2)  # (B, nh, L, P)
    y = torch.matmul(scores * decay, x_dt).transpose(1, 2)  # (B, L, nh, P)

    # The state carried in, decayed to each position and read out through C.
    state = initial_state.float().unflatten(1, (groups, n_heads // groups))  # (B, G, nh/G, P, N)
    carried = torch.einsum("blgn,bgrpn->blgrp", C, state).flatten(2, 3)  # (B, L, nh, P)
    return y + carried * torch.exp(dA.cumsum(-1)).transpose(1, 2)[..., None]


def _states_at_positions(positions, chunk_size, dA_cumsum, B, x_dt, start_states) -> torch.Tensor:
    """State after each position: the chunk's start state decayed, plus the chunk's inputs so far."""
    chunk, offset = positions // chunk_size, positions % chunk_size
    cumsum = dA_cumsum[:, :, chunk]  # (B, nh, M, l)
    at_offset = cumsum.gather(-1, offset.view(1, 1, -1, 1).expand(*cumsum.shape[:3], 1))  # (B, nh, M, 1)
    steps = torch.arange(chunk_size, device=positions.device)
    upto = (steps[None, :] <= offset[:, None])  # (M, l)
    weights = torch.exp((at_offset - cumsum).masked_fill(~upto, float("-inf")))
    inputs = torch.einsum("bmlhn,bhml,bmlhp->bmhpn", B[:, chunk], weights, x_dt[:, chunk])
    carried = torch.exp(at_offset[..., 0]).transpose(1, 2)[..., None, None] * start_states[:, chunk]
    return carried + inputs


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the recurrence by one token; x (B, nh, P), dt (B, nh), B/C (B, G, N). Return (y, state)."""
    n_heads = x.shape[1]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    B = B.repeat_interleave(n_heads // B.shape[1], dim=1)  # (B, nh, N)
    C = C.repeat_interleave(n_heads // C.shape[1], dim=1)
    decay = torch.exp(dt * A.float())  # (B, nh)
    state = state.float() * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y, state


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: the recurrence one position at a time. Return (y, final_state)."""
    batch, length, n_heads, head_dim = x.shape
    state = initial_state
    if state is None:
        state = torch.zeros(batch, n_heads, head_dim, B.shape[-1], dtype=torch.float32, device=x.device)
    outputs = []
    for t in range(length):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        outputs.append(y)
    return torch.stack(outputs, dim=1), state
