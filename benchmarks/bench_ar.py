"""Compare plain autoregressive prefill and decode speed with transformers' NemotronHForCausalLM.

Both models run in this process on identical weights: transformers builds a random model and saves
it with ``save_pretrained``, and ``twotower.NemotronHForCausalLM.from_pretrained`` loads that
checkpoint. Each measurement runs under ``torch.inference_mode`` after warm-up runs, alternates
the two libraries within every repeat so that both see the same machine load, and reports the
median over the repeats.

- prefill: one forward over a (batch, --prompt-length) prompt that fills a cache and returns the
  last position's logits. Rate = batch * prompt length / seconds.
- decode: --new-tokens greedy steps of one token per row after an untimed prefill, each step
  reading and extending the cache. transformers runs the same manual loop with its own cache
  (``use_cache=True``), without the overhead of its ``generate``. Rate = batch * new tokens / seconds.
- load memory (30m model only): peak resident memory of a fresh Python process while it loads a
  sharded checkpoint, minus its resident memory before that load, against the checkpoint's size.
  Each process first loads a tiny checkpoint with the same library, so lazy imports and one-time
  initialisation stay out of the number. For twotower they took 76 MiB on the first load
  (torch 2.13 CPU).

On a machine shared with other jobs, pass --threads 1. With PyTorch's default of 2 threads on a
2-core machine running other work, a 64-token tiny prefill took 584 ms instead of 10 ms, because
the OpenMP threads waited on each other.

    python benchmarks/bench_ar.py --threads 1 --json benchmarks/results/ar_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from twotower.benchmarking import (
    add_json_argument,
    add_seed_argument,
    format_table,
    machine_info,
    median,
    parse_int_list,
    write_json,
)
from twotower.checkpoint import parse_dtype
from twotower.config import NemotronHConfig
from twotower.model import NemotronHForCausalLM


def config_30m() -> NemotronHConfig:
    """Return a 32.3M-parameter config: 11 layers of all four types, hidden 384, 16 experts in 2 groups."""
    return NemotronHConfig(
        vocab_size=16384,
        hidden_size=384,
        hybrid_override_pattern="MEM*EM-EM*E",
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=12,
        mamba_head_dim=64,
        ssm_state_size=64,
        n_groups=2,
        chunk_size=128,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=512,
        n_group=2,
        topk_group=2,
        intermediate_size=1024,
        max_position_embeddings=8192,
    )


def config_150m() -> NemotronHConfig:
    """Return a 144.1M-parameter config: 12 layers of three types, hidden 768, 16 experts in 4 groups."""
    return NemotronHConfig(
        vocab_size=32768,
        hidden_size=768,
        hybrid_override_pattern="MEM*EMEM*EME",
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        mamba_num_heads=24,
        mamba_head_dim=64,
        ssm_state_size=64,
        n_groups=4,
        chunk_size=128,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=1024,
        n_group=4,
        topk_group=2,
        intermediate_size=2048,
        max_position_embeddings=8192,
    )


SIZES: dict[str, Callable[[], NemotronHConfig]] = {"tiny": NemotronHConfig.tiny, "30m": config_30m, "150m": config_150m}

COLUMNS = [
    ("model", "size", ""),
    ("dtype", "dtype", ""),
    ("params (M)", "params_m", ".2f"),
    ("phase", "phase", ""),
    ("batch", "batch", "d"),
    ("twotower tok/s", "ours_tokens_per_s", ".1f"),
    ("transformers tok/s", "transformers_tokens_per_s", ".1f"),
    ("twotower / transformers", "ratio", ".2f"),
    ("twotower ms", "ours_ms", ".1f"),
    ("transformers ms", "transformers_ms", ".1f"),
]

MEMORY_COLUMNS = [
    ("loader", "loader", ""),
    ("checkpoint MiB", "checkpoint_mib", ".1f"),
    ("shards", "shards", "d"),
    ("RSS before MiB", "baseline_mib", ".1f"),
    ("peak RSS MiB", "peak_mib", ".1f"),
    ("RSS after MiB", "after_mib", ".1f"),
    ("peak - before MiB", "load_mib", ".1f"),
    ("(peak - before) / checkpoint", "ratio_to_checkpoint", ".2f"),
    ("load s", "load_s", ".2f"),
]


# ---------------------------------------------------------------------- models


def build_pair(config: NemotronHConfig, directory: Path, seed: int, dtype: torch.dtype = torch.float32):
    """Build transformers' model, save it to ``directory`` and load the same weights with twotower.

    Both models are then cast to ``dtype`` from the same fp32 weights.
    """
    import transformers

    torch.manual_seed(seed)
    fields = {key: value for key, value in config.to_dict().items() if key != "mask_token_id"}
    reference = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**fields)).eval()
    # Initialisation leaves the router biases at zero. Random ones make expert selection depend on them.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    reference.save_pretrained(directory)
    ours = NemotronHForCausalLM.from_pretrained(directory, dtype=dtype)
    return ours, reference.to(dtype)


def random_prompt(batch: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, length), generator=generator)


# ---------------------------------------------------------------------- one timed run per library


def ours_prefill(model: NemotronHForCausalLM, ids: torch.Tensor):
    cache = model.new_cache(ids.shape[0], capacity=ids.shape[1] + 256)
    logits = model(ids, cache=cache, logits_to_keep=1)
    return logits[:, -1], cache


def ours_decode(model: NemotronHForCausalLM, ids: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Prefill (untimed), then time ``steps`` greedy one-token steps; return (seconds, tokens)."""
    logits, cache = ours_prefill(model, ids)
    tokens = []
    start = time.perf_counter()
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        logits = model(token, cache=cache, logits_to_keep=1)[:, -1]
    return time.perf_counter() - start, torch.cat(tokens, dim=1)


