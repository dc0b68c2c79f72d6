"""Profile AR decoding with ours and transformers' NemotronHForCausalLM: operator time per token.

Both models get identical weights (as in ``bench_ar.py``). After an untimed prefill and a warm-up
loop, ``torch.profiler`` records ``--steps`` greedy decode steps of each library. The table gives,
per decoded token, the self CPU time of all operators, of the matrix products (``aten::mm``,
``aten::addmm``, ``aten::bmm``) and the number of operator calls. The matrix products read every
weight a token uses, so ``transformers total / twotower matrix products`` bounds the decode ratio
that fewer operator calls alone can reach.

    python benchmarks/profile_ar.py --size 30m --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from twotower.benchmarking import format_table

MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")

COLUMNS = [
    ("library", "library", ""),
    ("total ms/token", "total_ms", ".2f"),
    ("matrix products ms/token", "matrix_ms", ".2f"),
    ("operator calls/token", "calls", ".0f"),
]


def load_bench_ar():
    """Import the sibling ``bench_ar.py``, which builds the model pair and the decode steps."""
    spec = importlib.util.spec_from_file_location("bench_ar", Path(__file__).with_name("bench_ar.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode_loop(step: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, steps: int) -> Callable[[], None]:
    """Return a function that runs ``steps`` greedy steps, each feeding the argmax of the last logits."""

    def run() -> None:
        nonlocal logits
        for _ in range(steps):
            logits = step(logits.argmax(-1, keepdim=True))

    return run


def profile_per_token(run: Callable[[], None], steps: int) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    return dict(
        total_ms=sum(e.self_cpu_time_total for e in events) / steps / 1e3,
        matrix_ms=sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS) / steps / 1e3,
        calls=sum(e.count for e in events) / steps,
    )


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    bench_ar = load_bench_ar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="30m", choices=sorted(bench_ar.SIZES), help="model size (default: 30m)")
    parser.add_argument("--prompt-length", type=int, default=512, help="prompt tokens before decoding (default: 512)")
    parser.add_argument("--steps", type=int, default=32, help="profiled decode steps (default: 32)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's choice)")
    args = parser.parse_args(argv)
    for name in ("prompt_length", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: expected a positive integer")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads} is invalid: expected a positive integer")
        torch.set_num_threads(args.threads)

    config = bench_ar.SIZES[args.size]()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        ours, reference = bench_ar.build_pair(config, Path(scratch), seed=0)
        ids = bench_ar.random_prompt(1, args.prompt_length, config.vocab_size, seed=1)

        def ours_loop() -> Callable[[], None]:
            logits, cache = bench_ar.ours_prefill(ours, ids)
            return decode_loop(lambda token: ours(token, cache=cache, logits_to_keep=1)[:, -1], logits, args.steps)

        def reference_loop() -> Callable[[], None]:
            logits, cache = bench_ar.transformers_prefill(reference, ids)

            def step(token: torch.Tensor) -> torch.Tensor:
                nonlocal cache
                output = reference(token, cache=cache, use_cache=True, logits_to_keep=1)
                cache = output.cache
                return output.logits[:, -1]

            return decode_loop(step, logits, args.steps)

        for library, make_loop in (("twotower", ours_loop), ("transformers", reference_loop)):
            make_loop()()  # warm-up, after its own prefill
            rows.append(dict(library=library, **profile_per_token(make_loop(), args.steps)))

    print(f"{args.size} model, prompt {args.prompt_length} tokens, {args.steps} profiled decode steps, "
          f"{torch.get_num_threads()} threads\n")
    print(format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
