"""A model directory with its tokenizer: text in, text out, in any generation mode.

``load_pipeline(path)`` reads a two-tower checkpoint together with ``tokenizer.json``,
``generation_config.json`` (optional) and ``tokenizer_config.json`` (optional, for a chat template).
``TextPipeline.generate`` and ``TextPipeline.stream`` take prompts as strings or token-id lists and
return ``CompletionResult`` objects. They add what the raw loops in ``diffusion.py`` and
``generation.py`` leave to the caller:

* left padding of a prompt batch, with an empty prompt replaced by the BOS token;
* suppression of the mask token and of padded vocabulary rows (ids the tokenizer never produces);
* stop strings, with streamed text held back while it could still become a stop string;
* cancellation through a ``should_stop`` callable, checked after every chunk and every denoiser pass.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from twotower.checkpoint import CheckpointError, parse_dtype
from twotower.generation import STOP, GenerationOutput, GenerationStats, TokenChunk, stream_ar
from twotower.two_tower import TwoTowerForCausalLM

logger = logging.getLogger(__name__)

MODES = ("diffusion", "mock-ar", "ar")
CANCELLED = "cancelled"

Prompt = str | Sequence[int]


# ---------------------------------------------------------------------- settings


@dataclass
class SamplerSettings:
    """Sampler parameters of one generation call; ``None`` fields take the model's defaults."""

    mode: str = "diffusion"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    block_size: int = 16
    steps_per_block: int = 16
    confidence_threshold: float = 0.9
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field (ranges the loops check are left to them)."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is invalid: expected one of {', '.join(MODES)}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} is invalid: expected non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} is invalid: expected token ids >= 0")


GENERATION_CONFIG_KEYS = {
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "block_size": "block_size",
    "steps_per_block": "steps_per_block",
    "confidence_threshold": "confidence_threshold",
    "threshold": "confidence_threshold",
    "mode": "mode",
}


def read_generation_defaults(path: Path) -> tuple[SamplerSettings, dict[str, Any]]:
    """Read ``generation_config.json`` if present; return the sampler defaults and the raw JSON."""
    file = path / "generation_config.json"
    if not file.is_file():
        return SamplerSettings(), {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} must contain a JSON object")
    defaults = SamplerSettings()
    for key, attribute in GENERATION_CONFIG_KEYS.items():
        if raw.get(key) is not None:
            _check_generation_value(file, key, raw[key])
            setattr(defaults, attribute, raw[key])
    if raw.get("do_sample") is False:
        defaults.temperature = 0.0
    if defaults.mode == "mock_ar":
        defaults.mode = "mock-ar"
    eos = raw.get("eos_token_id")
    if eos is not None and not (_is_token_id(eos) or (isinstance(eos, list) and all(_is_token_id(e) for e in eos))):
        raise CheckpointError(f"{file}: eos_token_id={eos!r} is invalid: expected a token id or a list of token ids")
    return defaults, raw


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_generation_value(file: Path, key: str, value: Any) -> None:
    """Raise ``CheckpointError`` when a ``generation_config.json`` sampler value has the wrong type;
    the generation loops check the ranges."""
    if key == "mode":
        valid = value in (*MODES, "mock_ar")
        expected = "one of " + ", ".join(MODES)
    elif key in ("max_new_tokens", "top_k", "block_size", "steps_per_block"):
        valid = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    else:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    if not valid:
        raise CheckpointError(f"{file}: {key}={value!r} is invalid: expected {expected}")


# ---------------------------------------------------------------------- results


@dataclass
class CompletionResult:
    """One prompt's generation: decoded text (special tokens skipped), new ids and the finish reason.

    ``finish_reason`` is ``"stop"`` (EOS, a stop token or a stop string), ``"length"``
    (``max_new_tokens`` reached) or ``"cancelled"`` (``should_stop`` returned true first).
    ``stats`` is the statistics of the whole batch the prompt ran in.
    """

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: dict[str, Any]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text,
            "tokens": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "stats": self.stats,
        }


