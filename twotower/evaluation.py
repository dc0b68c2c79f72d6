"""Compare the generation modes of a two-tower model on held-out prompts.

For every mode (AR with the context tower, mock-AR, and mask diffusion at each confidence
threshold) the same greedy continuations of prompts cut from ``val.bin`` are measured by:

* generative perplexity: exp of the mean negative log-likelihood of the continuation tokens (up to
  and including the first EOS) under the model's own context tower and ``context_lm_head``;
* repetition: the share of the continuation's 4-grams that already occurred earlier in it;
* passes per token: model forwards that a row ran per generated token (denoiser passes in mock-AR
  and diffusion, context passes in AR);
* tokens per second of the whole batch, including the prompt prefill.

The context tower scores its own AR output highest by construction, so the perplexity compares
the denoiser modes with each other and with AR as a reference, not as an absolute quality score.

Run ``python -m twotower.evaluation --model twotower/demo --data-dir data/corpus``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from twotower.data import TokenDataset, load_meta
from twotower.two_tower import TwoTowerForCausalLM

logger = logging.getLogger(__name__)

CARD_START = "<!-- evaluation:start -->"
CARD_END = "<!-- evaluation:end -->"
REPETITION_NGRAM = 4


@dataclass
class ModeResult:
    """Metrics of one generation mode over all prompts."""

    mode: str
    threshold: float | None
    generative_perplexity: float
    repetition: float
    passes_per_token: float
    tokens_per_second: float
    generated_tokens: int


def held_out_prompts(data_dir: Path, count: int, length: int) -> torch.Tensor:
    """Cut ``count`` prompts of ``length`` tokens from ``val.bin`` at evenly spaced offsets."""
    meta = load_meta(data_dir)
    val = TokenDataset(data_dir / meta.get("files", {}).get("val", "val.bin"))
    offsets = np.linspace(0, len(val) - length, count).astype(np.int64)
    return val.batch(offsets, length)


def continuation_lengths(new_tokens: torch.Tensor, eos_token_id: int) -> list[int]:
    """Return each row's generated length, counting up to and including its first EOS."""
    lengths = []
    for row in new_tokens.tolist():
        lengths.append(row.index(eos_token_id) + 1 if eos_token_id in row else len(row))
    return lengths


