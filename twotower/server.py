"""An OpenAI-compatible HTTP server: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

One worker thread owns the model. Requests wait in a FIFO queue of at most ``max_queue`` requests
(503 when full). The scheduler batches the rows of waiting requests whose greedy sampler settings
match, up to ``max_batch_rows`` prompts; a sampled request (temperature > 0) runs alone, so its
seed gives the same tokens whatever else is queued. Only one generation runs at a time, so no two
generations ever share a cache. A client that disconnects sets its request's cancel flag. The
generation loop checks the flags after every chunk and every denoiser pass and stops once every
request in the batch is cancelled. Request bodies are decoded and tokenized on a worker thread. A
body larger than ``max_body_bytes`` gets 413 before it is read in full, and one that takes longer
than ``body_timeout_s`` to arrive gets 408.

Streaming responses are server-sent events with one chunk per committed block in diffusion mode
and per token in the AR modes, ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from twotower.api_requests import (
    APIError,
    GenerationRequest,
    ServerLimits,
    parse_chat_request,
    parse_completion_request,
)
from twotower.pipeline import CompletionResult, RowDelta, TextPipeline

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client is still connected

__all__ = ["APIError", "ServerLimits", "create_app", "serve"]


# ---------------------------------------------------------------------- jobs and scheduling


@dataclass
class Job:
    """One request inside the server: its rows, their results and the events sent to its handler."""

    id: str
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    next_row: int = 0  # rows before this index have been handed to the worker
    created: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> list[list[int]]:
        return self.request.row_prompts

    @property
    def fully_scheduled(self) -> bool:
        return self.next_row >= len(self.rows)

    def post(self, event: tuple) -> None:
        """Send ``event`` to the handler's queue; safe to call from the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """The request queue, the batching rule and the single worker thread that runs the model."""

    def __init__(self, pipeline: TextPipeline, limits: ServerLimits):
        self.pipeline = pipeline
        self.limits = limits
        self.waiting: collections.deque[Job] = collections.deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twotower-model")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._running: list[Job] = []
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # rows of recent batches

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._dispatch_forever(), name="twotower-scheduler")

    async def stop(self) -> None:
        for job in [*self.waiting, *self._running]:
            job.cancelled.set()
            job.post(("error", APIError(503, "the server is shutting down", "server_error", code="shutting_down")))
        self.waiting.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, request: GenerationRequest) -> Job:
        """Queue ``request``; raise a 503 ``APIError`` when the queue is full."""
        if len(self.waiting) >= self.limits.max_queue:
            raise APIError(503, f"the server is busy: {len(self.waiting)} requests are waiting "
                                f"(max_queue={self.limits.max_queue}); retry later",
                           "server_busy", code="queue_full")
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        job = Job(f"{prefix}-{uuid.uuid4().hex[:24]}", request, asyncio.get_running_loop())
        self.waiting.append(job)
        self._wakeup.set()
        return job

    def _next_batch(self) -> list[tuple[Job, int]]:
        """Take up to ``max_batch_rows`` rows: from the oldest request first, then from later
        requests with the same batch key."""
        while self.waiting and self.waiting[0].cancelled.is_set():
            dropped = self.waiting.popleft()
            logger.info("request %s cancelled before it started", dropped.id)
        if not self.waiting:
            return []
        first = self.waiting[0]
        key = first.request.batch_key()
        batch: list[tuple[Job, int]] = []
        candidates = [first] if key is None else [j for j in self.waiting if j.request.batch_key() == key]
        for job in candidates:
            if job.cancelled.is_set():
                continue
            while not job.fully_scheduled and len(batch) < self.limits.max_batch_rows:
                batch.append((job, job.next_row))
                job.next_row += 1
            if len(batch) >= self.limits.max_batch_rows:
                break
        for job in {job.id: job for job, _ in batch}.values():
            if job.fully_scheduled:
                self.waiting.remove(job)
        return batch

    async def _dispatch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._next_batch()
            if not batch:
                continue
            self._running = list({job.id: job for job, _ in batch}.values())
            self.batch_sizes.append(len(batch))
            try:
                await loop.run_in_executor(self.executor, self._run_batch, batch)
            finally:
                self._running = []

    def _run_batch(self, batch: list[tuple[Job, int]]) -> None:
        """Generate one batch on the worker thread, posting deltas and results to each job."""
        jobs = {job.id: job for job, _ in batch}.values()
        sampler = dict(batch[0][0].request.sampler)
        first_row = batch[0][1]
        if sampler["seed"] is not None and first_row > 0:
            # A sampled request larger than one batch: later batches must not repeat the first one's draws.
            sampler["seed"] += first_row
        prompts = [job.rows[row] for job, row in batch]

        def should_stop() -> bool:
            return all(job.cancelled.is_set() for job in jobs)

        try:
            steps = self.pipeline.stream(prompts, should_stop=should_stop, **sampler)
            while True:
                try:
                    deltas = next(steps)
                except StopIteration as done:
                    results: list[CompletionResult] = done.value
                    break
                for delta in deltas:
                    job, row = batch[delta.index]
                    if job.request.stream:
                        job.post(("delta", row, delta))
            for result in results:
                job, row = batch[result.index]
                job.post(("result", row, result))
        except ValueError as error:  # an argument check inside the generation loop
            ids = ", ".join(job.id for job in jobs)
            logger.warning("request(s) %s rejected by the generation loop: %s", ids, error)
            failure = APIError(400, f"invalid request: {error}", code="invalid_value")
            for job in jobs:
                job.post(("error", failure))
        except Exception as error:  # report to every client in the batch, keep serving
            ids = ", ".join(job.id for job in jobs)
            logger.exception("generation failed for request(s) %s", ids)
            failure = APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error",
                               code="generation_failed")
            for job in jobs:
                job.post(("error", failure))


