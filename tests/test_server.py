"""The HTTP server driven by the official ``openai`` client, on 127.0.0.1 and a free port."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from twotower import cli
from twotower.api_requests import ServerLimits
from twotower.pipeline import load_pipeline
from twotower.server import create_app

MODEL = "tiny"
# The conftest model's generation_config.json sets blocks of 4 positions and 4 steps per block.
SMALL = {"max_tokens": 8}
BODY_LIMIT = 1024  # max_body_bytes of the body_limit_server fixture
BODY_TIMEOUT = 2.0  # body_timeout_s of the same fixture


class RunningServer:
    """A uvicorn server on a thread, bound to a free loopback port."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server failed to start within 30 s")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(model_dir):
    limits = ServerLimits(max_queue=16, max_batch_rows=8, max_prompt_tokens=64, max_tokens=1024)
    running = RunningServer(create_app(load_pipeline(model_dir), MODEL, limits))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chat_server(chat_model_dir):
    # A separate model instance with a one-request queue, for the chat and queue-full tests.
    limits = ServerLimits(max_queue=1, max_batch_rows=4, max_prompt_tokens=64, max_tokens=1024)
    running = RunningServer(create_app(load_pipeline(chat_model_dir), MODEL, limits))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def body_limit_server(model_dir):
    # A small body limit, so bodies just over it are quick to send.
    limits = ServerLimits(max_queue=4, max_batch_rows=4, max_prompt_tokens=64, max_tokens=1024,
                          max_body_bytes=BODY_LIMIT, body_timeout_s=BODY_TIMEOUT)
    running = RunningServer(create_app(load_pipeline(model_dir), MODEL, limits))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def wait_until_idle(server: RunningServer, timeout: float) -> float:
    """Wait until the server runs no generation; return the seconds waited."""
    start = time.monotonic()
    while server.scheduler._running or server.scheduler.waiting:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"the server was still generating after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


# ---------------------------------------------------------------------- basic endpoints


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_health(server):
    response = httpx.get(server.base_url + "/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_completion(client, server):
    completion = client.completions.create(model=MODEL, prompt="Shall I compare thee", **SMALL)
    assert completion.object == "text_completion"
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length")
    pipeline = server.scheduler.pipeline
    assert completion.usage.prompt_tokens == len(pipeline.encode("Shall I compare thee"))
    assert 1 <= completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_stream_equals_non_stream(client, mode):
    request = dict(model=MODEL, prompt="Look in thy glass", temperature=0.8, seed=11, extra_body={"mode": mode}, **SMALL)
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **request))

    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    if mode == "diffusion":
        assert len(text_chunks) <= 2, "diffusion streams one chunk per block of 4"


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "When", "stream": True, **SMALL}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 2


def test_prompt_forms_and_n(client, server):
    pipeline = server.scheduler.pipeline
    ids = pipeline.encode("From fairest creatures")
    as_text = client.completions.create(model=MODEL, prompt="From fairest creatures", **SMALL)
    as_ids = client.completions.create(model=MODEL, prompt=ids, **SMALL)
    assert as_ids.choices[0].text == as_text.choices[0].text

    several = client.completions.create(model=MODEL, prompt=["From fairest creatures", "When"], n=2, **SMALL)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == as_text.choices[0].text
    assert several.choices[1].text == as_text.choices[0].text, "greedy copies of one prompt are equal"
    assert several.usage.prompt_tokens == len(ids) + len(pipeline.encode("When"))

    id_lists = client.completions.create(model=MODEL, prompt=[ids, pipeline.encode("When")], **SMALL)
    assert [c.text for c in id_lists.choices] == [several.choices[0].text, several.choices[2].text]

    echoed = client.completions.create(model=MODEL, prompt="From fairest creatures", echo=True, **SMALL)
    assert echoed.choices[0].text == "From fairest creatures" + as_text.choices[0].text


