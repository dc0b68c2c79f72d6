"""Export a stage-2 training checkpoint as a model folder with its tokenizer and generation defaults.

    python scripts/export_demo.py --checkpoint runs/demo-stage2 --data-dir data/corpus --out twotower/demo

``--checkpoint`` is a run folder (its latest checkpoint is used) or one ``step-*`` folder. The
checkpoint's manifest is verified first. Weights are written in ``--dtype`` (bfloat16 by default,
which halves the folder), and the script fails when the folder exceeds ``--max-mb``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from twotower.checkpoint import parse_dtype
from twotower.data import load_meta
from twotower.training import checkpointing
from twotower.two_tower import TwoTowerForCausalLM

GENERATION_DEFAULTS = {
    "mode": "diffusion",
    "block_size": 16,
    "steps_per_block": 16,
    "confidence_threshold": 0.8,
    "temperature": 0.0,
    "max_new_tokens": 64,
}


def resolve_checkpoint(path: Path) -> Path:
    if (path / checkpointing.MANIFEST_NAME).is_file():
        return path
    latest = checkpointing.latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints/latest")
    return latest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="stage-2 run folder or step-* checkpoint folder")
    parser.add_argument("--data-dir", default="data/corpus", help="corpus folder with tokenizer.json and meta.json")
    parser.add_argument("--out", default="twotower/demo", help="model folder to write (replaced if it exists)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights (default: %(default)s)")
    parser.add_argument("--max-mb", type=float, default=40.0, help="maximum folder size in MB, 10^6 bytes (default: %(default)s)")
    args = parser.parse_args(argv)

    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    checkpointing.verify_checkpoint(checkpoint)
    model = TwoTowerForCausalLM.from_pretrained(checkpoint / checkpointing.MODEL_DIR, dtype=parse_dtype(args.dtype))

    data_dir = Path(args.data_dir)
    meta = load_meta(data_dir)
    config = model.config
    ids = {"pad_token_id": meta["pad_id"], "bos_token_id": meta["bos_id"], "eos_token_id": meta["eos_id"],
           "mask_token_id": meta["mask_id"]}
    for name, value in ids.items():
        if getattr(config, name) != value:
            raise ValueError(f"model {name}={getattr(config, name)} differs from the corpus tokenizer's {value}")

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, remote_code=False)
    shutil.copyfile(data_dir / meta["tokenizer"], out / "tokenizer.json")
    generation = {**GENERATION_DEFAULTS, **ids}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} from {checkpoint}: {size / 1e6:.1f} MB")
    if size > args.max_mb * 1e6:
        print(f"error: {out} is {size / 1e6:.1f} MB, over --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
