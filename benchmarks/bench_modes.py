"""Compare the generation modes of one two-tower model: AR, mock-AR and mask diffusion at several thresholds.

For each mode: tokens per second, denoiser passes per token, the split of the time between the
prefill, context extension, denoising and sampling, peak memory, and the speed relative to plain AR
(context tower only) measured in the same run. Greedy decoding without EOS, so every run produces
exactly --new-tokens tokens.

    python benchmarks/bench_modes.py                    # demo model, or random tiny weights
    python benchmarks/bench_modes.py --size 150m --json results/modes_150m.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from twotower.benchmarking import (
    add_diffusion_arguments,
    add_model_arguments,
    add_prompt_arguments,
    benchmark_prompts,
    load_or_build_model,
    machine_info,
    print_report,
    prompt_source,
    timed_generation,
    warm_up,
    write_report,
)

DEFAULT_THRESHOLDS = "0.5,0.6,0.7,0.8,0.9,1.0"

COLUMNS = [
    ("mode", "label", ""),
    ("tok/s", "tokens_per_s", ".1f"),
    ("vs AR", "ratio_to_ar", ".2f"),
    ("denoiser passes/token", "denoiser_passes_per_token", ".2f"),
    ("prefill s", "prefill_s", ".3f"),
    ("context s", "context_s", ".3f"),
    ("denoise s", "denoise_s", ".3f"),
    ("sampling s", "sampling_s", ".3f"),
    ("other s", "other_s", ".3f"),
    ("wall s", "wall_s", ".3f"),
    ("peak MiB", "peak_mib", ".0f"),
]


def parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected comma-separated numbers in [0, 1]") from None
    if not values or any(not 0.0 <= value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected comma-separated numbers in [0, 1]")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt tokens (default: 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default: 64)")
    add_diffusion_arguments(parser, threshold=False)
    parser.add_argument("--thresholds", type=parse_thresholds, default=parse_thresholds(DEFAULT_THRESHOLDS),
                        help=f"mask-diffusion confidence thresholds (default: {DEFAULT_THRESHOLDS})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per mode; the table shows the run with the median wall time (default: 3)")
    return parser


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, description = load_or_build_model(args)
    input_ids, attention_mask = benchmark_prompts(args, [args.prompt_length], model.config.vocab_size)
    diffusion_args = dict(block_size=args.block_size, steps_per_block=args.steps)

    warm_up(model, ("ar", "mock_ar", "diffusion"), input_ids, attention_mask, **diffusion_args)
    rows = []
    for mode in ("ar", "mock_ar"):
        row = timed_generation(model, mode, input_ids, attention_mask, args.new_tokens, args.repeats)
        row["label"] = mode
        rows.append(row)
    for threshold in args.thresholds:
        row = timed_generation(
            model, "diffusion", input_ids, attention_mask, args.new_tokens, args.repeats,
            threshold=threshold, **diffusion_args,
        )
        row["label"] = f"diffusion t={threshold:g}"
        rows.append(row)
    ar_speed = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_to_ar"] = row["tokens_per_s"] / ar_speed if ar_speed else None

    machine = machine_info(args.device)
    settings = (f"{prompt_source(args)} of {args.prompt_length} tokens, {args.new_tokens} new tokens, batch 1, greedy, no EOS; "
                f"diffusion block {args.block_size}, {args.steps} steps; median of {args.repeats} runs")
    print_report(description, settings, machine, rows, COLUMNS)
    write_report(args, "modes", description, machine, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
