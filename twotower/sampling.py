"""Token selection shared by every generation mode: temperature, top-k, top-p, Gumbel-max sampling.

All functions work on fp32 logits (B, ..., V), take an optional ``torch.Generator`` and never loop
over batch rows.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` for a sampling argument outside its allowed range."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a finite number >= 0 (0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} is invalid: expected an integer >= 0 (0 or None disables it)")
    if top_p is not None and not (_is_number(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} is invalid: expected a number in (0, 1]")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_token_ids(name: str, value, vocab_size: int) -> list[int]:
    """Return ``value`` (None, an id, or a list of ids) as a list, or raise ``ValueError`` naming ``name``."""
    if value is None:
        return []
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        ids = list(ids)
    except TypeError:
        raise ValueError(f"{name}={value!r} is invalid: expected a token id or a list of token ids") from None
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise ValueError(f"{name}={value!r} is invalid: expected token ids in [0, vocab_size={vocab_size})")
    return ids


def suppress_tokens(logits: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
    """Set the logits of ``token_ids`` to -inf so they can never be chosen."""
    if token_ids is None or token_ids.numel() == 0:
        return logits
    return logits.index_fill(-1, token_ids.to(logits.device), NEG_INF)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits and the smallest set whose probability reaches ``top_p``."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def gumbel_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the CPU when the generator lives there, so a seed gives the same tokens on any device.
    gen_device = generator.device if generator is not None else device
    uniform = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
    uniform = uniform.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - 1e-7)
    return (-torch.log(-torch.log(uniform))).to(device)


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return token ids (logits.shape[:-1]): argmax at temperature 0, else Gumbel-max on the tempered,
    filtered distribution (an exact sample from it)."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = filter_top_k_top_p(logits.float() / temperature, top_k, top_p)
    return (scores + gumbel_noise(scores.shape, scores.device, generator)).argmax(-1)


def make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``, or the given one; passing both is an error."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is None:
        return generator
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed={seed!r} is invalid: expected an integer in [-2**63, 2**64)")
    return torch.Generator(device="cpu").manual_seed(seed)
