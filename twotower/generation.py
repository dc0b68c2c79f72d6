"""Plain autoregressive generation, and the result and streaming types every mode shares.

Generation functions are Python generators underneath: ``stream_*`` yields ``TokenChunk`` events as
tokens are committed, and ``generate_*`` runs the same loop to the end and returns a
``GenerationOutput``. Both accept a Hugging Face style ``streamer`` (``put``/``end``).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from twotower.sampling import check_sampling_args, check_token_ids, make_generator, sample_from_logits, suppress_tokens

STOP, LENGTH = "stop", "length"


@dataclass
class GenerationStats:
    """Counters and wall times of one generation call (seconds)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    context_passes: int = 0  # context-tower forwards after the prefill
    denoiser_passes: int = 0
    row_passes: int = 0  # sum over passes (denoiser, or context in plain AR) of the rows still generating
    blocks: int = 0
    prefill_s: float = 0.0
    context_s: float = 0.0
    denoise_s: float = 0.0
    sampling_s: float = 0.0
    total_s: float = 0.0
    passes_per_block: list[int] = field(default_factory=list)

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per row and pass: up to the block size in mask diffusion, 1 in AR modes."""
        return self.generated_tokens / self.row_passes if self.row_passes else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["tokens_per_pass"] = self.tokens_per_pass
        out["tokens_per_second"] = self.tokens_per_second
        return out


@dataclass
class GenerationOutput:
    """``sequences`` (B, prompt + new): the prompt as given, then generated tokens, padding after EOS."""

    sequences: torch.Tensor
    prompt_length: int
    finish_reasons: list[str]
    stats: GenerationStats
    pad_token_id: int

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    def new_token_lists(self) -> list[list[int]]:
        """Generated ids per row, EOS included, padding after it dropped."""
        rows = []
        for row, reason in zip(self.new_tokens.tolist(), self.finish_reasons):
            if reason == STOP:
                # The row stopped at its first EOS; the tokens after it are padding.
                rows.append(row[: self._stop_index[len(rows)] + 1])
            else:
                rows.append(row)
        return rows

    _stop_index: list[int] = field(default_factory=list, repr=False)


@dataclass
class TokenChunk:
    """Tokens committed in one step (AR) or one block (diffusion); ``tokens[r]`` may be empty."""

    tokens: list[list[int]]
    finished: list[bool]

    @classmethod
    def from_token_step(
        cls, tokens: torch.Tensor, finished_before: torch.Tensor, finished: torch.Tensor
    ) -> TokenChunk:
        """Build the chunk of one AR step from ``tokens`` (B,); rows in ``finished_before`` get no token."""
        rows = [[token] if not done else [] for token, done in zip(tokens.tolist(), finished_before.tolist())]
        return cls(rows, finished.tolist())


def prepare_prompt(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a (left-padded) prompt batch; return (input_ids (B, L), attention_mask or None)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        dtype = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids of type {dtype} is invalid: expected an integer torch.Tensor (int64, int32, ...) of shape (batch, length)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, length) with length >= 1 (an empty prompt has nothing to condition on)")
    input_ids = input_ids.long()
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise ValueError(f"input_ids contains ids outside [0, vocab_size={vocab_size})")
    if attention_mask is None:
        return input_ids, None
    attention_mask = attention_mask.to(input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(input_ids.shape)} like input_ids")
    mask = attention_mask.bool()
    if (mask[:, 1:].int() < mask[:, :-1].int()).any():
        raise ValueError("attention_mask must describe left padding (zeros, then ones); right padding is not supported")
    if not mask[:, -1].all():
        raise ValueError("attention_mask has a row with no tokens: every prompt needs at least one token")
    return input_ids, (None if mask.all() else mask.long())


def check_generation_args(max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 1")


def eos_tensor(eos_token_id: int | list[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def commit_step_tokens(
    tokens: torch.Tensor, finished: torch.Tensor, eos: torch.Tensor | None, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit one sampled token per row in an AR-style loop.

    Rows that finished at an earlier step get ``pad_token_id``, and rows whose token is in ``eos``
    finish now. Returns (tokens, finished after this step) without changing ``finished`` in place.
    """
    tokens = tokens.masked_fill(finished, pad_token_id)
    if eos is not None:
        finished = finished | torch.isin(tokens, eos)
    return tokens, finished


def finish(
    prompt: torch.Tensor,
    generated: torch.Tensor,
    eos: torch.Tensor | None,
    pad_token_id: int,
    stats: GenerationStats,
) -> GenerationOutput:
    """Replace tokens after each row's first EOS by padding and record the finish reasons."""
    reasons, stop_index = [], []
    if eos is not None and generated.numel():
        is_eos = torch.isin(generated, eos)
        has_eos = is_eos.any(-1)
        first = torch.where(has_eos, is_eos.int().argmax(-1), generated.shape[1])
        after = torch.arange(generated.shape[1], device=generated.device)[None] > first[:, None]
        generated = generated.masked_fill(after, pad_token_id)
        reasons = [STOP if h else LENGTH for h in has_eos.tolist()]
        stop_index = first.tolist()
    else:
        reasons = [LENGTH] * generated.shape[0]
        stop_index = [generated.shape[1]] * generated.shape[0]
    stats.generated_tokens = int(sum(min(i + 1, generated.shape[1]) for i in stop_index))
    output = GenerationOutput(torch.cat([prompt, generated], dim=1), prompt.shape[1], reasons, stats, pad_token_id)
    output._stop_index = stop_index
    return output


