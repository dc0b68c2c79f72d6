"""End-to-end tests of the ``twotower`` command line on the tiny model from conftest.py."""

from __future__ import annotations

import html
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

import pytest
import torch
from tokenizers import Tokenizer

from twotower import cli

# Two blocks of four positions, four passes each: short enough for seconds per run on a CPU.
FAST = ["--max-new-tokens", "8", "--no-progress"]
DIFFUSION = ["--block-size", "4", "--steps-per-block", "4"]
PROMPT = "Shall I compare thee"


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_generate_json_each_mode(capsys, model_dir, tokenizer, mode):
    extra = DIFFUSION if mode == "diffusion" else []
    status, out, err = run_cli(capsys, ["generate", PROMPT, "--model", str(model_dir), "--mode", mode, "--json",
                                        *FAST, *extra])
    assert status == 0, err
    records = json_lines(out)
    assert len(records) == 1
    record = records[0]
    assert record["index"] == 0
    assert record["finish_reason"] in ("stop", "length")
    assert 1 <= len(record["tokens"]) <= 8
    assert all(0 <= t < 300 for t in record["tokens"]), "padded vocabulary rows must be suppressed"
    assert 3 not in record["tokens"], "the mask token must be suppressed"
    assert record["text"] == tokenizer.decode(record["tokens"], skip_special_tokens=True)
    assert record["prompt_tokens"] == len(tokenizer.encode(PROMPT).ids)
    assert record["completion_tokens"] == len(record["tokens"])
    assert record["stats"]["generated_tokens"] == len(record["tokens"])
    if mode == "diffusion":
        assert record["stats"]["denoiser_passes"] >= 2
    if mode == "ar":
        assert record["stats"]["denoiser_passes"] == 0


def test_generate_plain_text_output(capsys, model_dir):
    status, out, _ = run_cli(capsys, ["generate", PROMPT, "--model", str(model_dir), "--mode", "ar", *FAST])
    status_json, out_json, _ = run_cli(capsys, ["generate", PROMPT, "--model", str(model_dir), "--mode", "ar", "--json",
                                                *FAST])
    assert status == 0
    assert status_json == 0
    assert out == json_lines(out_json)[0]["text"] + "\n"


def test_generate_file_batches_match_single(capsys, model_dir, tmp_path):
    prompts = ["When forty winters", "Look in thy glass", "Unthrifty loveliness"]
    lines = [prompts[0], json.dumps({"prompt": prompts[1]}), "", json.dumps({"prompt": prompts[2]})]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("\n".join(lines) + "\n")

    # AR keeps this test quick; tests/test_pipeline.py compares batched and single rows in every mode.
    status, out, err = run_cli(capsys, ["generate", "--file", str(prompt_file), "--model", str(model_dir), "--json",
                                        "--batch-size", "2", "--mode", "ar", *FAST])
    assert status == 0, err
    batched = json_lines(out)
    assert [r["index"] for r in batched] == [0, 1, 2]

    for index, prompt in enumerate(prompts):
        status, out, _ = run_cli(capsys, ["generate", prompt, "--model", str(model_dir), "--json", "--mode", "ar", *FAST])
        alone = json_lines(out)[0]
        assert alone["tokens"] == batched[index]["tokens"], f"prompt {index} differs in a batch"


