"""Two-tower generation: block-wise mask diffusion (the flagship) and mock-AR.

Mask diffusion, per block of S positions that start as the mask token, for at most T steps:

1. ``t`` = each row's masked fraction of the block (per row; the reference averaged it over the batch);
2. denoiser logits, with the mask token (and any suppressed ids) forbidden;
3. a prediction per position (argmax at temperature 0, else Gumbel-max on the tempered, filtered
   distribution) and its confidence: the untempered probability of the predicted token;
   already committed positions keep their token;
4. commit ``k`` positions per row (``commit_counts``): the masked positions above the confidence
   threshold, at least one, at least ``ceil(masked / (T - step))`` so the block finishes in T steps;
5. once no mask is left, extend the context tower by the block in one causal pass.

Every rule is a small function over the whole batch; no Python loop runs over rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from twotower.generation import (
    GenerationOutput,
    GenerationStats,
    TokenChunk,
    check_generation_args,
    commit_step_tokens,
    drive,
    eos_tensor,
    finish,
    prepare_prompt,
)
from twotower.sampling import check_sampling_args, check_token_ids, filter_top_k_top_p, gumbel_noise, make_generator, suppress_tokens

NEG_INF = float("-inf")


# ---------------------------------------------------------------------- sampler rules


def commit_counts(
    confidence: torch.Tensor, masked: torch.Tensor, threshold: float, step: int, steps: int
) -> torch.Tensor:
    """How many masked positions each row commits at ``step`` (0-based) of ``steps``; returns (B,).

    ``max(#masked above threshold, 1)``, raised to ``ceil(masked / (steps - step))`` so that the
    block finishes within ``steps`` passes, capped at the number masked. The last step therefore
    commits every remaining position.
    """
    n_masked = masked.sum(-1)
    above = ((confidence > threshold) & masked).sum(-1)
    floor = torch.div(n_masked + (steps - step) - 1, steps - step, rounding_mode="floor")
    k = torch.maximum(above.clamp(min=1), floor)
    return torch.minimum(k, n_masked)


def select_commits(confidence: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean (B, S): the ``counts[b]`` most confident masked positions of each row."""
    scores = confidence.masked_fill(~masked, NEG_INF)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < counts[:, None]) & masked


def predict(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (predicted ids, confidence), both (B, S), from constrained fp32 logits (B, S, V)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
    else:
        scores = filter_top_k_top_p(logits / temperature, top_k, top_p)
        tokens = (scores + gumbel_noise(scores.shape, scores.device, generator)).argmax(-1)
    # p(token) = exp(logit - logsumexp): no full (B, S, V) log-softmax tensor is built.
    chosen = logits.gather(-1, tokens[..., None])[..., 0]
    confidence = (chosen - logits.logsumexp(-1)).exp()
    return tokens, confidence


@dataclass
class DenoiseStep:
    """One denoiser pass, for live views and traces: rows are the ones still generating."""

    block_index: int
    step: int
    rows: list[int]  # original batch rows that ran this pass (a row leaves once its block is complete)
    block: torch.Tensor  # (B_active, S) tokens after this step (mask id where still masked)
    committed_now: torch.Tensor  # (B_active, S) positions committed in this step
    confidence: torch.Tensor  # (B_active, S) confidence of each masked position's prediction (committed ones may hold 0)


# ---------------------------------------------------------------------- shared setup


def _check_two_tower_args(model, mask_token_id: int, block_size: int, steps_per_block: int, threshold: float) -> None:
    vocab = model.config.vocab_size
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is invalid: expected an integer >= 1")
    if not isinstance(steps_per_block, int) or isinstance(steps_per_block, bool) or steps_per_block < 1:
        raise ValueError(f"steps_per_block={steps_per_block!r} is invalid: expected an integer >= 1")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"confidence_threshold={threshold!r} is invalid: expected a number in [0, 1]")
    _check_mask_token_id(mask_token_id, vocab)


def _check_mask_token_id(mask_token_id, vocab_size: int) -> None:
    if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool) or not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask_token_id={mask_token_id!r} is invalid: expected a token id in [0, vocab_size={vocab_size})"
        )