# ---------------------------------------------------------------------- request bodies


def _body_too_large(limit: int) -> APIError:
    # Closing the connection stops uvicorn from reading and discarding the rest of the body.
    return APIError(413, f"the request body is larger than the maximum of {limit} bytes (max_body_bytes); "
                         "send a shorter request", code="request_too_large",
                    headers={"Connection": "close"})


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the request body; raise a 413 ``APIError`` as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length over the limit is rejected without waiting for the body. A chunked
    body is counted while it arrives, so this function buffers at most ``limit`` bytes plus one chunk.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)

    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        # The client will not read this error, but the handler logs it as one line instead of a traceback.
        raise APIError(400, f"the client disconnected after {size} bytes of the request body",
                       code="client_disconnected") from None
    return b"".join(chunks)


def _decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integers longer than Python's
        # int_max_str_digits. RecursionError comes from arrays or objects nested too deeply.
        raise APIError(400, f"the request body is not valid JSON: {_short(str(error))}") from None


# ---------------------------------------------------------------------- responses


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _usage(job: Job, results: dict[int, CompletionResult]) -> dict[str, int]:
    prompt_tokens = sum(len(ids) for ids in job.request.prompts)
    completion_tokens = sum(r.completion_tokens for r in results.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _echo_prefix(job: Job, row: int) -> str:
    request = job.request
    return request.prompt_texts[row // request.n] if request.echo else ""


def _completion_body(job: Job, results: dict[int, CompletionResult]) -> dict[str, Any]:
    request = job.request
    base = {"id": job.id, "created": int(job.created), "model": request.model}
    if request.kind == "chat":
        choices = [
            {"index": row, "message": {"role": "assistant", "content": results[row].text},
             "logprobs": None, "finish_reason": results[row].finish_reason}
            for row in sorted(results)
        ]
        return {**base, "object": "chat.completion", "choices": choices, "usage": _usage(job, results)}
    choices = [
        {"index": row, "text": _echo_prefix(job, row) + results[row].text, "logprobs": None,
         "finish_reason": results[row].finish_reason}
        for row in sorted(results)
    ]
    return {**base, "object": "text_completion", "choices": choices, "usage": _usage(job, results)}


def _chunk(job: Job, row: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
    request = job.request
    base = {"id": job.id, "created": int(job.created), "model": request.model}
    if request.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": row, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
    else:
        choice = {"index": row, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        chunk = {**base, "object": "text_completion", "choices": [choice]}
    if request.include_usage:
        chunk["usage"] = None
    return chunk


def _sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


async def _next_event(job: Job, request: Request) -> tuple | None:
    """Wait for the job's next event; return ``None`` once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


def _log_finished(job: Job, results: dict[int, CompletionResult]) -> None:
    usage = _usage(job, results)
    reasons = ",".join(results[row].finish_reason for row in sorted(results))
    logger.info("request %s done: %d prompt tokens, %d completion tokens, %.3f s, finish_reason=%s, user=%s",
                job.id, usage["prompt_tokens"], usage["completion_tokens"], time.perf_counter() - job.started,
                reasons, job.request.user)


async def _collect(job: Job, request: Request) -> JSONResponse:
    results: dict[int, CompletionResult] = {}
    while len(results) < len(job.rows):
        event = await _next_event(job, request)
        if event is None:
            job.cancelled.set()
            logger.info("request %s cancelled: the client disconnected", job.id)
            return JSONResponse({}, status_code=499)
        if event[0] == "error":
            logger.error("request %s failed: %s", job.id, event[1].message)
            return error_response(event[1])
        if event[0] == "result":
            results[event[1]] = event[2]
    _log_finished(job, results)
    return JSONResponse(_completion_body(job, results))


async def _stream(job: Job, request: Request) -> AsyncIterator[str]:
    results: dict[int, CompletionResult] = {}
    finished_rows: set[int] = set()
    try:
        for row in range(len(job.rows)):
            if job.request.kind == "chat":
                yield _sse(_chunk(job, row, None, None, role=True))
            elif job.request.echo:
                yield _sse(_chunk(job, row, _echo_prefix(job, row), None))
        while len(results) < len(job.rows):
            event = await _next_event(job, request)
            # Events can arrive faster than the poll interval, so check the connection between chunks too.
            if event is None or await request.is_disconnected():
                logger.info("request %s cancelled: the client disconnected", job.id)
                return
            kind = event[0]
            if kind == "error":
                logger.error("request %s failed while streaming: %s", job.id, event[1].message)
                yield _sse(event[1].body())
                break
            row = event[1]
            if kind == "delta":
                delta: RowDelta = event[2]
                if delta.text or delta.finish_reason:
                    yield _sse(_chunk(job, row, delta.text, delta.finish_reason))
                if delta.finish_reason:
                    finished_rows.add(row)
            else:
                result: CompletionResult = event[2]
                results[row] = result
                if row not in finished_rows:  # e.g. cancelled rows never send a final delta
                    yield _sse(_chunk(job, row, None, result.finish_reason))
        else:
            if job.request.include_usage:
                usage_chunk = {**_chunk(job, 0, None, None), "choices": [], "usage": _usage(job, results)}
                yield _sse(usage_chunk)
            _log_finished(job, results)
        yield _sse("[DONE]")
    finally:
        if len(results) < len(job.rows):
            job.cancelled.set()


# ---------------------------------------------------------------------- application


def create_app(pipeline: TextPipeline, model_name: str | None = None, limits: ServerLimits | None = None) -> FastAPI:
    """Build the FastAPI application serving ``pipeline`` under the id ``model_name``.

    Each application runs its own worker thread, so serve one pipeline from one application only:
    two applications on the same pipeline would run generations on one model concurrently.
    """
    limits = limits or ServerLimits()
    model_name = model_name or pipeline.name
    scheduler = Scheduler(pipeline, limits)
    created = int(time.time())
    request_numbers = itertools.count(1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await scheduler.start()
        logger.info("serving model %s (queue %d, batch rows %d, prompt tokens <= %d, max_tokens <= %d, "
                    "body bytes <= %d, body timeout %g s)", model_name, limits.max_queue, limits.max_batch_rows,
                    limits.max_prompt_tokens, limits.max_tokens, limits.max_body_bytes, limits.body_timeout_s)
        try:
            yield
        finally:
            await scheduler.stop()
            logger.info("stopped serving model %s", model_name)

    app = FastAPI(title="twotower", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def handle_api_error(request: Request, error: APIError) -> JSONResponse:
        logger.warning("%s %s rejected with %d: %s", request.method, request.url.path, error.status, error.message)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        logger.warning("%s %s rejected with %d: %s", request.method, request.url.path, error.status_code, error.detail)
        code = "not_found" if error.status_code == 404 else None
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       code=code))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "waiting_requests": len(scheduler.waiting)}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "twotower"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    def parse_body(body: bytes, parse: Callable[..., GenerationRequest]) -> GenerationRequest:
        return parse(_decode_json(body), pipeline, limits, model_name)

    async def prepare(request: Request, parse: Callable[..., GenerationRequest]) -> GenerationRequest:
        """Read a generation request, then decode and validate it on a worker thread.

        JSON decoding, the chat template and tokenization of a long prompt can take seconds, and on
        the event loop they would stall every other client. The prompt-length check runs after
        tokenization, inside ``parse``.
        """
        try:
            body = await asyncio.wait_for(_read_body(request, limits.max_body_bytes), limits.body_timeout_s)
        except asyncio.TimeoutError:
            # A client that stops sending would otherwise hold its connection open for good.
            raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                                "(body_timeout_s); send the whole body at once", code="request_timeout",
                           headers={"Connection": "close"}) from None
        # The pipeline tokenizes with encode_batch, which releases the GIL, so this thread runs beside the loop.
        return await asyncio.to_thread(parse_body, body, parse)

    async def run(request: Request, parsed: GenerationRequest) -> Any:
        job = scheduler.submit(parsed)
        logger.info("request %s (#%d) queued: %s, %d prompt(s), n=%d, %d prompt tokens, mode=%s, max_tokens=%d, "
                    "stream=%s", job.id, next(request_numbers), parsed.kind, len(parsed.prompts), parsed.n,
                    sum(len(p) for p in parsed.prompts), parsed.sampler["mode"], parsed.sampler["max_new_tokens"],
                    parsed.stream)
        if parsed.stream:
            return StreamingResponse(_stream(job, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": job.id})
        return await _collect(job, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await run(request, await prepare(request, parse_completion_request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await run(request, await prepare(request, parse_chat_request))

    return app


def serve(pipeline: TextPipeline, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          limits: ServerLimits | None = None, log_level: str = "info") -> None:
    """Run the server with uvicorn until interrupted."""
    import uvicorn

    app = create_app(pipeline, model_name, limits)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("twotower").setLevel(log_level.upper())
    logger.info("starting server on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