@dataclass
class RowDelta:
    """New output of one row in one chunk; ``finish_reason`` is set on the row's last delta."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class _Cancelled(Exception):
    """Raised from the ``on_step`` hook to abandon a diffusion block when ``should_stop`` is true."""


class _RowState:
    """Incremental decoding and stop-string detection for one output row."""

    def __init__(self, index: int, pipeline: "TextPipeline", stop: list[str], eos_ids: set[int]):
        self.index = index
        self.pipeline = pipeline
        self.stop = stop
        self.eos_ids = eos_ids
        self.token_ids: list[int] = []
        self.text = ""  # the final text once the row finishes, else the decoded text so far
        self.emitted = 0  # characters of text already handed out
        self.finish_reason: str | None = None
        self.stopped_by_string = False

    def add(self, new_ids: list[int], finished: bool) -> RowDelta | None:
        if self.finish_reason is not None:
            return None
        start = len(self.token_ids)
        self.token_ids.extend(new_ids)
        self.text = self.pipeline.decode(self.token_ids)

        cut = self._find_stop(self.text)
        if cut is not None:
            self.text = self.text[:cut]
            self._trim_tokens_to_stop(start)
            self.finish_reason = STOP
            self.stopped_by_string = True
        elif finished:
            self.finish_reason = STOP if self.token_ids and self.token_ids[-1] in self.eos_ids else "length"

        if self.finish_reason is not None:
            visible = len(self.text)
        else:
            visible = len(self.text) - self._held_back(self.text)
        delta_text = self.text[self.emitted : visible] if visible > self.emitted else ""
        self.emitted = max(self.emitted, visible)
        delta_ids = self.token_ids[start:]
        if not delta_text and not delta_ids and self.finish_reason is None:
            return None
        return RowDelta(self.index, delta_text, delta_ids, self.finish_reason)

    def close(self, reason: str) -> RowDelta | None:
        """Finish the row with ``reason`` unless it has finished; return the held-back text, if any."""
        if self.finish_reason is not None:
            return None
        self.finish_reason = reason
        if reason == CANCELLED:
            self.text = self.text[: self.emitted]
            return None
        delta_text = self.text[self.emitted :]
        self.emitted = len(self.text)
        return RowDelta(self.index, delta_text, [], reason)

    def _find_stop(self, text: str) -> int | None:
        # Only text after the emitted part can hold a new match, but a stop string may begin up to
        # len(stop) - 1 characters before it, in the held-back tail.
        positions = [text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop]
        found = [p for p in positions if p >= 0]
        return min(found) if found else None

    def _trim_tokens_to_stop(self, start: int) -> None:
        # Keep the shortest token prefix whose text already contains the stop string.
        for length in range(max(start, 1), len(self.token_ids) + 1):
            if self._find_stop(self.pipeline.decode(self.token_ids[:length])) is not None:
                del self.token_ids[length:]
                return

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that may still change: an incomplete UTF-8 sequence
        (decoded as U+FFFD) or the start of a stop string."""
        held = 0
        while held < len(text) and text[len(text) - 1 - held] == "\ufffd":
            held += 1
        end = len(text) - held
        longest = max((len(s) for s in self.stop), default=0)
        for size in range(min(longest - 1, end), 0, -1):
            tail = text[end - size : end]
            if any(s.startswith(tail) for s in self.stop):
                return held + size
        return held


# ---------------------------------------------------------------------- pipeline


