#!/usr/bin/env python3
"""Write a corpus of the context tower's own continuations, for training the denoiser on them.

    python scripts/distill_corpus.py --model twotower/demo --data-dir data/corpus --out data/distilled

Each sample is a prompt cut from the source corpus followed by the context tower's AR continuation
of it, stored as ``<s> prompt continuation </s>`` in the same uint16 format as the source, so that
``python -m twotower.training --stage 2 --data-dir data/distilled`` reads it unchanged. Training the
denoiser on these samples teaches it to predict what the context tower would write (self
distillation). A greedy continuation is a fixed function of its prompt, so the denoiser can become
confident about several positions of a block at once, which is what lets mask diffusion commit more
than one token per pass. The prompts keep real text in every training window.

Prompts are cut at seeded random offsets of ``train.bin`` and ``val.bin``. Each split of the output
is generated only from the same split of the source. ``meta.json`` is written last and records the
command, the model and the sampling settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from twotower.data import TOKEN_DTYPE, TokenDataset, load_meta, write_token_file
from twotower.two_tower import TwoTowerForCausalLM

LOGGER = logging.getLogger("distill_corpus")


def generate_split(
    model: TwoTowerForCausalLM,
    source: TokenDataset,
    samples: int,
    prompt_tokens: int,
    new_tokens: int,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    temperature: float,
    generator: torch.Generator,
    show_progress: bool = True,
    vocab_size: int | None = None,
) -> np.ndarray:
    """Return the packed samples of one split: ``<s> prompt continuation </s>`` for each prompt.

    A continuation ends early at the first EOS the model writes; nothing after it is kept. With
    ``vocab_size``, ids from it up to the model's vocabulary (padding rows) are never generated.
    """
    suppress = None
    if vocab_size is not None and vocab_size < model.config.vocab_size:
        suppress = list(range(vocab_size, model.config.vocab_size))
    offsets = source.sample_offsets(samples, prompt_tokens, generator=generator)
    pieces: list[np.ndarray] = []
    bar = tqdm(total=samples, desc="samples", unit="sample", disable=not show_progress)
    for start in range(0, samples, batch_size):
        prompts = source.batch(offsets[start : start + batch_size], prompt_tokens)
        output = model.generate(
            prompts,
            max_new_tokens=new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            generator=generator,
            suppress_token_ids=suppress,
            return_dict_in_generate=True,
        )
        for prompt, continuation in zip(prompts.tolist(), output.new_token_lists()):
            if continuation and continuation[-1] == eos_id:
                continuation = continuation[:-1]
            pieces.append(np.asarray([bos_id, *prompt, *continuation, eos_id], dtype=TOKEN_DTYPE))
        bar.update(prompts.shape[0])
    bar.close()
    return np.concatenate(pieces)


def check_inputs(
    args: argparse.Namespace, source_dir: Path, out_dir: Path
) -> tuple[dict, dict[str, TokenDataset], TwoTowerForCausalLM]:
    """Check the folders, the model and the corpus before anything is written, and return them loaded.

    Raises ValueError (or the loaders' OSError) with a message that names the option at fault.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; expected a folder, which is created when missing")
    if out_dir.resolve() == source_dir.resolve():
        raise ValueError(f"--out {out_dir} is the --data-dir folder; writing there would overwrite the source corpus")

    meta = load_meta(source_dir)
    sources = {}
    for split in ("train", "val"):
        sources[split] = TokenDataset(source_dir / meta.get("files", {}).get(split, f"{split}.bin"))
        if len(sources[split]) < args.prompt_tokens:
            raise ValueError(
                f"--prompt-tokens {args.prompt_tokens} is longer than {sources[split].path} "
                f"({len(sources[split])} tokens)"
            )

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ValueError(f"--model {model_dir} is not a folder; expected a two-tower model folder")
    model_tokenizer = model_dir / "tokenizer.json"
    corpus_tokenizer = source_dir / meta["tokenizer"]
    if model_tokenizer.is_file() and model_tokenizer.read_bytes() != corpus_tokenizer.read_bytes():
        raise ValueError(
            f"--model {model_dir} has another tokenizer than the corpus in --data-dir {source_dir}, so its "
            f"token ids mean other text; build the corpus with --tokenizer {model_tokenizer}"
        )
    model = TwoTowerForCausalLM.from_pretrained(model_dir, device=args.device, dtype=torch.float32)
    if model.config.vocab_size < meta["vocab_size"]:
        raise ValueError(
            f"--model {args.model} has {model.config.vocab_size} token ids, fewer than the "
            f"{meta['vocab_size']} of the corpus in --data-dir {args.data_dir}"
        )
    return meta, sources, model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="twotower/demo", help="two-tower model folder whose context tower writes")
    parser.add_argument("--data-dir", default="data/corpus", help="source corpus folder (meta.json, train.bin, val.bin)")
    parser.add_argument("--out", default="data/distilled", help="output corpus folder")
    parser.add_argument("--train-samples", type=int, default=6144, help="samples in train.bin")
    parser.add_argument("--val-samples", type=int, default=128, help="samples in val.bin")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="real tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=192, help="maximum generated tokens per sample")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts generated together")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of the continuations; 0 means greedy")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="device to generate on")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt offsets and of sampling")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    for name in ("train_samples", "val_samples", "prompt_tokens", "new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        parser.error(f"--temperature must be 0 (greedy) or a positive finite number, got {args.temperature}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    command_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(command_argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    source_dir, out_dir = Path(args.data_dir), Path(args.out)
    try:
        meta, sources, model = check_inputs(args, source_dir, out_dir)
    except (OSError, ValueError, RuntimeError, AssertionError) as error:
        # User mistakes (paths, files, devices) end with one line instead of a traceback.
        raise SystemExit(f"distill_corpus: {error}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)

    generator = torch.Generator().manual_seed(args.seed)
    token_counts = {}
    started = time.perf_counter()
    for split, samples in (("train", args.train_samples), ("val", args.val_samples)):
        with torch.inference_mode():
            tokens = generate_split(
                model, sources[split], samples, args.prompt_tokens, args.new_tokens, args.batch_size,
                meta["bos_id"], meta["eos_id"], args.temperature, generator, not args.no_progress,
                vocab_size=meta["vocab_size"],
            )
        write_token_file(out_dir / f"{split}.bin", tokens)
        token_counts[split] = int(tokens.size)
        LOGGER.info("wrote %s.bin: %d tokens in %d samples", split, tokens.size, samples)
    seconds = time.perf_counter() - started

    shutil.copyfile(source_dir / meta["tokenizer"], out_dir / "tokenizer.json")
    distilled_meta = {key: meta[key] for key in ("vocab_size", "dtype", "special_tokens", "bos_id", "eos_id", "pad_id", "mask_id")}
    distilled_meta.update(
        {
            "byte_order": "little",
            "tokenizer": "tokenizer.json",
            "files": {"train": "train.bin", "val": "val.bin"},
            "tokens": token_counts,
            "documents": {"train": args.train_samples, "val": args.val_samples},
            "distilled": {
                "model": str(args.model),
                "source": str(source_dir),
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "temperature": args.temperature,
                "seed": args.seed,
                "seconds": round(seconds, 1),
            },
            "created_by": shlex.join(["python", os.path.relpath(__file__), *command_argv]),
        }
    )
    (out_dir / "meta.json").write_text(json.dumps(distilled_meta, indent=2) + "\n", encoding="utf-8")
    LOGGER.info("finished in %.1f s; outputs in %s", seconds, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