def drive(steps: Generator[TokenChunk, None, GenerationOutput], streamer: Any = None, prompt: torch.Tensor | None = None) -> GenerationOutput:
    """Run a generation loop to the end, feeding ``streamer`` (prompt first, as transformers does)."""
    if streamer is not None and prompt is not None:
        streamer.put(prompt.cpu())
    while True:
        try:
            chunk = next(steps)
        except StopIteration as stop:
            if streamer is not None:
                streamer.end()
            return stop.value
        if streamer is not None:
            # Hugging Face streamers take one row; batched callers should use the iterator instead.
            streamer.put(torch.tensor(chunk.tokens[0], dtype=torch.long))


def _ar_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    generator: torch.Generator | None,
    suppress_token_ids: list[int] | None,
) -> Generator[TokenChunk, None, GenerationOutput]:
    start = time.perf_counter()
    device = model.device
    input_ids = input_ids.to(device)
    batch, prompt_length = input_ids.shape
    stats = GenerationStats(prompt_tokens=int(attention_mask.sum()) if attention_mask is not None else input_ids.numel())
    eos = eos_tensor(eos_token_id, device)
    suppress = torch.tensor(suppress_token_ids, dtype=torch.long, device=device) if suppress_token_ids else None

    cache = model.new_cache(batch, capacity=prompt_length + max_new_tokens)
    with torch.inference_mode():
        logits = model(input_ids, cache=cache, attention_mask=attention_mask, logits_to_keep=1)[:, -1]
    stats.prefill_s = time.perf_counter() - start

    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        logits = suppress_tokens(logits, suppress)
        tokens = sample_from_logits(logits, temperature, top_k, top_p, generator)
        stats.row_passes += int((~finished).sum())
        finished_before = finished
        tokens, finished = commit_step_tokens(tokens, finished, eos, pad_token_id)
        generated[:, step] = tokens
        stats.sampling_s += time.perf_counter() - t0

        yield TokenChunk.from_token_step(tokens, finished_before, finished)
        if bool(finished.all()) or step == max_new_tokens - 1:
            generated = generated[:, : step + 1]
            break

        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(tokens[:, None], cache=cache, logits_to_keep=1)[:, -1]
        stats.context_passes += 1
        stats.context_s += time.perf_counter() - t0

    stats.total_s = time.perf_counter() - start
    return finish(input_ids, generated, eos, pad_token_id, stats)


def stream_ar(model, input_ids: torch.Tensor, **kwargs: Any) -> Iterator[TokenChunk]:
    """Yield a ``TokenChunk`` per decoded token; the final ``GenerationOutput`` is the StopIteration value."""
    return (yield from _ar_generator(model, input_ids, **kwargs))


def _ar_generator(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    suppress_token_ids: list[int] | None = None,
) -> Generator[TokenChunk, None, GenerationOutput]:
    check_generation_args(max_new_tokens)
    check_sampling_args(temperature, top_k, top_p)
    input_ids, attention_mask = prepare_prompt(input_ids, attention_mask, model.config.vocab_size)
    eos_token_id = check_token_ids("eos_token_id", eos_token_id, model.config.vocab_size) or None
    suppress_token_ids = check_token_ids("suppress_token_ids", suppress_token_ids, model.config.vocab_size)
    if len(set(suppress_token_ids)) >= model.config.vocab_size:
        raise ValueError("suppress_token_ids covers the whole vocabulary: no token is left to generate")
    if not do_sample:
        temperature = 0.0
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    return (yield from _ar_steps(
        model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad,
        make_generator(seed, generator), suppress_token_ids,
    ))


def generate_ar(
    model,
    input_ids: torch.Tensor,
    streamer: Any = None,
    return_dict_in_generate: bool = False,
    **kwargs: Any,
) -> torch.Tensor | GenerationOutput:
    """Cached AR generation with ``model`` (a ``NemotronHForCausalLM`` or anything with its interface).

    Arguments follow transformers' ``generate``: ``attention_mask`` (left padding), ``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id`` (an id or a list),
    ``pad_token_id``, ``streamer``; plus ``seed``/``generator`` and ``suppress_token_ids``. Each row
    stops at its first EOS; later positions hold ``pad_token_id``. Returns the sequences (B, prompt
    + new), or the full ``GenerationOutput`` when ``return_dict_in_generate``.
    """
    output = drive(_ar_generator(model, input_ids, **kwargs), streamer, prompt=input_ids)
    return output if return_dict_in_generate else output.sequences
