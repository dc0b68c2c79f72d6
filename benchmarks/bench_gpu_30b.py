"""Time AR and mask diffusion at the real 30B-A3B layer sizes on one GPU, with random weights.

Both towers use ``NemotronHConfig.nemotron_30b_a3b()`` (52 layers, hidden 2688, 128 experts, 6 per
token), 63.2B parameters in all, in bf16: about 118 GiB of weights, which fits one 141 GB H200. The
model is built on the meta device and its storage allocated and initialised directly on the GPU,
so the weights never pass through host memory. The script reports tokens per second for AR (context tower
only) and mask diffusion at batch 1 and 16, and the GPU memory used. It stops starting new
measurements once --budget-s seconds have passed, so a run ends in about five minutes.

Without a CUDA device it prints "skipped: no CUDA device" and exits with status 0. For a dry run of
the whole script on the CPU use a small size: ``--device cpu --size tiny``.

    python benchmarks/bench_gpu_30b.py --json results/gpu_30b.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from twotower.benchmarking import (
    SIZES,
    add_diffusion_arguments,
    add_json_argument,
    add_seed_argument,
    build_on_device,
    count_parameters,
    diffusion_mode_args,
    format_table,
    machine_info,
    parse_int_list,
    random_prompts,
    timed_generation,
    warm_up,
    write_json,
)

SKIP_MESSAGE = "skipped: no CUDA device"
COLUMNS = [
    ("batch", "batch", "d"),
    ("mode", "mode", ""),
    ("tok/s", "tokens_per_s", ".1f"),
    ("decode tok/s", "decode_tokens_per_s", ".1f"),
    ("denoiser passes/token", "denoiser_passes_per_token", ".2f"),
    ("prefill s", "prefill_s", ".3f"),
    ("denoise s", "denoise_s", ".3f"),
    ("context s", "context_s", ".3f"),
    ("wall s", "wall_s", ".2f"),
    ("peak GiB", "peak_gib", ".1f"),
]


def format_count(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="PyTorch device (default: cuda)")
    parser.add_argument("--size", choices=sorted(SIZES), default="30b",
                        help="layer sizes of the random model (default: 30b; tiny and 150m are for dry runs)")
    parser.add_argument("--batches", type=parse_int_list, default=[1, 16], help="batch sizes (default: 1,16)")
    parser.add_argument("--prompt-length", type=int, default=128, help="prompt tokens per row (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default: 64)")
    add_diffusion_arguments(parser)
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="start no new measurement after this many seconds from the start (default: 240)")
    add_seed_argument(parser)
    add_json_argument(parser)
    return parser


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        if args.json is not None:
            write_json(args.json, {"benchmark": "gpu_30b", "skipped": SKIP_MESSAGE, "machine": machine_info()})
        return 0

    start = time.perf_counter()
    config = SIZES[args.size]()
    model = build_on_device(config, device, torch.bfloat16, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        weights_gib = torch.cuda.memory_allocated(device) / 2**30
        total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        weights_gib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
        total_gib = None
    build_s = time.perf_counter() - start
    parameters = count_parameters(model)
    print(f"built {format_count(parameters)} parameters ({args.size} sizes, bf16) on {device} in {build_s:.1f} s; "
          f"{weights_gib:.1f} GiB allocated", file=sys.stderr)

    diffusion_args = diffusion_mode_args(args)
    short_ids, _ = random_prompts([args.prompt_length], config.vocab_size, args.seed)
    warm_up(model, ("ar", "diffusion"), short_ids, None, **diffusion_args)

    rows = []
    for batch in args.batches:
        input_ids, _ = random_prompts([args.prompt_length] * batch, config.vocab_size, args.seed)
        for mode in ("ar", "diffusion"):
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                rows.append({"batch": batch, "mode": mode, "skipped": f"time budget spent after {elapsed:.0f} s"})
                continue
            extra = diffusion_args if mode == "diffusion" else {}
            row = timed_generation(model, mode, input_ids, None, args.new_tokens, repeats=1, **extra)
            row["peak_gib"] = row["peak_mib"] / 1024
            rows.append(row)
            print(f"batch {batch} {mode}: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr)

    machine = machine_info(device)
    print(f"model: random weights, {args.size} sizes, {format_count(parameters)} parameters (both towers), bf16, {device}")
    print(f"prompt {args.prompt_length} tokens, {args.new_tokens} new tokens per row, greedy, no EOS; "
          f"diffusion block {args.block_size}, {args.steps} steps, threshold {args.threshold:g}; one run each")
    print(f"machine: {machine.get('cuda_device', machine['cpu_model'])}, torch {machine['torch']}; {machine['date_utc']}")
    memory_line = f"memory: weights {weights_gib:.1f} GiB"
    if total_gib is not None:
        memory_line += f" of {total_gib:.1f} GiB on the device"
    print(memory_line + f"; build and initialisation {build_s:.1f} s; total {time.perf_counter() - start:.1f} s")
    print()
    print(format_table([row for row in rows if "skipped" not in row], COLUMNS))
    for row in rows:
        if "skipped" in row:
            print(f"batch {row['batch']} {row['mode']}: {row['skipped']}")
    if args.json is not None:
        write_json(args.json, {
            "benchmark": "gpu_30b", "arguments": vars(args), "machine": machine, "parameters": parameters,
            "weights_gib": weights_gib, "device_total_gib": total_gib, "build_s": build_s, "rows": rows,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
