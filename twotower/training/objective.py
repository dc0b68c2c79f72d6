"""The stage-2 training objective of the denoiser tower, computed for all blocks in one pass.

A clean sequence of ``n_blocks * S`` tokens runs once through the frozen context tower (no grad),
which yields, per layer, the K/V of every position and the Mamba conv/SSM states at every block
boundary. The noisy sequence then runs once through the denoiser:

* attention: queries of block b attend to the context K/V of blocks ``< b`` (same layer) and the
  denoiser's own K/V of block b, bidirectionally; block 0 sees no context;
* Mamba: each block is a separate scan (chunk size = S) seeded with the context tower's conv and
  SSM state after block b - 1 (zeros for block 0);
* the loss is the cross-entropy over masked positions divided by their count (no 1/t weight).

This is exactly what the inference denoiser computes block by block against a context cache, which
the tests check to 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twotower.config import ATTENTION, MAMBA
from twotower.layers.mamba2 import MambaState

T_MIN = 1e-3


@dataclass
class ContextFeatures:
    """Context-tower outputs the denoiser reads, keyed by layer index."""

    keys: dict[int, torch.Tensor]  # (B, n_kv, L, P)
    values: dict[int, torch.Tensor]
    block_states: dict[int, MambaState]  # conv (B, n_blocks, D, K-1), ssm (B, n_blocks, nh, P, N): seeds


def _check_blocks(length: int, block_size: int) -> int:
    if block_size < 1 or length % block_size:
        raise ValueError(
            f"sequence length {length} must be a positive multiple of block_size={block_size} for training"
        )
    return length // block_size


@torch.no_grad()
def context_features(model, input_ids: torch.Tensor, block_size: int) -> ContextFeatures:
    """Run the context tower over clean ``input_ids`` (B, L) and collect the denoiser's inputs."""
    tower = model.context_tower
    batch, length = input_ids.shape
    n_blocks = _check_blocks(length, block_size)
    boundaries = [b * block_size - 1 for b in range(1, n_blocks)]  # state after block b-1 seeds block b

    keys, values, seeds = {}, {}, {}
    x = tower.embeddings(input_ids)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    for i, layer in enumerate(tower.layers):
        h = layer.norm(x)
        if layer.block_type == MAMBA:
            out = layer.mixer(h, return_states_at=boundaries or None)
            empty = layer.mixer.empty_state(batch, h.dtype, h.device)
            conv, ssm = empty.conv[:, None], empty.ssm[:, None]
            if boundaries:
                conv = torch.cat([conv, out.states_at.conv], dim=1)
                ssm = torch.cat([ssm, out.states_at.ssm], dim=1)
            seeds[i] = MambaState(conv, ssm)
            h = out.hidden
        elif layer.block_type == ATTENTION:
            q, k, v = layer.mixer.project(h)
            keys[i], values[i] = k, v
            h = layer.mixer.attend(q, k, v, causal)
        else:
            h = layer.mixer(h)
        x = x + h
    return ContextFeatures(keys, values, seeds)


def block_causal_mask(length: int, block_size: int, device) -> torch.Tensor:
    """Build the (L, 2L) mask over [context keys | denoiser keys]: block b attends to context blocks < b and to itself."""
    block_of = torch.arange(length, device=device) // block_size
    sees_context = block_of[None, :] < block_of[:, None]
    sees_own_block = block_of[None, :] == block_of[:, None]
    return torch.cat([sees_context, sees_own_block], dim=1)


def denoiser_training_logits(
    model, noisy_ids: torch.Tensor, t: torch.Tensor | None, context: ContextFeatures, block_size: int
) -> torch.Tensor:
    """Denoiser logits (B, L, V) for every block of ``noisy_ids`` in one pass; ``t`` (B,) or None."""
    batch, length = noisy_ids.shape
    n_blocks = _check_blocks(length, block_size)
    mask = block_causal_mask(length, block_size, noisy_ids.device)
    embedding = model.time_embedding(t, batch)

    x = model.denoiser_tower.embeddings(noisy_ids)
    for i, layer in enumerate(model.denoiser_tower.layers):
        if layer.block_type == MAMBA:
            def mixer(h, layer=layer, seed=context.block_states[i]):
                blocks = h.reshape(batch * n_blocks, block_size, h.shape[-1])
                state = MambaState(seed.conv.flatten(0, 1), seed.ssm.flatten(0, 1))
                out = layer.mixer(blocks, state, chunk_size=block_size).hidden
                return out.reshape(batch, length, -1)
        elif layer.block_type == ATTENTION:
            def mixer(h, layer=layer, ctx_k=context.keys[i], ctx_v=context.values[i]):
                q, k, v = layer.mixer.project(h)
                return layer.mixer.attend(q, torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2), mask)
        else:
            mixer = layer.mixer
        x = model.denoiser_layer(layer, x, embedding, mixer)
    return model.lm_head(model.denoiser_tower.norm_f(x)).float()


def sample_noise(
    input_ids: torch.Tensor, mask_token_id: int, generator: torch.Generator | None = None, t_min: float = T_MIN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one ``t ~ U[t_min, 1]`` per sequence and mask each token independently with probability t.

    Returns (noisy_ids, masked (B, L) bool, t (B,)). Random numbers come from ``generator`` on the CPU,
    so a seed fixes the noise on any device.
    """
    batch, length = input_ids.shape
    t = t_min + (1.0 - t_min) * torch.rand(batch, generator=generator)
    masked = torch.rand(batch, length, generator=generator) < t[:, None]
    t, masked = t.to(input_ids.device), masked.to(input_ids.device)
    return input_ids.masked_fill(masked, mask_token_id), masked, t


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over masked positions divided by their count (0 when nothing is masked)."""
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    weights = masked.flatten().to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def diffusion_loss(
    model, input_ids: torch.Tensor, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Compute the stage-2 loss on clean ``input_ids`` (B, L): noise, one context pass, one denoiser pass."""
    noisy, masked, t = sample_noise(input_ids, model.config.mask_token_id, generator)
    context = context_features(model, input_ids, block_size)
    logits = denoiser_training_logits(model, noisy, t, context, block_size)
    loss = masked_cross_entropy(logits, input_ids, masked)
    return loss, {"masked_tokens": float(masked.sum()), "t_mean": float(t.mean())}


def mock_ar_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The auxiliary mock-AR objective: clean single-token blocks, no time conditioning, next-token labels.

    Block n holds token n; it sees the context K/V of tokens < n and the Mamba state after token n-1,
    which is what mock-AR inference feeds the denoiser. The logit at n predicts token n + 1.
    """
    context = context_features(model, input_ids, block_size=1)
    logits = denoiser_training_logits(model, input_ids, None, context, block_size=1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