def _suppressed_ids(mask_token_id: int, suppress_token_ids, vocab_size: int, device) -> torch.Tensor:
    ids = sorted({mask_token_id, *check_token_ids("suppress_token_ids", suppress_token_ids, vocab_size)})
    if len(ids) >= vocab_size:
        raise ValueError("suppress_token_ids and mask_token_id cover the whole vocabulary: no token is left to generate")
    return torch.tensor(ids, dtype=torch.long, device=device)


# ---------------------------------------------------------------------- mask diffusion


def _mask_diffusion_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    block_size: int,
    steps_per_block: int,
    mask_token_id: int,
    temperature: float,
    confidence_threshold: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id,
    pad_token_id: int,
    generator: torch.Generator | None,
    suppress: torch.Tensor,
    on_step: Callable[[DenoiseStep], None] | None,
) -> Generator[TokenChunk, None, GenerationOutput]:
    start = time.perf_counter()
    ctx_device, den_device = model.context_device, model.denoiser_device
    batch, prompt_length = input_ids.shape
    stats = GenerationStats(prompt_tokens=int(attention_mask.sum()) if attention_mask is not None else input_ids.numel())
    eos = eos_tensor(eos_token_id, den_device)

    cache = model.new_cache(batch, capacity=prompt_length + max_new_tokens)
    with torch.inference_mode():
        model.extend_context(input_ids.to(ctx_device), cache, attention_mask=attention_mask)
    stats.prefill_s = time.perf_counter() - start

    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=den_device)
    active = torch.arange(batch, device=den_device)  # original rows still generating
    produced = 0
    block_index = 0
    while produced < max_new_tokens and active.numel():
        size = min(block_size, max_new_tokens - produced)
        n_rows = active.numel()
        block = torch.full((n_rows, size), mask_token_id, dtype=torch.long, device=den_device)
        masked = torch.ones(n_rows, size, dtype=torch.bool, device=den_device)
        context = model.prepare_context(cache, size)

        # Rows whose block is already complete leave the passes of this block: their results could
        # not change, and on a CPU every row costs compute. ``running`` indexes the rows of ``block``.
        running = torch.arange(n_rows, device=den_device)
        running_context = context
        # The head reads only the first ``heads`` positions of each row after sorting masked ones
        # first: as many as the most masked row still has, so every masked position is among them.
        heads = size
        passes = 0
        for step in range(steps_per_block):
            t0 = time.perf_counter()
            run_block, run_masked = block[running], masked[running]
            t = run_masked.sum(-1).float() / size  # per-row masked fraction
            positions = None
            if heads < size:
                positions = torch.argsort((~run_masked).to(torch.int8), dim=-1, stable=True)[:, :heads]
            with torch.inference_mode():
                logits = model.denoise(run_block, running_context, t, positions=positions)
                logits.index_fill_(-1, suppress, NEG_INF)  # the fresh logits may be changed in place
            passes += 1
            stats.row_passes += running.numel()
            t1 = time.perf_counter()
            stats.denoise_s += t1 - t0

            tokens, confidence = predict(logits, temperature, top_k, top_p, generator)
            if positions is not None:
                # Back to block positions; committed positions keep their token and get confidence 0.
                tokens = run_block.scatter(1, positions, tokens)
                confidence = confidence.new_zeros(run_block.shape).scatter(1, positions, confidence)
            counts = commit_counts(confidence, run_masked, confidence_threshold, step, steps_per_block)
            commit = select_commits(confidence, run_masked, counts)
            run_block = torch.where(commit, tokens, run_block)
            run_masked = run_masked & ~commit
            block[running] = run_block
            masked[running] = run_masked
            stats.sampling_s += time.perf_counter() - t1
            if on_step is not None:
                on_step(DenoiseStep(block_index, step, active[running].tolist(), run_block.clone(), commit, confidence))

            # One host sync per step reads how many rows still have masks and the most masks left in
            # a row. Another one, only when a row finishes, builds the index of the rows that go on.
            unfinished = run_masked.any(-1)
            still_running, heads = torch.stack([unfinished.sum(), run_masked.sum(-1).max()]).tolist()
            if still_running == 0:
                break
            if still_running < running.numel():
                running = running[unfinished]
                running_context = context.select_rows(running)
        stats.denoiser_passes += passes
        stats.passes_per_block.append(passes)
        stats.blocks += 1

        generated[active, produced : produced + size] = block
        produced += size
        block_index += 1

        # Rows that committed EOS stop here; tokens after their EOS become padding in finish().
        done = torch.isin(block, eos).any(-1) if eos is not None else torch.zeros(n_rows, dtype=torch.bool, device=den_device)
        chunk_tokens = []
        for row_block, row_done in zip(block.tolist(), done.tolist()):
            if row_done:
                first = next(i for i, tok in enumerate(row_block) if tok in set(eos.tolist()))
                row_block = row_block[: first + 1]
            chunk_tokens.append(row_block)
        per_row = [[] for _ in range(batch)]
        finished = [True] * batch
        for row, tokens_of_row, row_done in zip(active.tolist(), chunk_tokens, done.tolist()):
            per_row[row] = tokens_of_row
            finished[row] = row_done or produced >= max_new_tokens
        yield TokenChunk(per_row, finished)

        if produced >= max_new_tokens:
            break
        keep = ~done
        if not bool(keep.all()):
            keep_idx = keep.nonzero()[:, 0]
            active = active[keep_idx]
            block = block[keep_idx]
            cache.select_rows(keep_idx.to(ctx_device))
        if active.numel():
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.extend_context(block.to(ctx_device), cache)
            stats.context_passes += 1
            stats.context_s += time.perf_counter() - t0

    stats.total_s = time.perf_counter() - start
    return finish(input_ids.to(den_device), generated[:, :produced], eos, pad_token_id, stats)