def test_stop_string_trims_output(client):
    request = dict(model=MODEL, prompt="Shall I compare thee", extra_body={"mode": "ar"}, max_tokens=16)
    full = client.completions.create(**request).choices[0].text
    visible = [i for i, ch in enumerate(full) if ch.isalpha()]
    assert len(visible) >= 3, f"the greedy output {full!r} is too short to pick a stop string"
    cut = visible[len(visible) // 2]
    stop = full[cut : cut + 1]

    stopped = client.completions.create(stop=[stop], **request)
    choice = stopped.choices[0]
    assert choice.text == full[: full.index(stop)]
    assert choice.finish_reason == "stop"
    assert stopped.usage.completion_tokens <= 16

    streamed = list(client.completions.create(stop=stop, stream=True, **request))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_and_ignore_eos(client, server):
    pipeline = server.scheduler.pipeline
    request = dict(model=MODEL, prompt="Shall I compare thee", extra_body={"mode": "ar"}, max_tokens=8)
    full = client.completions.create(**request)
    first_token = pipeline.encode(full.choices[0].text)[0]
    stopped = client.completions.create(**{**request, "extra_body": {"mode": "ar", "stop_token_ids": [first_token]}})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 1

    ignoring = client.completions.create(**{**request, "extra_body": {"mode": "ar", "ignore_eos": True}})
    assert ignoring.usage.completion_tokens == 8
    assert ignoring.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"n": 0}, "n"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"echo": "yes"}, "echo"),
        ({"mode": "sideways"}, "mode"),
        ({"block_size": 0}, "block_size"),
        ({"steps_per_block": -2}, "steps_per_block"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": [[5, 99999]]}, "prompt"),
        ({"prompt": "word " * 100}, "prompt"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"user": 5}, "user"),
        ({"logprobs": 2}, "logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_invalid_field_400(client, fields, param):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/completions", body=body, cast_to=httpx.Response)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["param"] == param
    assert param in error["message"]
    assert error["type"] == "invalid_request_error"


