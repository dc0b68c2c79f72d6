"""Validation of OpenAI-style completion and chat-completion request bodies.

``parse_completion_request`` and ``parse_chat_request`` turn a decoded JSON body into a
``GenerationRequest`` or raise ``APIError`` with the HTTP status, the OpenAI error type and the
name of the offending field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from twotower.pipeline import MODES, TextPipeline


# The seed range that torch.Generator.manual_seed accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass
class ServerLimits:
    """Bounds the server enforces on every request."""

    max_queue: int = 64  # requests waiting for the model; more get 503
    max_batch_rows: int = 8  # prompt rows generated together in one batch
    max_prompt_tokens: int = 4096  # tokens of one prompt
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    max_request_rows: int = 64  # prompts times n in one request
    max_body_bytes: int = 4 * 1024 * 1024  # bytes of one request body; larger bodies get 413
    body_timeout_s: float = 30.0  # seconds to receive a whole request body; slower clients get 408

    def __post_init__(self) -> None:
        value = self.max_body_bytes
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_body_bytes={value!r} is invalid: expected an integer >= 1")
        timeout = self.body_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"body_timeout_s={timeout!r} is invalid: expected a positive finite number of seconds")


class APIError(Exception):
    """An error returned to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers  # extra HTTP response headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> APIError:
    return APIError(400, f"invalid '{param}': {message}", param=param, code="invalid_value")


@dataclass
class GenerationRequest:
    """A validated request: one prompt-id list per output row, plus the sampler settings."""

    kind: str  # "completion" or "chat"
    prompts: list[list[int]]  # one per distinct prompt
    prompt_texts: list[str]  # decoded prompts, for echo
    n: int
    sampler: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    user: str | None = None
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def row_prompts(self) -> list[list[int]]:
        """Prompt ids of every output row: each prompt repeated n times, as OpenAI numbers choices."""
        return [ids for ids in self.prompts for _ in range(self.n)]

    @property
    def temperature(self) -> float:
        return float(self.sampler["temperature"])

    def batch_key(self) -> tuple | None:
        """Requests with equal keys may share a batch. Sampled requests return ``None`` and run
        alone, so a seed yields the same tokens whatever else is queued."""
        if self.temperature > 0:
            return None
        settings = self.sampler
        return (
            settings["mode"], settings["max_new_tokens"], settings["block_size"], settings["steps_per_block"],
            settings["confidence_threshold"], tuple(settings["stop"]), tuple(settings["stop_token_ids"]),
            settings["ignore_eos"],
        )


# ---------------------------------------------------------------------- field readers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # Python's json module reads the non-standard literals NaN and Infinity, so both can arrive here,
    # and an integer literal may have hundreds of digits, more than a float holds.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def read_int(body: dict, name: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(name, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise invalid(name, f"{value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise invalid(name, f"{value} is above the maximum {maximum}")
    return value


def read_number(body: dict, name: str, minimum: float, maximum: float | None = None,
                open_minimum: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise invalid(name, f"expected a finite number, got {value!r}")
    if value < minimum or (open_minimum and value == minimum) or (maximum is not None and value > maximum):
        low = "(" if open_minimum else "["
        high = f"{maximum}]" if maximum is not None else "inf)"
        raise invalid(name, f"{value} is outside {low}{minimum}, {high}")
    return float(value)


def read_bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"expected true or false, got {value!r}")
    return value


def read_stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "expected a non-empty string or a list of non-empty strings")
    if len(stops) > 16:
        raise invalid("stop", f"{len(stops)} stop strings given; the maximum is 16")
    return stops


def read_token_ids(body: dict, name: str, vocab_size: int) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(t) and 0 <= t < vocab_size for t in value):
        raise invalid(name, f"expected a list of token ids in [0, {vocab_size})")
    return value