def test_generate_reads_stdin(capsys, model_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first prompt\nsecond prompt\n"))
    status, out, err = run_cli(capsys, ["generate", "--model", str(model_dir), "--mode", "ar", "--json", *FAST])
    assert status == 0, err
    assert [r["index"] for r in json_lines(out)] == [0, 1]


def test_generate_token_id_prompt(capsys, model_dir, tmp_path):
    prompt_file = tmp_path / "ids.jsonl"
    prompt_file.write_text(json.dumps({"prompt": [40, 41, 42]}) + "\n")
    status, out, err = run_cli(capsys, ["generate", "--file", str(prompt_file), "--model", str(model_dir),
                                        "--mode", "ar", "--json", *FAST])
    assert status == 0, err
    assert json_lines(out)[0]["prompt_tokens"] == 3


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_stream_text_equals_final(capsys, model_dir, mode):
    extra = DIFFUSION if mode == "diffusion" else []
    base = ["generate", PROMPT, "--model", str(model_dir), "--mode", mode, "--temperature", "0.7", "--seed", "5",
            *FAST, *extra]
    status, streamed, _ = run_cli(capsys, [*base, "--stream"])
    assert status == 0
    status, out, _ = run_cli(capsys, [*base, "--stream", "--json"])
    assert status == 0
    records = json_lines(out)
    chunks = [r for r in records if "delta" in r]
    final = [r for r in records if "finish_reason" in r]
    assert len(final) == 1
    assert "".join(c["delta"] for c in chunks) == final[0]["text"]
    assert [t for c in chunks for t in c["tokens"]] == final[0]["tokens"]
    assert streamed == final[0]["text"] + "\n"
    if mode == "diffusion":
        assert len(chunks) <= 2, "diffusion streams one chunk per block"


def test_trace_page_contains_committed_tokens(capsys, model_dir, tmp_path, tokenizer):
    trace = tmp_path / "trace.html"
    status, out, err = run_cli(capsys, ["generate", PROMPT, "--model", str(model_dir), "--json", "--trace", str(trace),
                                        *FAST, *DIFFUSION])
    assert status == 0, err
    record = json_lines(out)[0]
    page = trace.read_text(encoding="utf-8")

    data = json.loads(re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S).group(1))
    blocks = data["rows"][0]
    committed = [t for block in blocks for t in block["token"]]
    assert committed == record["tokens"]
    assert all(step is not None for block in blocks for step in block["commit_step"])
    assert all(0.0 <= c <= 1.0 for block in blocks for c in block["confidence"])

    static = page.split("<h2>Committed tokens</h2>", 1)[1]
    for token in record["tokens"]:
        shown = data["vocab"][str(token)]
        assert html.escape(shown) in static, f"token {token} ({shown!r}) missing from the page"
    assert 'type="range"' in page
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page), "the page must not load external assets"


def test_show_steps_plain_lines(capsys, model_dir):
    status, _, err = run_cli(capsys, ["generate", PROMPT, "--model", str(model_dir), "--show-steps", *FAST, *DIFFUSION])
    assert status == 0
    lines = [line for line in err.splitlines() if line.startswith("prompt 0 block")]
    assert any(line.startswith("prompt 0 block 0 step 0:") for line in lines)
    assert any(line.startswith("prompt 0 block 1 ") for line in lines)
    assert "\x1b[" not in err, "no ANSI escapes when stderr is not a terminal"