def stream_mask_diffusion(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 128,
    block_size: int = 16,
    steps_per_block: int = 16,
    mask_token_id: int | None = None,
    temperature: float = 0.0,
    confidence_threshold: float = 0.9,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    suppress_token_ids: list[int] | None = None,
    on_step: Callable[[DenoiseStep], None] | None = None,
) -> Generator[TokenChunk, None, GenerationOutput]:
    """Yield one ``TokenChunk`` per block; the final ``GenerationOutput`` is the StopIteration value.

    Arguments are those of ``generate_mask_diffusion``.
    """
    mask_token_id = model.config.mask_token_id if mask_token_id is None else mask_token_id
    check_generation_args(max_new_tokens)
    check_sampling_args(temperature, top_k, top_p)
    _check_two_tower_args(model, mask_token_id, block_size, steps_per_block, confidence_threshold)
    input_ids, attention_mask = prepare_prompt(input_ids, attention_mask, model.config.vocab_size)
    eos_token_id = check_token_ids("eos_token_id", eos_token_id, model.config.vocab_size) or None
    suppressed = _suppressed_ids(mask_token_id, suppress_token_ids, model.config.vocab_size, model.denoiser_device)
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    return (yield from _mask_diffusion_steps(
        model, input_ids, attention_mask, max_new_tokens, block_size, steps_per_block, mask_token_id,
        float(temperature), float(confidence_threshold), top_k, top_p, eos_token_id, pad,
        make_generator(seed, generator), suppressed, on_step,
    ))


def generate_mask_diffusion(
    model, input_ids: torch.Tensor, streamer: Any = None, return_dict_in_generate: bool = False, **kwargs: Any
) -> torch.Tensor | GenerationOutput:
    """Generate with block-wise mask diffusion.

    Keyword arguments: ``max_new_tokens`` (any value; the last block is shorter when needed),
    ``block_size`` S, ``steps_per_block`` T, ``mask_token_id`` (default: the config's, 3 in the
    release), ``temperature`` (0 = greedy), ``confidence_threshold`` in [0, 1], ``eos_token_id``,
    ``attention_mask`` (left padding), ``top_k``, ``top_p``, ``seed`` or ``generator``,
    ``suppress_token_ids`` (the mask id is always suppressed), ``pad_token_id`` and ``on_step`` (a
    callback receiving a ``DenoiseStep`` after every pass). Returns sequences (B, prompt + new)
    with padding after each row's first EOS, or the ``GenerationOutput`` with finish reasons and
    statistics when ``return_dict_in_generate``.
    """
    output = drive(stream_mask_diffusion(model, input_ids, **kwargs), streamer, prompt=input_ids)
    return output if return_dict_in_generate else output.sequences


