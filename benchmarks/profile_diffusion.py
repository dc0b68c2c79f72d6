"""Profile one mask-diffusion generation: where the time goes, by component and by PyTorch operator.

Two measured runs after a warm-up. The first times every layer mixer, norm, embedding and head of
both towers with forward hooks (valid on the CPU, where operators run synchronously) and adds the
sampler and loop times from ``GenerationStats``. The second runs under ``torch.profiler`` and lists
the operators with the most self CPU time. Hooks and the profiler add overhead, so compare shares
within a table, not wall times with the other benchmarks.

    python benchmarks/profile_diffusion.py --size 150m --threads 1 --json results/profile_150m.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from twotower.benchmarking import (
    add_diffusion_arguments,
    add_model_arguments,
    diffusion_mode_args,
    format_table,
    load_or_build_model,
    machine_info,
    random_prompts,
    run_mode,
    warm_up,
    write_report,
)
from twotower.config import ATTENTION, MAMBA, MLP, MOE
from twotower.two_tower import TwoTowerForCausalLM

LAYER_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MOE: "moe", MLP: "mlp"}


class ComponentTimer:
    """Wall time per label, accumulated by hooks around modules and wrappers around methods."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._starts: dict[int, list[float]] = defaultdict(list)
        self.enabled = False

    def _begin(self, key: int) -> None:
        self._starts[key].append(time.perf_counter())

    def _end(self, key: int, label: str) -> None:
        started = self._starts[key].pop()
        if self.enabled:
            self.seconds[label] += time.perf_counter() - started
            self.calls[label] += 1

    def time_module(self, module: nn.Module, label: str) -> None:
        module.register_forward_pre_hook(lambda mod, inputs: self._begin(id(mod)))
        module.register_forward_hook(lambda mod, inputs, output: self._end(id(mod), label))

    def time_method(self, owner: object, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)
        key = id(original)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._begin(key)
            try:
                return original(*args, **kwargs)
            finally:
                self._end(key, label)

        setattr(owner, name, timed)  # an instance attribute shadows the class method


def instrument(model: TwoTowerForCausalLM, timer: ComponentTimer) -> None:
    """Attach ``timer`` to every mixer, norm, embedding and head of both towers."""
    for tower_name, tower in (("context", model.context_tower), ("denoiser", model.denoiser_tower)):
        timer.time_module(tower.embeddings, f"{tower_name}: embeddings")
        timer.time_module(tower.norm_f, f"{tower_name}: norms")
        for layer in tower.layers:
            timer.time_module(layer.norm, f"{tower_name}: norms")
            label = f"{tower_name}: {LAYER_NAMES[layer.block_type]}"
            if layer.block_type == ATTENTION:
                # Both towers call project() and attend() directly, not the module's forward.
                timer.time_method(layer.mixer, "project", label)
                timer.time_method(layer.mixer, "attend", label)
            else:
                timer.time_module(layer.mixer, label)
    timer.time_module(model.context_lm_head, "context: head")
    timer.time_module(model.lm_head, "denoiser: head")
    timer.time_module(model.t_embedder, "denoiser: time embedding")
    timer.time_module(model.t_block, "denoiser: time embedding")


def component_rows(timer: ComponentTimer, stats, wall: float) -> list[dict[str, Any]]:
    """Rows per component, plus the remainders of each phase that no hook covers."""
    rows = [{"component": label, "seconds": seconds, "calls": timer.calls[label]}
            for label, seconds in timer.seconds.items()]
    context_hooked = sum(s for label, s in timer.seconds.items() if label.startswith("context:"))
    denoiser_hooked = sum(s for label, s in timer.seconds.items() if label.startswith("denoiser:"))
    rows.append({"component": "context: rest (cache writes, masks, residual adds)",
                 "seconds": max(stats.prefill_s + stats.context_s - context_hooked, 0.0)})
    rows.append({"component": "denoiser: rest (modulation, residual adds, context view)",
                 "seconds": max(stats.denoise_s - denoiser_hooked, 0.0)})
    rows.append({"component": "sampling (softmax, argmax, commit rule)", "seconds": stats.sampling_s})
    rows.append({"component": "loop (block setup, streaming, host syncs)",
                 "seconds": max(wall - stats.prefill_s - stats.context_s - stats.denoise_s - stats.sampling_s, 0.0)})
    for row in rows:
        row["share"] = 100.0 * row["seconds"] / wall if wall else 0.0
    rows.sort(key=lambda row: row["seconds"], reverse=True)
    return rows


def operator_rows(profile: torch.profiler.profile, limit: int) -> list[dict[str, Any]]:
    events = sorted(profile.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    rows = []
    for event in events[:limit]:
        rows.append({
            "operator": event.key,
            "self_ms": event.self_cpu_time_total / 1e3,
            "share": 100.0 * event.self_cpu_time_total / total if total else 0.0,
            "calls": event.count,
        })
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=1, help="rows generated together (default: 1)")
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt tokens (default: 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default: 64)")
    add_diffusion_arguments(parser)
    parser.add_argument("--top-ops", type=int, default=15, help="operators listed (default: 15)")
    return parser


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, description = load_or_build_model(args)
    if model.device.type != "cpu":
        print("note: the component times assume synchronous execution and are only exact on the CPU", file=sys.stderr)
    input_ids, attention_mask = random_prompts([args.prompt_length] * args.batch, model.config.vocab_size, args.seed)
    diffusion_args = diffusion_mode_args(args)

    timer = ComponentTimer()
    instrument(model, timer)
    warm_up(model, ("diffusion",), input_ids, attention_mask, **diffusion_args)

    timer.enabled = True
    start = time.perf_counter()
    output = run_mode(model, "diffusion", input_ids, attention_mask, args.new_tokens, **diffusion_args)
    wall = time.perf_counter() - start
    timer.enabled = False
    components = component_rows(timer, output.stats, wall)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run_mode(model, "diffusion", input_ids, attention_mask, args.new_tokens, **diffusion_args)
    operators = operator_rows(profile, args.top_ops)

    machine = machine_info(args.device)
    stats = output.stats
    print(f"model: {description}")
    print(f"batch {args.batch}, prompt {args.prompt_length}, {args.new_tokens} new tokens, block {args.block_size}, "
          f"{args.steps} steps, threshold {args.threshold:g}, greedy, no EOS")
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
          f"{machine['torch_threads']} threads; {machine['date_utc']}")
    print(f"run with hooks: {wall:.3f} s wall, {stats.denoiser_passes} denoiser passes, "
          f"{stats.context_passes} context extensions, {stats.generated_tokens} tokens")
    print()
    print(format_table(components, [("component", "component", ""), ("s", "seconds", ".3f"),
                                    ("% of wall", "share", ".1f"), ("calls", "calls", "d")]))
    print()
    print(format_table(operators, [("operator", "operator", ""), ("self ms", "self_ms", ".1f"),
                                   ("% of self CPU", "share", ".1f"), ("calls", "calls", "d")]))
    write_report(args, "profile_diffusion", description, machine, wall_s=wall, stats=stats.as_dict(),
                 components=components, operators=operators)
    return 0


if __name__ == "__main__":
    sys.exit(main())
