"""Helpers shared by the scripts in ``benchmarks/``: models, prompts, timed runs, peak memory, output.

Each benchmark script adds its common options with ``add_model_arguments`` and builds its model
with ``load_or_build_model``, or with ``build_on_device`` for models too large to build on the CPU.
It times generation with ``timed_generation`` and prints a Markdown table with ``format_table`` or
``print_report``. With ``--json PATH`` it also writes the rows and ``machine_info`` to a file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.checkpoint import parse_dtype
from twotower.config import NemotronHConfig
from twotower.two_tower import TwoTowerForCausalLM

MODES = ("ar", "mock_ar", "diffusion")
FIRST_ORDINARY_TOKEN = 4  # ids 0-3 are pad, BOS, EOS and mask in the released tokenizer


def config_150m() -> NemotronHConfig:
    """Return the config of a 156.4M-parameter two-tower model (both towers and heads): 12 layers, hidden 512, 24 experts."""
    return NemotronHConfig(
        vocab_size=32768,
        hidden_size=512,
        hybrid_override_pattern="MEM*EMEM*EME",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=16,
        mamba_head_dim=64,
        ssm_state_size=64,
        n_groups=2,
        chunk_size=64,
        n_routed_experts=24,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=512,
        intermediate_size=1024,
    )


SIZES: dict[str, Callable[[], NemotronHConfig]] = {
    "tiny": NemotronHConfig.tiny,
    "150m": config_150m,
    "30b": NemotronHConfig.nemotron_30b_a3b,
}


# ---------------------------------------------------------------------- models


def demo_model_dir() -> Path | None:
    """Return the bundled demo model directory (``twotower/demo``), or None when it is not installed."""
    directory = Path(str(importlib.resources.files("twotower") / "demo"))
    return directory if (directory / "config.json").is_file() else None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_benchmark_model(
    model_path: str | Path | None,
    size: str | None,
    dtype: str,
    device: str,
    seed: int = 0,
) -> tuple[TwoTowerForCausalLM, str]:
    """Load ``model_path``, or build a random model of ``size``; by default the demo model, else random tiny.

    Returns the model in eval mode and a one-line description for the report.
    """
    torch_dtype = None if dtype == "auto" else parse_dtype(dtype)
    if model_path is None and size is None:
        model_path = demo_model_dir()
        size = "tiny" if model_path is None else None
    if model_path is not None:
        model = TwoTowerForCausalLM.from_pretrained(model_path, dtype=torch_dtype, device=device)
        source = f"checkpoint {model_path}"
    else:
        if size not in SIZES:
            raise ValueError(f"size={size!r} is invalid; expected one of {sorted(SIZES)}")
        if size == "30b":
            model = build_on_device(SIZES[size](), device, torch_dtype or torch.bfloat16, seed)
        else:
            model = TwoTowerForCausalLM.from_config(SIZES[size](), seed=seed, dtype=torch_dtype or torch.float32)
            model = model.to(device)
        source = f"random weights, size {size}"
    model.eval()
    description = f"{source}, {count_parameters(model) / 1e6:.1f}M parameters, {model.dtype}, {model.device}"
    return model, description


@torch.no_grad()
def build_on_device(
    config: NemotronHConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0
) -> TwoTowerForCausalLM:
    """Build a random two-tower model directly on ``device``: shapes on the meta device, storage
    allocated on ``device`` with ``to_empty`` and initialised there, so the weights never pass through host memory."""
    device = torch.device(device)
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    model.to(dtype)
    # TopKRouter._apply copies its fp32 correction bias with `.to(device)`, which a meta tensor
    # cannot do, so give each router a real bias on the target device before to_empty.
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            bias = module.e_score_correction_bias
            module.e_score_correction_bias = torch.zeros(bias.shape, dtype=torch.float32, device=device)
    model.to_empty(device=device)

    # init_weights draws from the device's default generator when given none, and a CPU generator
    # cannot fill device tensors, so seed the default generator of the device instead.
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    model.init_weights(None)
    bad = [name for name, tensor in model.state_dict().items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise RuntimeError(f"initialisation left non-finite values in {len(bad)} tensors, first: {bad[:3]}")
    return model.eval()


# ---------------------------------------------------------------------- prompts


def random_prompts(
    lengths: Sequence[int], vocab_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-padded random prompts, one row per length; returns (input_ids, attention_mask or None)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(FIRST_ORDINARY_TOKEN, vocab_size, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, (None if bool(mask.all()) else mask)


def corpus_prompts(
    data_dir: str | Path, lengths: Sequence[int], vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-padded prompts cut from ``val.bin`` of a corpus folder at evenly spaced offsets, one row per length.

    A trained model is as confident on random ids as on nothing it has seen, so its speed in mask
    diffusion is only meaningful on text like its training data. With ``vocab_size`` (the model's),
    a corpus with more token ids raises ValueError.
    """
    from twotower.data import TokenDataset, load_meta

    meta = load_meta(data_dir)
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise ValueError(
            f"the corpus has {meta['vocab_size']} token ids and the model {vocab_size}: the prompts must come "
            "from the model's own tokenizer (random --size models do not match any corpus)"
        )
    val = TokenDataset(Path(data_dir) / meta.get("files", {}).get("val", "val.bin"))
    width = max(lengths)
    offsets = np.linspace(0, len(val) - width, len(lengths)).astype(np.int64)
    ids = torch.full((len(lengths), width), int(meta["pad_id"]), dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, (length, offset) in enumerate(zip(lengths, offsets)):
        ids[row, width - length :] = val.batch([offset], length)[0]
        mask[row, width - length :] = 1
    return ids, (None if bool(mask.all()) else mask)


def benchmark_prompts(args: argparse.Namespace, lengths: Sequence[int], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return prompts from ``--data-dir`` when it is given, else random ones (see ``add_prompt_arguments``)."""
    if getattr(args, "data_dir", None) is None:
        return random_prompts(lengths, vocab_size, args.seed)

    # Mistakes in --data-dir end the script with one line instead of a traceback.
    try:
        return corpus_prompts(args.data_dir, lengths, vocab_size)
    except (OSError, ValueError, IndexError) as error:
        raise SystemExit(f"--data-dir {args.data_dir}: {error}") from None


def prompt_source(args: argparse.Namespace) -> str:
    """Describe where the prompts of ``benchmark_prompts`` come from, for the report."""
    data_dir = getattr(args, "data_dir", None)
    return f"prompts from {data_dir}/val.bin" if data_dir is not None else "random prompts"


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="corpus folder whose val.bin supplies the prompts, as built by scripts/build_corpus.py "
                             "(default: random token ids, which only suit random weights)")


# ---------------------------------------------------------------------- timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of the block it wraps, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensors only, not the allocator's
    cache). CPU: the process's peak resident set size (``VmHWM``), reset through
    ``/proc/self/clear_refs`` on Linux. Where that reset is not possible the value is the peak since
    the process started (``getrusage``), so it never falls between runs. ``scope`` names the method used.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = 0.0
        self.scope = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.scope = "cuda max_memory_allocated"
        elif _reset_peak_rss():
            self.scope = "process peak RSS (reset per run)"
        else:
            self.scope = "process peak RSS since start"
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mib = _peak_rss_mib()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # "5" resets the peak RSS (VmHWM) of this process
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # the kernel reports kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_mode(
    model: TwoTowerForCausalLM,
    mode: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    block_size: int = 16,
    steps_per_block: int = 16,
    threshold: float = 0.9,
):
    """Run one greedy generation without EOS (every row produces ``max_new_tokens``); return the output."""
    common = dict(attention_mask=attention_mask, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    if mode == "ar":
        return model.generate(input_ids, do_sample=False, **common)
    if mode == "mock_ar":
        return model.generate_mock_ar(input_ids, temperature=0.0, **common)
    if mode == "diffusion":
        return model.generate_mask_diffusion(
            input_ids, block_size=block_size, steps_per_block=steps_per_block, temperature=0.0,
            confidence_threshold=threshold, **common,
        )
    raise ValueError(f"mode={mode!r} is invalid; expected one of {MODES}")


def timed_generation(
    model: TwoTowerForCausalLM,
    mode: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    repeats: int = 1,
    **mode_args: Any,
) -> dict[str, Any]:
    """Time ``repeats`` runs of one mode and return the statistics of the run with the median wall time.

    The returned row contains the ``GenerationStats`` fields, ``wall_s`` (host time around the call,
    after a device synchronisation), derived rates and ``peak_mib`` of that run.
    """
    device = model.device
    runs = []
    for _ in range(repeats):
        synchronize(device)
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            output = run_mode(model, mode, input_ids, attention_mask, max_new_tokens, **mode_args)
            synchronize(device)
            wall = time.perf_counter() - start
        runs.append((wall, output.stats, memory))
    runs.sort(key=lambda run: run[0])
    wall, stats, memory = runs[len(runs) // 2]

    row = stats.as_dict()
    generated = stats.generated_tokens
    decode_s = wall - stats.prefill_s
    # Row passes count each row once per denoiser pass, so a batch does not change this ratio.
    denoiser_passes_per_token = None
    if mode != "ar":
        denoiser_passes_per_token = stats.row_passes / generated if generated else 0.0
    row.update(
        mode=mode,
        batch=int(input_ids.shape[0]),
        wall_s=wall,
        wall_runs_s=[run[0] for run in runs],
        tokens_per_s=generated / wall if wall else 0.0,
        decode_tokens_per_s=generated / decode_s if decode_s > 0 else 0.0,
        decode_ms_per_token=1e3 * decode_s / generated if generated else 0.0,
        denoiser_passes_per_token=denoiser_passes_per_token,
        other_s=max(wall - stats.prefill_s - stats.context_s - stats.denoise_s - stats.sampling_s, 0.0),
        peak_mib=memory.mib,
        peak_memory_scope=memory.scope,
    )
    row.update({f"arg_{key}": value for key, value in mode_args.items()})
    return row


def warm_up(model: TwoTowerForCausalLM, modes: Sequence[str], input_ids: torch.Tensor, attention_mask, **mode_args: Any) -> None:
    """Run each mode once on a short generation so one-time costs (allocator growth, kernel
    selection, lazy imports) stay out of the measured runs."""
    for mode in modes:
        run_mode(model, mode, input_ids, attention_mask, max_new_tokens=mode_args.get("block_size", 16), **mode_args)
    synchronize(model.device)


# ---------------------------------------------------------------------- output


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Return the facts that bound a measurement: host, CPU, thread count, library versions, accelerator, date."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        index = torch.device(device or "cuda").index or 0
        properties = torch.cuda.get_device_properties(index)
        info["cuda_device"] = properties.name
        info["cuda_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["cuda_version"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Render ``rows`` as a Markdown table; ``columns`` are (header, row key, format spec)."""
    header = "| " + " | ".join(title for title, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif isinstance(value, (int, float)) and spec:
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


# ---------------------------------------------------------------------- command line


def parse_int_list(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers, for options such as ``--batches 1,4,16``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected comma-separated positive integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected comma-separated positive integers")
    return values


def add_model_arguments(parser: argparse.ArgumentParser, default_device: str = "cpu") -> None:
    """Add --model, --size, --dtype, --device, --seed, --threads, --compile and --json to a benchmark's parser."""
    parser.add_argument("--model", type=Path, default=None,
                        help="two-tower checkpoint directory (default: the bundled demo model, "
                             "or random tiny weights when the demo is not installed)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="build a random model of this size instead of loading one "
                             "(tiny: 0.45M parameters, 150m: 156.4M, 30b: the 63.2B-parameter release sizes)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype; auto keeps the checkpoint's, or float32 for random models (default: auto)")
    parser.add_argument("--device", default=default_device, help=f"PyTorch device (default: {default_device})")
    add_seed_argument(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice, usually the core count)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model's steps with torch.compile; warm-up runs absorb the compilation")
    add_json_argument(parser)


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default: 0)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def add_diffusion_arguments(parser: argparse.ArgumentParser, threshold: bool = True) -> None:
    """Add the mask-diffusion options --block-size and --steps, and --threshold unless ``threshold`` is false."""
    parser.add_argument("--block-size", type=int, default=16, help="mask-diffusion block size (default: 16)")
    parser.add_argument("--steps", type=int, default=16, help="mask-diffusion steps per block (default: 16)")
    if threshold:
        parser.add_argument("--threshold", type=float, default=0.9, help="confidence threshold (default: 0.9)")


def diffusion_mode_args(args: argparse.Namespace) -> dict[str, Any]:
    """Return the ``run_mode`` keywords set by the options of ``add_diffusion_arguments``."""
    return dict(block_size=args.block_size, steps_per_block=args.steps, threshold=args.threshold)


def apply_thread_setting(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} is invalid: expected a positive integer")
        torch.set_num_threads(threads)


def load_or_build_model(args: argparse.Namespace) -> tuple[TwoTowerForCausalLM, str]:
    """Apply --threads, then load or build the model selected by the options of ``add_model_arguments``.

    Returns the model in eval mode and its one-line description, as ``load_benchmark_model`` does.
    """
    apply_thread_setting(args.threads)
    model, description = load_benchmark_model(args.model, args.size, args.dtype, args.device, args.seed)
    if getattr(args, "compile", False):
        model.compile_steps()
        description += ", compiled"
    return model, description


def machine_summary(machine: dict[str, Any]) -> str:
    """Format a ``machine_info`` result as the "machine:" line of a report."""
    return (f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
            f"{machine['torch_threads']} threads, {machine.get('cuda_device', 'no CUDA')}; {machine['date_utc']}")


def print_report(
    description: str,
    settings: str,
    machine: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str, str]],
) -> None:
    """Print the model, the run's ``settings`` line, the machine and the memory scope, then the table of ``rows``."""
    print(f"model: {description}")
    print(settings)
    print(machine_summary(machine))
    print(f"peak memory: {rows[0]['peak_memory_scope']}")
    print()
    print(format_table(rows, columns))


def write_report(
    args: argparse.Namespace, benchmark: str, description: str, machine: dict[str, Any], **results: Any
) -> None:
    """Write the benchmark name, model, arguments, machine and ``results`` to ``args.json``, when it is set."""
    if args.json is not None:
        write_json(args.json, {"benchmark": benchmark, "model": description, "arguments": vars(args),
                               "machine": machine, **results})