def repetition_rate(tokens: list[int], n: int = REPETITION_NGRAM) -> float:
    """Return the share of the n-grams of ``tokens`` that occurred earlier in ``tokens`` (0 when shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def generative_perplexity(model: TwoTowerForCausalLM, prompts: torch.Tensor, new_tokens: torch.Tensor,
                          lengths: list[int]) -> float:
    """Return exp(mean NLL) of the continuation tokens under the context tower, over all rows."""
    sequences = torch.cat([prompts, new_tokens], dim=1)
    logits = model.context_lm(sequences[:, :-1])
    nll = F.cross_entropy(logits.transpose(1, 2), sequences[:, 1:], reduction="none")
    prompt_length = prompts.shape[1]
    total, count = 0.0, 0
    for row, length in enumerate(lengths):
        # The prediction of sequence position p is logits[p - 1].
        total += float(nll[row, prompt_length - 1 : prompt_length - 1 + length].sum())
        count += length
    return math.exp(total / max(count, 1))


def run_mode(model: TwoTowerForCausalLM, prompts: torch.Tensor, mode: str, threshold: float | None,
             max_new_tokens: int, block_size: int, steps_per_block: int) -> ModeResult:
    config = model.config
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                  return_dict_in_generate=True)
    if mode == "ar":
        output = model.generate(prompts, do_sample=False, **common)
    elif mode == "mock-ar":
        output = model.generate_mock_ar(prompts, temperature=0.0, **common)
    else:
        output = model.generate_mask_diffusion(
            prompts, block_size=block_size, steps_per_block=steps_per_block, mask_token_id=config.mask_token_id,
            temperature=0.0, confidence_threshold=threshold, **common,
        )
    new_tokens = output.sequences[:, prompts.shape[1]:]
    lengths = continuation_lengths(new_tokens, config.eos_token_id)
    repetition = [repetition_rate(row[:length]) for row, length in zip(new_tokens.tolist(), lengths)]
    stats = output.stats
    return ModeResult(
        mode=mode,
        threshold=threshold,
        generative_perplexity=generative_perplexity(model, prompts, new_tokens, lengths),
        repetition=float(np.mean(repetition)),
        passes_per_token=stats.row_passes / stats.generated_tokens if stats.generated_tokens else 0.0,
        tokens_per_second=stats.tokens_per_second,
        generated_tokens=stats.generated_tokens,
    )


def evaluate_modes(model: TwoTowerForCausalLM, prompts: torch.Tensor, thresholds: Sequence[float],
                   max_new_tokens: int, block_size: int, steps_per_block: int) -> list[ModeResult]:
    runs: list[tuple[str, float | None]] = [("ar", None), ("mock-ar", None)]
    runs += [("diffusion", threshold) for threshold in thresholds]
    results = []
    for mode, threshold in runs:
        result = run_mode(model, prompts, mode, threshold, max_new_tokens, block_size, steps_per_block)
        logger.info("%s", result)
        results.append(result)
    return results


def format_table(results: list[ModeResult], block_size: int) -> str:
    lines = [
        "| mode | threshold | generative perplexity | 4-gram repetition | passes per token | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        mode = f"diffusion (block {block_size})" if r.mode == "diffusion" else r.mode
        threshold = "" if r.threshold is None else f"{r.threshold:g}"
        lines.append(
            f"| {mode} | {threshold} | {r.generative_perplexity:.2f} | {r.repetition:.3f} | "
            f"{r.passes_per_token:.3f} | {r.tokens_per_second:.1f} |"
        )
    return "\n".join(lines)


def update_card(card: Path, section: str) -> None:
    """Replace the text between the evaluation markers of ``card`` with ``section``."""
    text = card.read_text(encoding="utf-8")
    start, end = text.find(CARD_START), text.find(CARD_END)
    if start < 0 or end < start:
        raise ValueError(f"{card} has no '{CARD_START}' ... '{CARD_END}' section to fill")
    card.write_text(text[: start + len(CARD_START)] + "\n" + section + "\n" + text[end:], encoding="utf-8")


def build_parser(prog: str = "python -m twotower.evaluation") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare AR, mock-AR and mask-diffusion generation of a two-tower model on held-out prompts.",
    )
    parser.add_argument("--model", default="twotower/demo", help="two-tower model folder (default: %(default)s)")
    parser.add_argument("--data-dir", default="data/corpus",
                        help="corpus folder whose val.bin provides the prompts (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens generated per prompt (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=16, help="diffusion block size in tokens (default: %(default)s)")
    parser.add_argument("--steps-per-block", type=int, default=16,
                        help="maximum denoiser passes per diffusion block (default: %(default)s)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 1.0],
                        help="diffusion confidence thresholds to compare (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch.set_num_threads; 0 keeps torch's default (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device to run on (default: %(default)s)")
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON to this file")
    parser.add_argument("--update-card", metavar="README",
                        help="write the table into this model card between the evaluation markers")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m twotower.evaluation") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = TwoTowerForCausalLM.from_pretrained(args.model, dtype=torch.float32, device=args.device)
    prompts = held_out_prompts(Path(args.data_dir), args.prompts, args.prompt_tokens).to(args.device)
    results = evaluate_modes(model, prompts, args.thresholds, args.max_new_tokens, args.block_size, args.steps_per_block)

    table = format_table(results, args.block_size)
    print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if args.update_card:
        command = (
            f"python -m twotower.evaluation --model {args.model} --data-dir {args.data_dir} --prompts {args.prompts} "
            f"--prompt-tokens {args.prompt_tokens} --max-new-tokens {args.max_new_tokens} --block-size {args.block_size} "
            f"--steps-per-block {args.steps_per_block} --thresholds {' '.join(str(t) for t in args.thresholds)} "
            f"--threads {args.threads} --device {args.device}"
        )
        section = (
            f"Measured with `{command}` on {args.prompts} prompts of {args.prompt_tokens} tokens from val.bin, "
            f"greedy decoding, {args.max_new_tokens} new tokens each. Generative perplexity is scored by this "
            "model's own context tower, so AR is the reference rather than a competitor. Repetition is the share "
            "of repeated 4-grams in a continuation. Passes per token counts denoiser passes (context passes for AR) "
            "per generated token. Tokens/s includes the prompt prefill.\n\n" + table
        )
        update_card(Path(args.update_card), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
