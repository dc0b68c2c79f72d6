"""The ``twotower`` command line: generate, serve, train, eval, bench and convert.

Every command reports a failure as one line on stderr and exits non-zero: 2 for invalid arguments
(argparse's convention), 1 for anything else that fails (missing files, unreadable checkpoints,
invalid sampler values), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import json
import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from twotower.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

DIFFUSION_ONLY = ("block_size", "steps_per_block", "threshold")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class CommandError(Exception):
    """A failure to report as one line on stderr (exit status 1)."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block) on stderr, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------- argument types


def _integer(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is invalid: expected an integer >= {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is invalid: expected an integer in [{minimum}, {maximum}]")
        return value

    return parse


def _number(minimum: float, maximum: float | None = None, open_minimum: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
        too_small = value <= minimum if open_minimum else value < minimum
        # float() parses "nan" and "inf", and neither is a usable sampler value.
        if too_small or (maximum is not None and value > maximum) or not math.isfinite(value):
            bracket = "(" if open_minimum else "["
            upper = f"{maximum}]" if maximum is not None else "inf)"
            kind = "a number" if math.isfinite(value) else "a finite number"
            raise argparse.ArgumentTypeError(f"{text} is invalid: expected {kind} in {bracket}{minimum}, {upper}")
        return value

    return parse


# The seed range that torch.Generator.manual_seed accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is invalid: expected an integer in [-2**63, 2**64 - 1]")
    return value


def _port(text: str) -> int:
    value = _integer(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is invalid: expected a TCP port in [0, 65535]")
    return value


# ---------------------------------------------------------------------- parser


def default_model_dir() -> Path:
    """Return the directory of the demo model bundled with the package (``twotower/demo``)."""
    return Path(str(importlib.resources.files("twotower") / "demo"))


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory: config.json, safetensors weights and tokenizer.json "
                             "(default: the bundled demo model, twotower/demo)")
    parser.add_argument("--device", default="cpu",
                        help="PyTorch device for both towers, such as cpu, cuda or cuda:1 (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype; auto keeps the checkpoint's dtype (default: auto)")
    parser.add_argument("--ctx-device", default=None,
                        help="device of the context tower, overriding --device for it")
    parser.add_argument("--den-device", default=None,
                        help="device of the denoiser tower, overriding --device for it")
    # torch.set_num_threads takes a C int, so larger values overflow inside PyTorch.
    parser.add_argument("--threads", type=_integer(1, 2**31 - 1), default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice, one per core); on a machine "
                             "that other jobs keep busy, --threads 1 avoids threads waiting on each other")
    parser.add_argument("--compile", action="store_true",
                        help="compile the context tower and the denoiser pass with torch.compile; the first "
                             "generation then takes minutes longer, and on a CPU the compiled model measured "
                             "slower than the eager one (default: off)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide progress bars (they are shown only when stderr is a terminal)")


def _add_generate_parser(commands) -> None:
    parser = commands.add_parser(
        "generate", help="generate text from prompts",
        description="Generate text for one or more prompts. The prompt is the PROMPT argument, else "
                    "the lines of --file, else the lines of stdin. Sampler options left out take the "
                    "model's generation_config.json values.")
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt text")
    parser.add_argument("--file", type=Path, default=None,
                        help="file of prompts, one per line, or JSON Lines with a 'prompt' field; - reads stdin")
    _add_model_arguments(parser)
    parser.add_argument("--mode", choices=["diffusion", "mock-ar", "ar"], default=None,
                        help="generation mode: diffusion (block-wise mask diffusion), mock-ar (denoiser, "
                             "one token per pass) or ar (context tower only) (default: diffusion)")
    parser.add_argument("--max-new-tokens", type=_integer(1), default=None,
                        help="maximum number of generated tokens per prompt")
    parser.add_argument("--block-size", type=_integer(1), default=None,
                        help="diffusion: tokens per block, filled in parallel")
    parser.add_argument("--steps-per-block", type=_integer(1), default=None,
                        help="diffusion: maximum denoiser passes per block")
    parser.add_argument("--threshold", type=_number(0.0, 1.0), default=None,
                        help="diffusion: confidence (probability, 0 to 1) above which a masked position "
                             "is committed in the current pass; every pass also commits at least one position, "
                             "and enough to finish the block within --steps-per-block passes")
    parser.add_argument("--temperature", type=_number(0.0), default=None,
                        help="sampling temperature; 0 selects the most likely token (greedy)")
    parser.add_argument("--top-k", type=_integer(0), default=None,
                        help="sample only from the k most likely tokens; 0 disables the filter")
    parser.add_argument("--top-p", type=_number(0.0, 1.0, open_minimum=True), default=None,
                        help="sample only from the smallest token set whose probability reaches p (0 < p <= 1)")
    parser.add_argument("--seed", type=_seed, default=None, help="random seed for sampling (integer)")
    parser.add_argument("--batch-size", type=_integer(1), default=8,
                        help="prompts generated together in one batch (default: 8)")
    parser.add_argument("--stream", action="store_true",
                        help="print text as it is committed: per block in diffusion mode, per token otherwise")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (text, tokens, finish_reason, stats); "
                             "with --stream, also one object per chunk")
    parser.add_argument("--show-steps", action="store_true",
                        help="diffusion: show each block resolving, pass by pass, on stderr")
    parser.add_argument("--trace", type=Path, default=None, metavar="FILE",
                        help="diffusion: write the denoising trace to FILE as a self-contained HTML page")
    parser.set_defaults(handler=run_generate)


def _add_serve_parser(commands) -> None:
    parser = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API",
                                 description="Serve /v1/completions, /v1/chat/completions, /v1/models and /health.")
    _add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (default: 8000)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id that requests must name (default: the model directory's name)")
    parser.add_argument("--max-queue", type=_integer(1), default=64,
                        help="requests waiting for the model before new ones get 503 (default: 64)")
    parser.add_argument("--max-batch-rows", type=_integer(1), default=8,
                        help="maximum prompts generated together in one batch (default: 8)")
    parser.add_argument("--max-prompt-tokens", type=_integer(1), default=4096,
                        help="maximum prompt length of a request, in tokens (default: 4096)")
    parser.add_argument("--max-tokens-limit", type=_integer(1), default=1024,
                        help="maximum max_tokens a request may ask for (default: 1024)")
    parser.add_argument("--max-body-bytes", type=_integer(1), default=4 * 1024 * 1024,
                        help="maximum size of a request body in bytes; larger requests get 413 "
                             "(default: 4194304, which is 4 MiB)")
    parser.add_argument("--body-timeout", type=_number(0.0, open_minimum=True), default=30.0,
                        help="seconds a client may take to send a request body; slower requests get 408 "
                             "(default: 30)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="logging level (default: info)")
    parser.set_defaults(handler=run_serve)


def _add_delegating_parser(commands, name: str, help_text: str) -> None:
    # main() hands these commands their raw arguments before this parser runs; it exists for --help.
    parser = commands.add_parser(name, help=help_text, add_help=False)
    parser.add_argument("args", nargs=argparse.REMAINDER)


def _add_bench_parser(commands) -> None:
    parser = commands.add_parser("bench", help="run a script from benchmarks/",
                                 description="Run benchmarks/NAME.py with the remaining arguments; "
                                             "without NAME, list the scripts.")
    parser.add_argument("name", nargs="?", default=None, help="benchmark script name, with or without .py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    parser.set_defaults(handler=run_bench)


def _add_convert_parser(commands) -> None:
    parser = commands.add_parser(
        "convert", help="start a two-tower checkpoint from a single-tower Nemotron-H checkpoint",
        description="Copy a single-tower Nemotron-H checkpoint into both towers with fresh time "
                    "conditioning and save it, with the source's tokenizer files, to DST.")
    parser.add_argument("src", type=Path, help="single-tower checkpoint directory")
    parser.add_argument("dst", type=Path, help="output directory (created; must not contain a checkpoint)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the saved weights; auto keeps the source's (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the time-conditioning initialisation (default: 0)")
    parser.add_argument("--max-shard-size", default="2GB", help="maximum size of one weight file, such as 2GB (default: 2GB)")
    parser.set_defaults(handler=run_convert)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="twotower", description="Two-tower block-diffusion language models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True
    _add_generate_parser(commands)
    _add_serve_parser(commands)
    _add_delegating_parser(commands, "train", "train a tower or the denoiser (twotower train --help lists the options)")
    _add_delegating_parser(commands, "eval", "evaluate a model (runs twotower.evaluation with the remaining arguments)")
    _add_bench_parser(commands)
    _add_convert_parser(commands)
    return parser


# ---------------------------------------------------------------------- shared helpers


def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == name:
            return None
        raise


def _missing(command: str, reason: str) -> int:
    raise CommandError(f"'twotower {command}' is not available in this installation: {reason}")


def _show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def check_device(name: str | None, option: str) -> None:
    """Raise ``ValueError`` unless PyTorch can use device ``name``."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} {name!r} is invalid: expected a PyTorch device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"{option} {name} is not available: PyTorch sees {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {name} is not available: PyTorch reports no MPS device")
    elif device.type == "meta":
        raise ValueError(f"{option} {name} is invalid: meta tensors hold no data, so they cannot generate")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and not is_available():
            raise ValueError(f"{option} {name} is not available: PyTorch reports no {device.type} device")


def resolve_model_dir(model: Path | None) -> Path:
    if model is not None:
        if not model.is_dir():
            raise CommandError(f"model directory not found: {model}")
        return model
    demo = default_model_dir()
    if not (demo / "config.json").is_file():
        raise CommandError(f"the bundled demo model is not installed ({demo} has no config.json); "
                           "pass --model PATH to use another model directory")
    return demo


def load_pipeline_from_args(args: argparse.Namespace):
    """Load the pipeline named by the model and device options, with a progress bar when enabled."""
    from tqdm import tqdm

    from twotower.pipeline import load_pipeline

    for option, value in (("--device", args.device), ("--ctx-device", args.ctx_device), ("--den-device", args.den_device)):
        check_device(value, option)
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    path = resolve_model_dir(args.model)
    with tqdm(total=3, desc="loading", unit="stage", file=sys.stderr, disable=not _show_progress(args),
              leave=False) as bar:
        started: list[str] = []

        def report(stage: str) -> None:
            if started:
                bar.update(1)
            started.append(stage)
            bar.set_description(f"loading {stage}")

        pipeline = load_pipeline(path, device=args.device, dtype=args.dtype, ctx_device=args.ctx_device,
                                 den_device=args.den_device, progress=report)
        bar.update(1)
    if getattr(args, "compile", False):
        pipeline.model.compile_steps()
    return pipeline


# ---------------------------------------------------------------------- generate


def read_prompts(args: argparse.Namespace, stdin: TextIO) -> list[str | list[int]]:
    """Return the prompts of the PROMPT argument, --file or stdin."""
    if args.prompt is not None and args.file is not None:
        raise CommandError("give either a PROMPT argument or --file, not both")
    if args.prompt is not None:
        return [args.prompt]
    if args.file is not None and str(args.file) != "-":
        if not args.file.exists():  # exists(), not is_file(), so that shell pipes such as <(...) work
            raise CommandError(f"prompt file not found: {args.file}")
        try:
            text = args.file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CommandError(f"prompt file {args.file} is not UTF-8 text: {error.reason} at byte {error.start}") from None
        source = str(args.file)
    else:
        if stdin.isatty():
            raise CommandError("no prompt given: pass PROMPT, --file FILE, or pipe prompts into stdin")
        text = stdin.read()
        source = "stdin"
    prompts = parse_prompt_lines(text, source)
    if not prompts:
        raise CommandError(f"no prompts in {source}: expected one prompt per line")
    return prompts


def parse_prompt_lines(text: str, source: str) -> list[str | list[int]]:
    """Split ``text`` into prompts, one per non-empty line. A line starting with ``{`` is a JSON
    object whose ``prompt`` field contains a string or a list of token ids."""
    prompts: list[str | list[int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CommandError(f"{source} line {number} is not valid JSON: {error.msg}") from None
        prompt = record.get("prompt")
        is_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not isinstance(prompt, str) and not is_ids:
            raise CommandError(f"{source} line {number} has no valid 'prompt' field: expected a string or a list of token ids")
        prompts.append(prompt)
    return prompts


def _sampler_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "block_size": args.block_size,
        "steps_per_block": args.steps_per_block,
        "confidence_threshold": args.threshold,
        "seed": args.seed,
    }


def _check_generate_arguments(args: argparse.Namespace, mode: str) -> None:
    if mode == "diffusion":
        return
    for name in DIFFUSION_ONLY:
        if getattr(args, name) is not None:
            raise CommandError(f"--{name.replace('_', '-')} applies only to --mode diffusion, not {mode}")
    if args.show_steps or args.trace is not None:
        option = "--show-steps" if args.show_steps else "--trace"
        raise CommandError(f"{option} needs --mode diffusion: the {mode} mode has no denoising steps")


class _StepHooks:
    """The ``on_step`` hook of --show-steps and --trace, or ``None`` as ``hook`` when neither is set."""

    def __init__(self, args: argparse.Namespace, pipeline):
        from twotower.trace import StepView, TraceRecorder

        self.pipeline = pipeline
        self.recorder = TraceRecorder(pipeline.token_text) if args.trace is not None else None
        self.view = None
        if args.show_steps:
            ansi = sys.stderr.isatty()
            width = shutil.get_terminal_size().columns if ansi else 80
            self.view = StepView(sys.stderr, pipeline.token_text, pipeline.mask_token_id, ansi=ansi, width=width)

    @property
    def hook(self):
        return self if self.view is not None or self.recorder is not None else None

    def begin_batch(self, start: int, batch: list[str | list[int]]) -> None:
        if self.recorder is not None:
            self.recorder.begin_batch([p if isinstance(p, str) else self.pipeline.decode(p) for p in batch])
        if self.view is not None:
            self.view.begin_batch(start)

    def __call__(self, event) -> None:
        if self.view is not None:
            self.view(event)
        if self.recorder is not None:
            self.recorder(event)


def run_generate(args: argparse.Namespace, stdout: TextIO | None = None, stdin: TextIO | None = None) -> int:
    from tqdm import tqdm

    from twotower.trace import write_html

    stdout = stdout or sys.stdout
    prompts = read_prompts(args, stdin or sys.stdin)
    if args.trace is not None and not args.trace.parent.is_dir():
        raise CommandError(f"trace directory not found: {args.trace.parent}")
    if args.trace is not None and args.trace.is_dir():
        raise CommandError(f"--trace {args.trace} is a directory: expected the path of an HTML file")
    pipeline = load_pipeline_from_args(args)
    settings = pipeline.settings(args.mode, **_sampler_overrides(args))
    _check_generate_arguments(args, settings.mode)

    hooks = _StepHooks(args, pipeline)
    writer = _OutputWriter(stdout, args.json, args.stream, many=len(prompts) > 1)
    # Streaming plain text prints one prompt at a time, so that outputs never interleave.
    batch_size = 1 if args.stream and not args.json else args.batch_size
    show_bar = _show_progress(args) and not args.stream and not args.show_steps
    with tqdm(total=len(prompts) * settings.max_new_tokens, desc="generating", unit="tok", file=sys.stderr,
              disable=not show_bar, leave=False) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            hooks.begin_batch(start, batch)
            _generate_batch(pipeline, batch, start, settings, hooks.hook, writer, bar)

    if hooks.recorder is not None:
        write_html(hooks.recorder, args.trace)
        print(f"trace written to {args.trace}", file=sys.stderr)
    return 0


def _generate_batch(pipeline, batch, start: int, settings, on_step, writer: "_OutputWriter", bar) -> None:
    steps = pipeline.stream(batch, on_step=on_step, **settings.__dict__)
    produced = [0] * len(batch)
    while True:
        try:
            deltas = next(steps)
        except StopIteration as done:
            results = done.value
            break
        for delta in deltas:
            writer.chunk(start + delta.index, delta)
            produced[delta.index] += len(delta.token_ids)
            bar.update(len(delta.token_ids))
            if delta.finish_reason is not None:
                # The bar counts max_new_tokens per prompt, so a row that stops early fills the rest.
                bar.update(max(0, settings.max_new_tokens - produced[delta.index]))
    for result in results:
        result.index += start
        writer.result(result)


class _OutputWriter:
    """Print streamed chunks and final results as plain text or JSON Lines."""

    def __init__(self, stream: TextIO, as_json: bool, streaming: bool, many: bool):
        self.stream = stream
        self.as_json = as_json
        self.streaming = streaming
        self.many = many

    def chunk(self, index: int, delta) -> None:
        if not self.streaming:
            return
        if self.as_json:
            record = {"index": index, "delta": delta.text, "tokens": delta.token_ids}
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            self.stream.write(delta.text)
        self.stream.flush()

    def result(self, result) -> None:
        if self.as_json:
            self.stream.write(json.dumps(result.as_dict(), ensure_ascii=False) + "\n")
        elif self.streaming:
            self.stream.write("\n")
        else:
            if self.many and result.index > 0:
                self.stream.write("\n")
            self.stream.write(result.text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------- other commands


def run_serve(args: argparse.Namespace) -> int:
    from twotower import server

    logging.getLogger("twotower").setLevel(args.log_level.upper())
    pipeline = load_pipeline_from_args(args)
    name = args.served_model_name or resolve_model_dir(args.model).name
    limits = server.ServerLimits(max_queue=args.max_queue, max_batch_rows=args.max_batch_rows,
                                 max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                                 max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout)
    server.serve(pipeline, host=args.host, port=args.port, model_name=name, limits=limits, log_level=args.log_level)
    return 0


def run_train(argv: list[str]) -> int:
    add_arguments = run_from_args = None
    for name in ("twotower.training", "twotower.training.cli"):
        module = _optional_module(name)
        add_arguments = getattr(module, "add_train_arguments", None)
        run_from_args = getattr(module, "run_from_args", None)
        if add_arguments is not None and run_from_args is not None:
            break
    else:
        return _missing("train", "neither twotower.training nor twotower.training.cli provides "
                                 "add_train_arguments and run_from_args")
    parser = ArgumentParser(prog="twotower train", description="Train a Nemotron-H tower (stage 1) or the "
                                                               "denoiser of a two-tower model (stage 2).")
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))
    return 0


def run_eval(argv: list[str]) -> int:
    evaluation = _optional_module("twotower.evaluation")
    entry = getattr(evaluation, "main", None)
    if entry is None:
        return _missing("eval", "the module twotower.evaluation or its main() is missing")
    return int(entry(argv, prog="twotower eval") or 0)


def benchmarks_dir() -> Path:
    """``benchmarks/`` next to the package, which exists in a source checkout only."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def run_bench(args: argparse.Namespace) -> int:
    directory = benchmarks_dir()
    scripts = sorted(p for p in directory.glob("*.py") if not p.name.startswith("_")) if directory.is_dir() else []
    if not scripts:
        return _missing("bench", f"no benchmark scripts in {directory} (they ship with the source checkout)")
    if args.name is None:
        for script in scripts:
            print(script.stem)
        return 0
    name = args.name if args.name.endswith(".py") else args.name + ".py"
    script = directory / name
    if not script.is_file():
        names = ", ".join(s.stem for s in scripts)
        raise CommandError(f"benchmark {args.name!r} not found in {directory}: expected one of {names}")
    return subprocess.call([sys.executable, str(script), *args.args])


def run_convert(args: argparse.Namespace) -> int:
    from twotower.two_tower import TwoTowerForCausalLM

    if not args.src.is_dir():
        raise CommandError(f"source checkpoint directory not found: {args.src}")
    if (args.dst / "config.json").exists():
        raise CommandError(f"{args.dst} already contains a checkpoint (config.json); choose an empty directory")
    dtype = None if args.dtype == "auto" else args.dtype
    model = TwoTowerForCausalLM.from_single_tower(args.src, dtype=dtype, seed=args.seed)
    args.dst.mkdir(parents=True, exist_ok=True)
    remote_code = _optional_module("twotower.hf_remote") is not None
    model.save_pretrained(args.dst, max_shard_size=args.max_shard_size, remote_code=remote_code)
    copied = [name for name in TOKENIZER_FILES if (args.src / name).is_file()]
    for name in copied:
        shutil.copy2(args.src / name, args.dst / name)
    print(f"wrote two-tower checkpoint to {args.dst} (copied {', '.join(copied) or 'no tokenizer files'})",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- entry point


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _is_out_of_memory(error: RuntimeError) -> bool:
    # torch.OutOfMemoryError covers accelerators, but the CPU allocator raises a plain RuntimeError.
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = {"train": run_train, "eval": run_eval}
    if argv and argv[0] in delegated:
        # These commands parse their own options, so errors in their modules never break the others.
        command, handler, handler_args = argv[0], delegated[argv[0]], argv[1:]
    else:
        args = build_parser().parse_args(argv)
        command, handler, handler_args = args.command, args.handler, args
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(handler(handler_args) or 0)
    except (CommandError, CheckpointError, ValueError, OSError) as error:
        print(f"twotower {command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        hint = "; lower --max-new-tokens, --batch-size or the prompt length" if command == "generate" else ""
        print(f"twotower {command}: error: out of memory: {_one_line(error)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"twotower {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
