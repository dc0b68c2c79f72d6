"""Measure how mask-diffusion throughput scales with the batch size (default batches 1, 4 and 16).

Rows of a batch get prompts of different lengths, left-padded with an attention mask. Throughput
is generated tokens over all rows per second of wall time, compared with batch 1 in the same run.
The rows of a batch share each denoiser pass, so a block takes as many passes as its slowest row;
the "passes/block" column shows that. Greedy decoding without EOS, so every row produces
--new-tokens tokens.

    python benchmarks/bench_batch.py --size 150m --batches 1,4,16 --json results/batch_150m.json
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
    diffusion_mode_args,
    load_or_build_model,
    machine_info,
    median,
    parse_int_list,
    print_report,
    prompt_source,
    timed_generation,
    warm_up,
    write_report,
)

COLUMNS = [
    ("batch", "batch", "d"),
    ("prompt lengths", "prompt_lengths_text", ""),
    ("tok/s", "tokens_per_s", ".1f"),
    ("vs batch 1", "ratio_to_batch_1", ".2f"),
    ("denoiser passes", "denoiser_passes", "d"),
    ("passes/block", "median_passes_per_block", ".1f"),
    ("denoiser passes/token", "denoiser_passes_per_token", ".2f"),
    ("prefill s", "prefill_s", ".3f"),
    ("denoise s", "denoise_s", ".3f"),
    ("sampling s", "sampling_s", ".3f"),
    ("context s", "context_s", ".3f"),
    ("wall s", "wall_s", ".3f"),
    ("peak MiB", "peak_mib", ".0f"),
]


def prompt_lengths(batch: int, longest: int) -> list[int]:
    """Spread ``batch`` prompt lengths evenly from half of ``longest`` to ``longest`` (all equal for batch 1)."""
    if batch == 1:
        return [longest]
    shortest = max(1, longest // 2)
    return [shortest + (longest - shortest) * row // (batch - 1) for row in range(batch)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--batches", type=parse_int_list, default=[1, 4, 16],
                        help="batch sizes, comma-separated (default: 1,4,16)")
    parser.add_argument("--prompt-length", type=int, default=64,
                        help="longest prompt in tokens; rows range from half of it to all of it (default: 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default: 64)")
    add_diffusion_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per batch size; the table shows the median run (default: 3)")
    return parser


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, description = load_or_build_model(args)
    diffusion_args = diffusion_mode_args(args)

    rows = []
    for batch in args.batches:
        lengths = prompt_lengths(batch, args.prompt_length)
        input_ids, attention_mask = benchmark_prompts(args, lengths, model.config.vocab_size)
        warm_up(model, ("diffusion",), input_ids, attention_mask, **diffusion_args)
        row = timed_generation(
            model, "diffusion", input_ids, attention_mask, args.new_tokens, args.repeats, **diffusion_args
        )
        row["prompt_lengths"] = lengths
        row["prompt_lengths_text"] = f"{min(lengths)}-{max(lengths)}" if batch > 1 else str(lengths[0])
        row["median_passes_per_block"] = median(row["passes_per_block"])
        rows.append(row)
    base = next((row["tokens_per_s"] for row in rows if row["batch"] == 1), None)
    for row in rows:
        row["ratio_to_batch_1"] = row["tokens_per_s"] / base if base else None

    machine = machine_info(args.device)
    settings = (f"{prompt_source(args)}, mask diffusion, block {args.block_size}, {args.steps} steps, threshold {args.threshold:g}, "
                f"{args.new_tokens} new tokens per row, greedy, no EOS; median of {args.repeats} runs")
    print_report(description, settings, machine, rows, COLUMNS)
    write_report(args, "batch", description, machine, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