def transformers_prefill(model, ids: torch.Tensor):
    output = model(ids, use_cache=True, logits_to_keep=1)
    return output.logits[:, -1], output.cache


def transformers_decode(model, ids: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    logits, cache = transformers_prefill(model, ids)
    tokens = []
    start = time.perf_counter()
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        output = model(token, cache=cache, use_cache=True, logits_to_keep=1)
        logits, cache = output.logits[:, -1], output.cache
    return time.perf_counter() - start, torch.cat(tokens, dim=1)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


# ---------------------------------------------------------------------- measurements


@torch.inference_mode()
def measure_size(size: str, args: argparse.Namespace, directory: Path) -> list[dict]:
    config = SIZES[size]()
    ours, reference = build_pair(config, directory, args.seed, parse_dtype(args.dtype))
    params_m = sum(p.numel() for p in ours.parameters()) / 1e6
    rows = []
    for batch in args.batches:
        ids = random_prompt(batch, args.prompt_length, config.vocab_size, args.seed + batch)

        for _ in range(args.warmup):
            ours_prefill(ours, ids)
            transformers_prefill(reference, ids)
            ours_decode(ours, ids, min(args.new_tokens, 8))
            transformers_decode(reference, ids, min(args.new_tokens, 8))

        prefill_ours, prefill_reference, decode_ours, decode_reference = [], [], [], []
        for _ in range(args.repeats):
            prefill_ours.append(timed(lambda: ours_prefill(ours, ids)))
            prefill_reference.append(timed(lambda: transformers_prefill(reference, ids)))
            seconds, our_tokens = ours_decode(ours, ids, args.new_tokens)
            decode_ours.append(seconds)
            seconds, reference_tokens = transformers_decode(reference, ids, args.new_tokens)
            decode_reference.append(seconds)

        # Greedy tokens of a random model can differ where two logits nearly tie, so report the
        # agreement instead of failing on it. The test suite checks exact agreement on tiny models.
        agreement = float((our_tokens == reference_tokens).float().mean())
        for phase, tokens, ours_runs, reference_runs in (
            ("prefill", batch * args.prompt_length, prefill_ours, prefill_reference),
            ("decode", batch * args.new_tokens, decode_ours, decode_reference),
        ):
            ours_s, reference_s = median(ours_runs), median(reference_runs)
            row = dict(
                size=size,
                dtype=args.dtype,
                params_m=params_m,
                phase=phase,
                batch=batch,
                prompt_length=args.prompt_length,
                new_tokens=args.new_tokens if phase == "decode" else 0,
                ours_tokens_per_s=tokens / ours_s,
                transformers_tokens_per_s=tokens / reference_s,
                ratio=reference_s / ours_s,
                ours_ms=1e3 * ours_s,
                transformers_ms=1e3 * reference_s,
                ours_runs_s=ours_runs,
                transformers_runs_s=reference_runs,
                greedy_token_agreement=agreement if phase == "decode" else None,
            )
            rows.append(row)
            print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


# The probe runs in a fresh interpreter, so the peak covers the load alone. It loads a tiny checkpoint
# to warm up, reads the resident memory, resets the peak (VmHWM) through /proc/self/clear_refs, then
# loads the checkpoint and reads the new peak.
MEMORY_PROBE = r"""
import json, sys, time
import torch
loader, directory, warmup_directory = sys.argv[1], sys.argv[2], sys.argv[3]
if loader == "transformers":
    import transformers
    load = lambda path: transformers.NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32)
else:
    from twotower.model import NemotronHForCausalLM
    load = NemotronHForCausalLM.from_pretrained

def status(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB to MiB
    raise RuntimeError(field + " not found in /proc/self/status")

warmup_model = load(warmup_directory)
del warmup_model
baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
start = time.perf_counter()
model = load(directory)
seconds = time.perf_counter() - start
print(json.dumps({"baseline_mib": baseline, "peak_mib": status("VmHWM"), "after_mib": status("VmRSS"),
                  "load_s": seconds, "params": sum(p.numel() for p in model.parameters())}))
"""


def save_transformers_model(config: NemotronHConfig, directory: Path, seed: int, shard_size: str = "2GB") -> None:
    import transformers

    torch.manual_seed(seed)
    fields = {key: value for key, value in config.to_dict().items() if key != "mask_token_id"}
    transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**fields)).save_pretrained(
        directory, max_shard_size=shard_size
    )