def _assert_one_line_error(status: int, err: str) -> None:
    assert status != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "error" in lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "x", "--top-p", "2"], "--top-p"),
        (["generate", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "x", "--mode", "sideways"], "--mode"),
        (["generate", "x", "--temperature", "warm"], "--temperature"),
        (["generate", "x", "--mode", "ar", "--block-size", "4"], "--block-size"),
        (["generate", "x", "--mode", "mock-ar", "--trace", "t.html"], "--trace"),
        (["generate", "x", "--device", "cuda:7"], "cuda:7"),
        (["generate", "x", "--device", "meta"], "meta"),
        (["generate", "x", "--temperature", "inf"], "--temperature"),
        (["generate", "x", "--seed", "9" * 25], "--seed"),
        (["generate", "--file", "no/such/prompts.txt"], "no/such/prompts.txt"),
        (["serve", "--port", "99999"], "--port"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments_one_line(capsys, model_dir, argv, expected):
    try:
        status = cli.main([*argv, "--model", str(model_dir)] if argv[0] == "generate" else argv)
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    _assert_one_line_error(status, err)
    assert expected in err


def test_binary_prompt_file_one_line(capsys, model_dir, tmp_path):
    prompt_file = tmp_path / "prompts.bin"
    prompt_file.write_bytes(b"line\n\xff\xfe\x00binary\n")
    status, _, err = run_cli(capsys, ["generate", "--file", str(prompt_file), "--model", str(model_dir)])
    _assert_one_line_error(status, err)
    assert "prompts.bin" in err
    assert "UTF-8" in err


def test_trace_directory_rejected_before_loading(capsys, model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "load_pipeline_from_args", lambda args: pytest.fail("the model must not load"))
    status, _, err = run_cli(capsys, ["generate", "x", "--model", str(model_dir), "--trace", str(tmp_path)])
    _assert_one_line_error(status, err)
    assert "--trace" in err


def test_out_of_memory_one_line(capsys, model_dir, monkeypatch):
    def fail(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 256000000512 bytes")

    monkeypatch.setattr(cli, "load_pipeline_from_args", fail)
    status, _, err = run_cli(capsys, ["generate", "x", "--model", str(model_dir)])
    _assert_one_line_error(status, err)
    assert "out of memory" in err
    assert "--max-new-tokens" in err


def test_other_runtime_error_keeps_traceback(model_dir, monkeypatch):
    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "load_pipeline_from_args", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["generate", "x", "--model", str(model_dir)])


def test_missing_model_dir_one_line(capsys, tmp_path):
    status, _, err = run_cli(capsys, ["generate", "x", "--model", str(tmp_path / "absent")])
    _assert_one_line_error(status, err)
    assert "not found" in err


def test_unreadable_checkpoint_one_line(capsys, model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    (broken / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    status, _, err = run_cli(capsys, ["generate", "x", "--model", str(broken)])
    _assert_one_line_error(status, err)
    assert "model.safetensors" in err


def test_missing_demo_model_message(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "default_model_dir", lambda: tmp_path / "demo")
    status, _, err = run_cli(capsys, ["generate", "x"])
    _assert_one_line_error(status, err)
    assert "demo model is not installed" in err


def test_console_entry_point_error(tmp_path):
    # A fresh interpreter, as the console script runs it, so the exit status and stderr are the real ones.
    result = subprocess.run(
        [sys.executable, "-m", "twotower.cli", "generate", "x", "--model", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=120,
    )
    _assert_one_line_error(result.returncode, result.stderr)
    assert result.stdout == ""


def test_convert_single_tower(capsys, tmp_path, model_dir):
    from twotower import NemotronHConfig, NemotronHForCausalLM, TwoTowerForCausalLM

    source = tmp_path / "single"
    NemotronHForCausalLM.from_config(NemotronHConfig.tiny(vocab_size=320)).save_pretrained(source)
    (source / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    target = tmp_path / "two"

    status, _, err = run_cli(capsys, ["convert", str(source), str(target)])
    assert status == 0, err
    model = TwoTowerForCausalLM.from_pretrained(target)
    assert model.config.vocab_size == 320
    assert (target / "tokenizer.json").is_file()

    status, _, err = run_cli(capsys, ["convert", str(source), str(target)])
    _assert_one_line_error(status, err)
    assert "already contains a checkpoint" in err


def test_serve_command_answers_health(model_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "twotower.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--served-model-name", "tiny", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start within 120 s"
                time.sleep(0.2)
        assert response.json()["model"] == "tiny"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "starting server" in err
    assert "stopped serving model tiny" in err


def test_no_progress_bar_without_terminal(capsys, model_dir):
    status, _, err = run_cli(capsys, ["generate", PROMPT, "--model", str(model_dir), "--mode", "ar",
                                      "--max-new-tokens", "4"])
    assert status == 0
    assert err == "", "progress bars are drawn only when stderr is a terminal"


def test_bench_runs_named_script(capfd, monkeypatch, tmp_path):
    (tmp_path / "echo_args.py").write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path)

    assert cli.main(["bench"]) == 0
    assert capfd.readouterr().out.split() == ["echo_args"]

    assert cli.main(["bench", "echo_args", "--size", "tiny"]) == 3
    assert "args ['--size', 'tiny']" in capfd.readouterr().out

    status = cli.main(["bench", "missing"])
    _assert_one_line_error(status, capfd.readouterr().err)


@pytest.mark.parametrize("command, option", [("train", "--stage"), ("eval", "--model")])
def test_delegated_command_help(capsys, command, option):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert option in out
    assert out.startswith(f"usage: twotower {command} ")


def test_generate_threads_option(capsys, model_dir):
    threads = torch.get_num_threads()
    try:
        status, _, err = run_cli(capsys, ["generate", PROMPT, "--model", str(model_dir), "--mode", "ar", "--threads", "1",
                                          *FAST])
        assert status == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)  # the option changes the whole test process


@pytest.mark.parametrize("value", ["0", "100000000000"])
def test_generate_threads_out_of_range(capsys, model_dir, value):
    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPT, "--model", str(model_dir), "--threads", value])
    assert "--threads" in capsys.readouterr().err


def test_generate_compile_option(capsys, model_dir, monkeypatch):
    from twotower import TwoTowerForCausalLM

    compiled = []
    monkeypatch.setattr(TwoTowerForCausalLM, "compile_steps", lambda self, **options: compiled.append(self) or self)
    status, _, err = run_cli(capsys, ["generate", PROMPT, "--model", str(model_dir), "--mode", "ar", "--compile", *FAST])
    assert status == 0, err
    assert len(compiled) == 1
