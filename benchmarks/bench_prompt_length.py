"""Measure prefill time and per-token decode cost against the prompt length, for AR and mask diffusion.

Prompt lengths double from 256 up to --max-length (default 4096 on the CPU, 16384 on CUDA). For
each length and mode: the prefill time (one causal pass of the context tower over the prompt) and
the decode cost per generated token (wall time after the prefill over generated tokens). Batch 1,
greedy decoding without EOS.

    python benchmarks/bench_prompt_length.py --size 150m --max-length 4096 --json results/prompt_150m.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from twotower.benchmarking import (
    add_diffusion_arguments,
    add_model_arguments,
    diffusion_mode_args,
    load_or_build_model,
    machine_info,
    parse_int_list,
    print_report,
    random_prompts,
    timed_generation,
    warm_up,
    write_report,
)

MODES = ("ar", "diffusion")
COLUMNS = [
    ("prompt", "prompt_length", "d"),
    ("mode", "mode", ""),
    ("prefill s", "prefill_s", ".3f"),
    ("prefill tok/s", "prefill_tokens_per_s", ".0f"),
    ("decode ms/token", "decode_ms_per_token", ".2f"),
    ("denoiser passes/token", "denoiser_passes_per_token", ".2f"),
    ("wall s", "wall_s", ".3f"),
    ("peak MiB", "peak_mib", ".0f"),
]


def default_lengths(max_length: int) -> list[int]:
    """256, 512, ... doubling up to ``max_length`` (and ``max_length`` itself when it is no power of two)."""
    lengths = []
    length = 256
    while length <= max_length:
        lengths.append(length)
        length *= 2
    if not lengths or lengths[-1] != max_length:
        lengths.append(max_length)
    return lengths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest prompt in tokens (default: 4096 on the CPU, 16384 on CUDA)")
    parser.add_argument("--lengths", type=parse_int_list, default=None,
                        help="explicit prompt lengths, comma-separated (overrides --max-length)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default: 32)")
    add_diffusion_arguments(parser)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per length and mode; the table shows the median run (default: 1)")
    return parser


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, description = load_or_build_model(args)
    if args.lengths is not None:
        lengths = args.lengths
    else:
        max_length = args.max_length or (16384 if model.device.type == "cuda" else 4096)
        lengths = default_lengths(max_length)
    diffusion_args = diffusion_mode_args(args)

    short_ids, _ = random_prompts([min(lengths)], model.config.vocab_size, args.seed)
    warm_up(model, MODES, short_ids, None, **diffusion_args)
    rows = []
    for length in lengths:
        input_ids, attention_mask = random_prompts([length], model.config.vocab_size, args.seed)
        for mode in MODES:
            extra = diffusion_args if mode == "diffusion" else {}
            row = timed_generation(model, mode, input_ids, attention_mask, args.new_tokens, args.repeats, **extra)
            row["prompt_length"] = length
            row["prefill_tokens_per_s"] = length / row["prefill_s"] if row["prefill_s"] else None
            rows.append(row)
            print(f"prompt {length}, {mode}: prefill {row['prefill_s']:.3f} s, "
                  f"decode {row['decode_ms_per_token']:.2f} ms/token", file=sys.stderr)

    machine = machine_info(args.device)
    settings = (f"batch 1, {args.new_tokens} new tokens, greedy, no EOS; diffusion block {args.block_size}, "
                f"{args.steps} steps, threshold {args.threshold:g}; median of {args.repeats} runs")
    print_report(description, settings, machine, rows, COLUMNS)
    write_report(args, "prompt_length", description, machine, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