def check_model(body: dict, model_name: str) -> str:
    """Return the requested model id; raise 404 for another model. A missing id means the served one."""
    requested = body.get("model")
    if requested is None:
        return model_name
    if not isinstance(requested, str):
        raise invalid("model", f"expected a string, got {requested!r}")
    if requested != model_name:
        raise APIError(404, f"The model '{requested}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    return requested


# ---------------------------------------------------------------------- requests


def _read_prompts(body: dict, pipeline: TextPipeline) -> tuple[list[list[int]], list[str]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "missing required field 'prompt'", param="prompt", code="missing_field")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        items = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        items = prompt
    else:
        raise invalid("prompt", "expected a string, a list of strings, a list of token ids or a list of token-id lists")

    ids: list[list[int]] = []
    texts: list[str] = []
    for item in items:
        try:
            ids.append(pipeline.encode(item))
        except ValueError as error:
            raise invalid("prompt", str(error)) from None
        texts.append(item if isinstance(item, str) else pipeline.decode(item))
    return ids, texts


def _read_sampler(body: dict, pipeline: TextPipeline, limits: ServerLimits, max_tokens_field: str) -> dict[str, Any]:
    defaults = pipeline.defaults
    max_tokens = read_int(body, max_tokens_field, minimum=1, maximum=limits.max_tokens)
    if max_tokens is None:
        max_tokens = min(int(defaults.max_new_tokens), limits.max_tokens)
    mode = body.get("mode", defaults.mode)
    if mode not in MODES:
        raise invalid("mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
    top_k = read_int(body, "top_k", minimum=-1)
    if top_k is None:
        top_k = defaults.top_k
    elif top_k <= 0:  # -1 (vLLM's convention) and 0 both disable the filter
        top_k = None
    temperature = read_number(body, "temperature", 0.0)
    threshold = read_number(body, "confidence_threshold", 0.0, 1.0)
    return {
        "mode": mode,
        "max_new_tokens": max_tokens,
        "temperature": defaults.temperature if temperature is None else temperature,
        "top_p": read_number(body, "top_p", 0.0, 1.0, open_minimum=True) or defaults.top_p,
        "top_k": top_k,
        "block_size": read_int(body, "block_size", minimum=1, maximum=limits.max_tokens) or defaults.block_size,
        "steps_per_block": read_int(body, "steps_per_block", minimum=1, maximum=4096) or defaults.steps_per_block,
        "confidence_threshold": defaults.confidence_threshold if threshold is None else threshold,
        "seed": read_int(body, "seed", minimum=SEED_MIN, maximum=SEED_MAX),
        "stop": read_stop(body),
        "stop_token_ids": read_token_ids(body, "stop_token_ids", pipeline.vocab_size),
        "ignore_eos": read_bool(body, "ignore_eos"),
    }


UNSUPPORTED_FIELDS = {
    # field: the values besides null that mean "not used" and are accepted
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "suffix": ("",),
    "best_of": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
}


def reject_unsupported(body: dict) -> None:
    """Raise 400 for OpenAI fields this server does not implement, unless they have their neutral value."""
    for name, neutral in UNSUPPORTED_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        # Compare types too, because True == 1 and 0 == False in Python.
        if not any(value == v and type(value) is type(v) for v in neutral):
            raise invalid(name, f"{value!r} is not supported by this server; omit the field")


def _read_common(body: dict, request: GenerationRequest, limits: ServerLimits) -> None:
    reject_unsupported(body)
    request.stream = read_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options", "expected an object such as {\"include_usage\": true}")
        if not request.stream:
            raise invalid("stream_options", "only allowed when 'stream' is true")
        request.include_usage = read_bool(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"expected a string, got {user!r}")
    request.user = user
    rows = len(request.prompts) * request.n
    if rows > limits.max_request_rows:
        param = "messages" if request.kind == "chat" else "prompt"
        if request.n > 1:
            param = "n"
        raise invalid(param, f"{len(request.prompts)} prompt(s) times n={request.n} gives {rows} outputs; "
                             f"the maximum per request is {limits.max_request_rows}")
    for ids in request.prompts:
        if len(ids) > limits.max_prompt_tokens:
            param = "messages" if request.kind == "chat" else "prompt"
            raise invalid(param, f"the prompt has {len(ids)} tokens; the maximum is {limits.max_prompt_tokens}")


def parse_completion_request(body: Any, pipeline: TextPipeline, limits: ServerLimits, model_name: str) -> GenerationRequest:
    """Validate a ``/v1/completions`` body."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = check_model(body, model_name)
    prompts, texts = _read_prompts(body, pipeline)
    request = GenerationRequest(
        kind="completion",
        prompts=prompts,
        prompt_texts=texts,
        n=read_int(body, "n", minimum=1, maximum=limits.max_request_rows) or 1,
        sampler=_read_sampler(body, pipeline, limits, "max_tokens"),
        echo=read_bool(body, "echo"),
        model=model,
    )
    _read_common(body, request, limits)
    return request


def _read_messages(body: dict) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "missing required field 'messages'", param="messages", code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty list of {\"role\", \"content\"} objects")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}]", "expected an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts are supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"messages[{i}].content", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content", f"expected a string, got {content!r}")
        cleaned.append({"role": message["role"], "content": content})
    return cleaned


def parse_chat_request(body: Any, pipeline: TextPipeline, limits: ServerLimits, model_name: str) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body and render its messages with the chat template."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = check_model(body, model_name)
    if pipeline.chat_template is None:
        raise APIError(400, f"model '{model_name}' has no chat template (tokenizer_config.json defines no "
                            "chat_template); use /v1/completions instead", param="messages",
                       code="chat_template_missing")
    messages = _read_messages(body)
    try:
        text = pipeline.apply_chat_template(messages)
    except Exception as error:  # any template failure is a problem with these messages
        raise invalid("messages", f"the chat template failed on these messages: {error}") from None
    field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    request = GenerationRequest(
        kind="chat",
        prompts=[pipeline.encode(text, add_special_tokens=False)],
        prompt_texts=[text],
        n=read_int(body, "n", minimum=1, maximum=limits.max_request_rows) or 1,
        sampler=_read_sampler(body, pipeline, limits, field_name),
        model=model,
    )
    _read_common(body, request, limits)
    return request