def test_missing_prompt_400(server):
    response = httpx.post(server.base_url + "/v1/completions", json={"model": MODEL})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_invalid_json_400(server):
    response = httpx.post(server.base_url + "/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "content",
    [
        b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        b"\xff\xfe",
    ],
    ids=["integer-over-4300-digits", "nested-too-deep", "not-utf8"],
)
def test_unparsable_body_400(server, content):
    response = httpx.post(server.base_url + "/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]
    assert httpx.get(server.base_url + "/health").status_code == 200


@pytest.mark.parametrize("literal", [b"Infinity", b"-Infinity", b"NaN"])
def test_non_finite_temperature_400(server, literal):
    # Python's json module accepts these non-standard literals, which JSON clients may send.
    content = b'{"prompt": "a", "max_tokens": 4, "temperature": ' + literal + b"}"
    response = httpx.post(server.base_url + "/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "temperature"


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-nothing", prompt="hello", max_tokens=4)
    assert caught.value.status_code == 404
    assert caught.value.body["param"] == "model"
    assert "gpt-nothing" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nothing")


def test_unknown_route_404_body(server):
    response = httpx.get(server.base_url + "/v1/nothing")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_chat_without_template_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert "no chat template" in caught.value.body["message"]


# ---------------------------------------------------------------------- request body limit


def padded_body(size: int) -> bytes:
    """Return a valid completion request of exactly ``size`` bytes, padded with trailing whitespace."""
    body = json.dumps({"model": MODEL, "prompt": "Shall I", "max_tokens": 4}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def in_pieces(body: bytes, size: int = 100):
    """Yield ``body`` in pieces, so httpx sends it chunked, without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def assert_body_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(BODY_LIMIT) in error["message"]
    assert "max_body_bytes" in error["message"]


@pytest.mark.parametrize("size", [BODY_LIMIT + 1, 64 * BODY_LIMIT])
def test_body_over_limit_413(body_limit_server, size):
    response = httpx.post(body_limit_server.base_url + "/v1/completions", content=padded_body(size),
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.request.headers["content-length"] == str(size)
    assert_body_too_large(response)
    assert httpx.get(body_limit_server.base_url + "/health").status_code == 200


@pytest.mark.parametrize("size", [BODY_LIMIT + 1, 64 * BODY_LIMIT])
def test_chunked_body_over_limit_413(body_limit_server, size):
    response = httpx.post(body_limit_server.base_url + "/v1/chat/completions", content=in_pieces(padded_body(size)),
                          headers={"content-type": "application/json"}, timeout=30)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_body_too_large(response)
    assert httpx.get(body_limit_server.base_url + "/health").status_code == 200


def send_unfinished(server: RunningServer, head: bytes, body_start: bytes) -> tuple[int, dict]:
    """Send a request whose body never finishes; return the status and JSON body of the reply.

    The server must reply and close the connection without the rest of the body, or the read
    times out after 10 s.
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + b"\r\n" + body_start)
        reply = b""
        while data := sock.recv(65536):
            reply += data
    status_line, _, rest = reply.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


def test_large_content_length_413_early(body_limit_server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n")
    status, body = send_unfinished(body_limit_server, head, b'{"prompt": "')
    assert status == 413
    assert body["error"]["code"] == "request_too_large"


def test_unfinished_chunked_body_413(body_limit_server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n")
    piece = padded_body(BODY_LIMIT + 1)
    # One chunk over the limit and no terminating zero-length chunk, so the body never ends.
    status, body = send_unfinished(body_limit_server, head, b"%x\r\n%s\r\n" % (len(piece), piece))
    assert status == 413
    assert body["error"]["code"] == "request_too_large"


def test_body_at_limit_accepted(body_limit_server):
    url = body_limit_server.base_url + "/v1/completions"
    headers = {"content-type": "application/json"}
    whole = httpx.post(url, content=padded_body(BODY_LIMIT), headers=headers, timeout=120)
    assert whole.status_code == 200
    assert whole.json()["object"] == "text_completion"

    chunked = httpx.post(url, content=in_pieces(padded_body(BODY_LIMIT)), headers=headers, timeout=120)
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 200
    assert chunked.json()["choices"][0]["text"] == whole.json()["choices"][0]["text"]


def test_max_body_bytes_default():
    assert ServerLimits().max_body_bytes == 4 * 1024 * 1024
    assert cli.build_parser().parse_args(["serve"]).max_body_bytes == 4 * 1024 * 1024


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_body_bytes_invalid_limit(value):
    with pytest.raises(ValueError) as caught:
        ServerLimits(max_body_bytes=value)
    assert "max_body_bytes" in str(caught.value)
    assert repr(value) in str(caught.value)
    assert ">= 1" in str(caught.value)


@pytest.mark.parametrize("value, expected", [("0", ">= 1"), ("-5", ">= 1"), ("4MiB", "invalid integer")])
def test_max_body_bytes_invalid_option(capsys, value, expected):
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(["serve", "--max-body-bytes", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--max-body-bytes" in err
    assert value in err
    assert expected in err


def test_max_body_bytes_option_reaches_server(model_dir, monkeypatch):
    from twotower import server as server_module

    served = {}
    monkeypatch.setattr(server_module, "serve", lambda pipeline, **kwargs: served.update(kwargs))
    status = cli.main(["serve", "--model", str(model_dir), "--max-body-bytes", "2048", "--body-timeout", "7.5",
                       "--log-level", "warning"])
    assert status == 0
    assert served["limits"].max_body_bytes == 2048
    assert served["limits"].body_timeout_s == 7.5


# ---------------------------------------------------------------------- chat


def test_chat_with_template(chat_server):
    client = chat_server.client()
    messages = [{"role": "user", "content": "Shall I compare thee"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    pipeline = chat_server.scheduler.pipeline
    rendered = pipeline.apply_chat_template(messages)
    assert rendered == "<s><|user|>Shall I compare thee\n<|assistant|>"
    assert reply.usage.prompt_tokens == len(pipeline.encode(rendered, add_special_tokens=False))

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


# ---------------------------------------------------------------------- concurrency and cancellation


def test_sampled_n_larger_than_batch(chat_server):
    # max_batch_rows is 4 here, so six sampled copies run as two batches.
    client = chat_server.client()
    request = dict(model=MODEL, prompt="Shall I", n=6, temperature=1.0, seed=3, max_tokens=8,
                   extra_body={"mode": "ar"})
    first = [c.text for c in client.completions.create(**request).choices]
    again = [c.text for c in client.completions.create(**request).choices]
    assert first == again, "a seeded request is reproducible"
    assert len(first) == 6
    assert first[4:] != first[:2], "the second batch must not repeat the first batch's samples"
    assert len(set(first)) > 1


def test_concurrent_clients_match_alone(server):
    prompts = ["Shall I", "When forty winters", "Look in thy glass", "Unthrifty", "Those hours", "Then let not",
               "Lo, in the orient", "Music to hear"]
    client = server.client()
    alone = [client.completions.create(model=MODEL, prompt=p, **SMALL).choices[0].text for p in prompts]
    first_batch = len(server.scheduler.batch_sizes)

    def ask(prompt: str) -> str:
        return server.client().completions.create(model=MODEL, prompt=prompt, **SMALL).choices[0].text

    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert max(list(server.scheduler.batch_sizes)[first_batch:]) > 1, "concurrent greedy requests were never batched"


def test_health_during_slow_tokenization(server, monkeypatch):
    # The patched encode blocks until the test releases it, which happens only after /health returns.
    # Run on the event loop, it would block /health too, and the 5 s timeout would fail the test.
    pipeline = server.scheduler.pipeline
    encode = pipeline.encode
    entered, release = threading.Event(), threading.Event()

    def slow_encode(prompt, *args, **kwargs):
        if prompt == "slow prompt":
            entered.set()
            release.wait(timeout=60)
        return encode(prompt, *args, **kwargs)

    monkeypatch.setattr(pipeline, "encode", slow_encode)
    queued = _QueuedRequest(server.base_url, {"model": MODEL, "prompt": "slow prompt", **SMALL})
    try:
        assert entered.wait(timeout=30), "the request never reached the tokenizer"
        health = httpx.get(server.base_url + "/health", timeout=5)
        assert health.status_code == 200
        assert not queued.done(), "the completion finished before the tokenizer was released"
    finally:
        release.set()
    assert queued.result().status_code == 200


class _OpenStream:
    """A streaming request whose first event has arrived and whose connection stays open until ``close``."""

    def __init__(self, server: RunningServer, body: dict):
        self._context = httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=120)
        response = self._context.__enter__()
        assert response.status_code == 200
        # Keep the line iterator: dropping it would close the connection early.
        self._lines = response.iter_lines()
        first = next(line for line in self._lines if line.startswith("data: "))
        assert first != "data: [DONE]"

    def close(self) -> None:
        self._context.__exit__(None, None, None)


def test_disconnect_cancels_generation(server):
    # 1000 tokens in mock-AR mode would take minutes on a CPU, so finishing quickly proves the cancel.
    body = {"model": MODEL, "prompt": "Shall I", "stream": True, "max_tokens": 1000, "mode": "mock-ar",
            "ignore_eos": True}
    stream = _OpenStream(server, body)
    time.sleep(1.0)
    assert server.scheduler._running, "the generation stopped before the client disconnected"
    stream.close()
    waited = wait_until_idle(server, timeout=30)
    assert waited < 30

    completion = server.client().completions.create(model=MODEL, prompt="After", **SMALL)
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_queue_full_503(chat_server):
    body = {"model": MODEL, "prompt": "Shall I", "stream": True, "max_tokens": 1000, "mode": "mock-ar",
            "ignore_eos": True}
    running = _OpenStream(chat_server, body)  # occupies the worker
    try:
        queued = _QueuedRequest(chat_server.base_url, {**body, "max_tokens": 4, "stream": False})
        deadline = time.monotonic() + 30
        while not chat_server.scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(chat_server.scheduler.waiting) == 1

        with pytest.raises(openai.APIStatusError) as caught:
            chat_server.client().completions.create(model=MODEL, prompt="x", max_tokens=4)
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "queue_full"
    finally:
        running.close()
    assert queued.result().status_code == 200
    wait_until_idle(chat_server, timeout=30)


class _QueuedRequest:
    """A blocking request sent from a background thread."""

    def __init__(self, base_url: str, body: dict):
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._future = self._pool.submit(httpx.post, base_url + "/v1/completions", json=body, timeout=120)

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> httpx.Response:
        try:
            return self._future.result(timeout=120)
        finally:
            self._pool.shutdown()


def test_client_gone_mid_body_logs_one_line(body_limit_server, caplog):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500\r\n\r\n")
    with caplog.at_level(logging.WARNING):
        with socket.create_connection(("127.0.0.1", body_limit_server.port), timeout=10) as sock:
            sock.sendall(head + b'{"prompt": "')
        deadline = time.monotonic() + 10
        while not any("client disconnected" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the server logged no line for the disconnected client"
            time.sleep(0.05)
    assert not any("Exception in ASGI application" in r.getMessage() for r in caplog.records)
    assert httpx.get(body_limit_server.base_url + "/health", timeout=10).status_code == 200


def test_stalled_body_408(body_limit_server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500\r\n")
    started = time.monotonic()
    status, body = send_unfinished(body_limit_server, head, b'{"prompt": "')
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < BODY_TIMEOUT + 5


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), True])
def test_body_timeout_invalid(value):
    with pytest.raises(ValueError, match="body_timeout_s"):
        ServerLimits(body_timeout_s=value)