class ChatTemplate:
    """A Jinja chat template from ``tokenizer_config.json``, rendered in a sandbox."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        import jinja2.sandbox

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template rejected the messages: {message}")

        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        self.template = environment.from_string(source)
        self.special_tokens = special_tokens

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)


def _read_chat_template(path: Path) -> ChatTemplate | None:
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} must contain a JSON object")
    source = raw.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if not isinstance(source, str) or not source:
        return None
    try:
        import jinja2.sandbox  # noqa: F401
    except ImportError:
        logger.warning("%s has a chat template but jinja2 is not installed; chat is disabled", file)
        return None
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = raw.get(key)
        if isinstance(value, dict):  # transformers' AddedToken serialisation
            value = value.get("content")
        special[key] = value if isinstance(value, str) else ""
    return ChatTemplate(source, special)


class TextPipeline:
    """A ``TwoTowerForCausalLM`` with its tokenizer, generation defaults and optional chat template."""

    def __init__(
        self,
        model: TwoTowerForCausalLM,
        tokenizer: Tokenizer,
        defaults: SamplerSettings | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: ChatTemplate | None = None,
        name: str = "model",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults or SamplerSettings()
        self.generation_config = generation_config or {}
        self.chat_template = chat_template
        self.name = name
        config = model.config
        self.vocab_size = config.vocab_size
        self.tokenizer_vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.mask_token_id = self._special_id("mask_token_id", config.mask_token_id)
        self.pad_token_id = self._special_id("pad_token_id", config.pad_token_id)
        self.bos_token_id = self._special_id("bos_token_id", config.bos_token_id)
        eos = self.generation_config.get("eos_token_id", [config.eos_token_id, *config.extra.get("extra_eos_token_ids", [])])
        self.eos_token_ids = [eos] if isinstance(eos, int) else [int(e) for e in eos or []]
        # The mask token and the embedding rows past the tokenizer's vocabulary are never output.
        self.suppressed_token_ids = sorted({self.mask_token_id, *range(self.tokenizer_vocab_size, self.vocab_size)})

    def _special_id(self, key: str, fallback: int) -> int:
        value = self.generation_config.get(key)
        return value if isinstance(value, int) else fallback

    # ------------------------------------------------------------------ text

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one prompt: a string is tokenized, a token-id list is checked and copied."""
        if isinstance(prompt, str):
            # encode_batch releases the GIL while it works and encode does not (tokenizers 0.23), so a
            # server thread tokenizing a long prompt leaves the event loop free.
            ids = self.tokenizer.encode_batch([prompt], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = list(prompt)
            for token in ids:
                if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.vocab_size:
                    raise ValueError(f"token id {token!r} is invalid: expected an integer in [0, {self.vocab_size})")
        if not ids:
            # The loops need one token to condition on; an empty prompt starts from BOS.
            ids = [self.bos_token_id]
        return ids

    def decode(self, token_ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """Return the text of a single token, special tokens included (for live views and traces)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def encode_batch(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return left-padded ``input_ids`` and ``attention_mask``, both (B, max prompt length)."""
        return self._pad([self.encode(p) for p in prompts])

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not rows:
            raise ValueError("no prompts given: expected at least one prompt")
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        return input_ids, attention_mask

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        if self.chat_template is None:
            raise ValueError(f"model {self.name} has no chat template: its tokenizer_config.json defines no chat_template")
        return self.chat_template.render(messages)

    # ------------------------------------------------------------------ generation

    def settings(self, mode: str | None = None, **overrides: Any) -> SamplerSettings:
        """Return the model's defaults with ``overrides`` applied (``None`` values keep the default)."""
        values = dict(self.defaults.__dict__)
        unknown = set(overrides) - set(values)
        if unknown:
            raise ValueError(f"unknown sampler parameter(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if mode is not None:
            values["mode"] = mode
        values["stop"] = list(values["stop"])
        values["stop_token_ids"] = list(values["stop_token_ids"])
        settings = SamplerSettings(**values)
        settings.validate()
        return settings

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        mode: str | None = None,
        on_step: Callable[[Any], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        **sampler: Any,
    ) -> list[CompletionResult]:
        """Generate for every prompt (one batch); return one ``CompletionResult`` per prompt."""
        steps = self.stream(prompts, mode=mode, on_step=on_step, should_stop=should_stop, **sampler)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        mode: str | None = None,
        on_step: Callable[[Any], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        **sampler: Any,
    ) -> Generator[list[RowDelta], None, list[CompletionResult]]:
        """Yield the rows' new text and ids after every block (diffusion) or token (AR modes).

        The ``CompletionResult`` list is the StopIteration value. ``on_step`` receives every
        ``DenoiseStep`` (diffusion only). Generation ends early once every row has finished or
        ``should_stop()`` returns true, which is checked after each chunk and each denoiser pass.
        """
        settings = self.settings(mode, **sampler)
        batch = _as_prompt_list(prompts)
        prompt_ids = [self.encode(p) for p in batch]
        input_ids, attention_mask = self._pad(prompt_ids)
        # The loops move input_ids to the context tower's device but use attention_mask where it is.
        input_ids = input_ids.to(self.model.context_device)
        attention_mask = attention_mask.to(self.model.context_device)
        eos_ids = [] if settings.ignore_eos else list(self.eos_token_ids)
        eos_ids += [t for t in settings.stop_token_ids if t not in eos_ids]
        rows = [_RowState(i, self, settings.stop, set(eos_ids)) for i in range(len(batch))]

        start = time.perf_counter()
        counted = GenerationStats(prompt_tokens=sum(len(p) for p in prompt_ids))

        def step_hook(step: Any) -> None:
            counted.denoiser_passes += 1
            if on_step is not None:
                on_step(step)
            if should_stop is not None and should_stop():
                raise _Cancelled

        loop = self._start_loop(settings, input_ids, attention_mask, eos_ids or None, step_hook)
        output: GenerationOutput | None = None
        try:
            while True:
                if should_stop is not None and should_stop():
                    break
                try:
                    chunk: TokenChunk = next(loop)
                except StopIteration as done:
                    output = done.value
                    break
                except _Cancelled:
                    break
                deltas = [d for d in (row.add(tokens, finished) for row, tokens, finished in
                                      zip(rows, chunk.tokens, chunk.finished)) if d is not None]
                if deltas:
                    yield deltas
                # The loop does not know about stop strings and would go on generating for rows
                # they stopped. So once every row is done and one was stopped that way, the loop is
                # abandoned. Otherwise it ends by itself and returns its statistics.
                if all(row.finish_reason is not None for row in rows) and any(row.stopped_by_string for row in rows):
                    break
        finally:
            loop.close()

        if output is not None:
            # Rows that ran to the end: their finish reasons come from the loop's output.
            closing = [row.close(output.finish_reasons[row.index]) for row in rows]
            closing = [delta for delta in closing if delta is not None]
            if closing:
                yield closing
        for row in rows:
            row.close(CANCELLED)

        if output is not None:
            stats = output.stats.as_dict()
        else:
            counted.generated_tokens = sum(len(row.token_ids) for row in rows)
            counted.total_s = time.perf_counter() - start
            stats = counted.as_dict()
            stats["stopped_early"] = True
        return [
            CompletionResult(row.index, prompt_ids[row.index], row.token_ids, row.text, row.finish_reason, stats)
            for row in rows
        ]

    def _start_loop(self, settings: SamplerSettings, input_ids, attention_mask, eos_ids, step_hook):
        common = dict(
            max_new_tokens=settings.max_new_tokens,
            attention_mask=attention_mask,
            top_k=settings.top_k,
            top_p=settings.top_p,
            eos_token_id=eos_ids,
            pad_token_id=self.pad_token_id,
            seed=settings.seed,
            suppress_token_ids=self.suppressed_token_ids,
        )
        if settings.mode == "diffusion":
            return self.model.stream_mask_diffusion(
                input_ids,
                block_size=settings.block_size,
                steps_per_block=settings.steps_per_block,
                confidence_threshold=settings.confidence_threshold,
                temperature=settings.temperature,
                mask_token_id=self.mask_token_id,
                on_step=step_hook,
                **common,
            )
        if settings.mode == "mock-ar":
            return self.model.stream_mock_ar(
                input_ids, temperature=settings.temperature, mask_token_id=self.mask_token_id, **common
            )
        sample = settings.temperature > 0
        return stream_ar(
            self.model.context_lm, input_ids, do_sample=sample,
            temperature=settings.temperature if sample else 1.0, **common,
        )


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def load_pipeline(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    ctx_device: str | torch.device | None = None,
    den_device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> TextPipeline:
    """Load the model, tokenizer, generation defaults and chat template stored in directory ``path``.

    ``dtype`` ``None`` keeps the checkpoint's dtype. ``ctx_device``/``den_device`` place the context
    and denoiser towers apart; each defaults to ``device``. ``progress`` is called with the name of
    each loading stage before it starts. Raises ``CheckpointError`` (a ``ValueError``) for a missing
    or unreadable directory or file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"no tokenizer.json in {path}: the model directory needs its tokenizer")

    report = progress or (lambda stage: None)
    report("weights")
    dtype = parse_dtype(dtype) if dtype not in (None, "auto") else None
    model = TwoTowerForCausalLM.from_pretrained(path, dtype=dtype, device=ctx_device or device)
    if ctx_device is not None or den_device is not None:
        model.place_towers_on_devices(ctx_device or device, den_device or device)

    report("tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{tokenizer_file} is unreadable: {error}") from error

    report("generation config")
    defaults, raw = read_generation_defaults(path)
    chat_template = _read_chat_template(path)
    pipeline = TextPipeline(model, tokenizer, defaults, raw, chat_template, name=path.name)
    if pipeline.tokenizer_vocab_size > pipeline.vocab_size:
        raise CheckpointError(
            f"{tokenizer_file} has {pipeline.tokenizer_vocab_size} tokens but the model's vocab_size is "
            f"{pipeline.vocab_size}: the tokenizer does not belong to this model"
        )
    logger.info("loaded pipeline %s (tokenizer vocabulary %d, model vocabulary %d)",
                path, pipeline.tokenizer_vocab_size, pipeline.vocab_size)
    return pipeline