def measure_load_memory(directory: Path, shard_size: str, seed: int) -> list[dict]:
    """Save the 30m model in shards with transformers, then load it in fresh processes with each library."""
    save_transformers_model(config_30m(), directory, seed, shard_size)
    warmup_directory = directory.parent / "warmup_tiny"
    save_transformers_model(NemotronHConfig.tiny(), warmup_directory, seed)
    shards = sorted(directory.glob("*.safetensors"))
    checkpoint_mib = sum(shard.stat().st_size for shard in shards) / 2**20

    rows = []
    for loader in ("twotower", "transformers"):
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, loader, str(directory), str(warmup_directory)],
            capture_output=True, text=True, check=True,
        )
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        load_mib = probe["peak_mib"] - probe["baseline_mib"]
        rows.append(dict(
            loader=loader,
            checkpoint_mib=checkpoint_mib,
            shards=len(shards),
            load_mib=load_mib,
            ratio_to_checkpoint=load_mib / checkpoint_mib,
            **probe,
        ))
    return rows


# ---------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,30m",
                        help="comma-separated model sizes: tiny, 30m, 150m (default: tiny,30m)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of both models' weights and activations (default: float32)")
    parser.add_argument("--batches", type=parse_int_list, default=[1, 4], help="comma-separated batch sizes (default: 1,4)")
    parser.add_argument("--prompt-length", type=int, default=512, help="prompt tokens per row (default: 512)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per measurement (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per measurement (default: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch intra-op threads (default: PyTorch's choice, usually the core count)")
    parser.add_argument("--shard-size", default="16MB",
                        help="max shard size of the checkpoint for the load-memory measurement (default: 16MB)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the load-memory measurement")
    add_seed_argument(parser)
    add_json_argument(parser)
    args = parser.parse_args(argv)

    sizes = [size.strip() for size in args.sizes.split(",") if size.strip()]
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        parser.error(f"--sizes contains {unknown}; expected names from {sorted(SIZES)}")
    for name in ("prompt_length", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: expected a positive integer")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup} is invalid: expected an integer >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads} is invalid: expected a positive integer")
        torch.set_num_threads(args.threads)

    import transformers

    info = machine_info()
    info["transformers"] = transformers.__version__
    print(f"torch {info['torch']}, transformers {info['transformers']}, {info['torch_threads']} threads, "
          f"{info['cpu_count']} CPUs ({info['cpu_model']}), load average {info['load_average']}")
    print(f"prompt {args.prompt_length} tokens, {args.new_tokens} decode steps, median of {args.repeats} "
          f"after {args.warmup} warm-up run(s); ratio > 1 means twotower is faster\n")
    print(format_table([], COLUMNS))

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in sizes:
            rows += measure_size(size, args, Path(scratch) / size)
        memory_rows = []
        if not args.skip_memory:
            memory_rows = measure_load_memory(Path(scratch) / "sharded_30m", args.shard_size, args.seed)
            print(f"\nPeak RSS while loading the sharded 30m checkpoint (fresh process per loader, "
                  f"max shard size {args.shard_size}):\n")
            print(format_table(memory_rows, MEMORY_COLUMNS))

    if args.json is not None:
        write_json(args.json, {"machine": info, "arguments": {k: str(v) for k, v in vars(args).items()},
                               "throughput": rows, "load_memory": memory_rows})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