# ---------------------------------------------------------------------- mock-AR


def _mock_ar_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id,
    pad_token_id: int,
    generator: torch.Generator | None,
    suppress: torch.Tensor,
) -> Generator[TokenChunk, None, GenerationOutput]:
    start = time.perf_counter()
    ctx_device, den_device = model.context_device, model.denoiser_device
    batch, prompt_length = input_ids.shape
    stats = GenerationStats(prompt_tokens=int(attention_mask.sum()) if attention_mask is not None else input_ids.numel())
    eos = eos_tensor(eos_token_id, den_device)

    # The denoiser reads the context one token back, so the cache keeps the previous Mamba states.
    cache = model.new_cache(batch, capacity=prompt_length + max_new_tokens, track_previous=True)
    with torch.inference_mode():
        model.extend_context(input_ids.to(ctx_device), cache, attention_mask=attention_mask)
    stats.prefill_s = time.perf_counter() - start

    last = input_ids[:, -1:].to(den_device)
    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=den_device)
    finished = torch.zeros(batch, dtype=torch.bool, device=den_device)
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        context = model.prepare_context(cache, 1, context_length=cache.length - 1, mamba_states=cache.mamba_previous)
        with torch.inference_mode():
            logits = model.denoise(last, context, None)
        stats.denoiser_passes += 1
        stats.row_passes += int((~finished).sum())
        t1 = time.perf_counter()
        stats.denoise_s += t1 - t0

        logits = suppress_tokens(logits[:, -1], suppress)
        tokens, _ = predict(logits[:, None], temperature, top_k, top_p, generator)
        finished_before = finished
        tokens, finished = commit_step_tokens(tokens[:, 0], finished, eos, pad_token_id)
        generated[:, step] = tokens
        stats.sampling_s += time.perf_counter() - t1
        yield TokenChunk.from_token_step(tokens, finished_before, finished)
        if bool(finished.all()) or step == max_new_tokens - 1:
            generated = generated[:, : step + 1]
            break

        t0 = time.perf_counter()
        with torch.inference_mode():
            model.extend_context(tokens[:, None].to(ctx_device), cache)
        stats.context_passes += 1
        stats.context_s += time.perf_counter() - t0
        last = tokens[:, None]

    stats.total_s = time.perf_counter() - start
    return finish(input_ids.to(den_device), generated, eos, pad_token_id, stats)


def stream_mock_ar(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    suppress_token_ids: list[int] | None = None,
    mask_token_id: int | None = None,
) -> Generator[TokenChunk, None, GenerationOutput]:
    """Yield one ``TokenChunk`` per token; arguments are those of ``generate_mock_ar``."""
    check_generation_args(max_new_tokens)
    check_sampling_args(temperature, top_k, top_p)
    input_ids, attention_mask = prepare_prompt(input_ids, attention_mask, model.config.vocab_size)
    mask_token_id = model.config.mask_token_id if mask_token_id is None else mask_token_id
    _check_mask_token_id(mask_token_id, model.config.vocab_size)
    eos_token_id = check_token_ids("eos_token_id", eos_token_id, model.config.vocab_size) or None
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    suppress = _suppressed_ids(mask_token_id, suppress_token_ids, model.config.vocab_size, model.denoiser_device)
    return (yield from _mock_ar_steps(
        model, input_ids, attention_mask, max_new_tokens, float(temperature), top_k, top_p, eos_token_id, pad,
        make_generator(seed, generator), suppress,
    ))


def generate_mock_ar(
    model, input_ids: torch.Tensor, streamer: Any = None, return_dict_in_generate: bool = False, **kwargs: Any
) -> torch.Tensor | GenerationOutput:
    """Two-tower AR: the denoiser, without time conditioning, reads the last committed token against
    the context one token back and predicts the next token; the context tower then appends it.

    Keyword arguments: ``max_new_tokens``, ``temperature``, ``eos_token_id``, ``attention_mask``,
    ``top_k``, ``top_p``, ``seed``/``generator``, ``suppress_token_ids``, ``pad_token_id``.
    """
    output = drive(stream_mock_ar(model, input_ids, **kwargs), streamer, prompt=input_ids)
    return output if return_dict_in_generate else output.sequences


