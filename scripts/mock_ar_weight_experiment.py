"""Measure what the auxiliary mock-AR loss costs the diffusion objective, and what it buys mock-AR.

For each ``--weights`` value the script trains stage 2 from the same stage-1 tower, with the same
seed, data order and schedule, then scores the final denoiser on fixed validation windows with both
objectives: the diffusion loss (fixed noise) and the mock-AR next-token loss. It prints a table.

    python scripts/mock_ar_weight_experiment.py --init-path runs/demo-stage1/checkpoints/step-00000700/model
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from twotower.data import TokenDataset
from twotower.training import TrainConfig, train
from twotower.training.objective import diffusion_loss, mock_ar_loss
from twotower.two_tower import TwoTowerForCausalLM

EVAL_NOISE_SEED = 1234


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-path", required=True, help="stage-1 tower (single-tower checkpoint folder)")
    parser.add_argument("--data-dir", default="data/corpus", help="corpus folder with train.bin and val.bin")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5], help="mock-AR loss weights to compare")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence (multiple of --block-size)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--block-size", type=int, default=16, help="diffusion block size, in tokens")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--eval-windows", type=int, default=32, help="validation windows scored per objective")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    return parser


@torch.no_grad()
def score(model: TwoTowerForCausalLM, val: TokenDataset, windows: int, seq_len: int, block_size: int) -> tuple[float, float]:
    """Mean diffusion loss (fixed noise) and mock-AR loss over ``windows`` evenly spaced windows."""
    offsets = torch.linspace(0, len(val) - seq_len, windows).long().tolist()
    diffusion, mock = [], []
    for i, offset in enumerate(offsets):
        ids = val.batch([offset], seq_len)
        generator = torch.Generator().manual_seed(EVAL_NOISE_SEED + i)
        diffusion.append(float(diffusion_loss(model, ids, block_size, generator)[0]))
        mock.append(float(mock_ar_loss(model, ids)))
    return sum(diffusion) / len(diffusion), sum(mock) / len(mock)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    val = TokenDataset(Path(args.data_dir) / "val.bin")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for weight in args.weights:
            run_dir = Path(tmp) / f"weight-{weight}"
            config = TrainConfig(
                stage=2, data_dir=args.data_dir, run_dir=str(run_dir), init_path=args.init_path, resume=False,
                seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
                min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10), block_size=args.block_size,
                mock_ar_weight=weight, eval_interval=args.steps, eval_batches=1, save_interval=args.steps,
                log_interval=args.steps, threads=args.threads, progress=False, seed=0,
            )
            start = time.perf_counter()
            summary = train(config)
            seconds = time.perf_counter() - start
            model = TwoTowerForCausalLM.from_pretrained(Path(summary["checkpoint"]) / "model", dtype=torch.float32)
            diffusion, mock = score(model, val, args.eval_windows, args.seq_len, args.block_size)
            rows.append({"mock_ar_weight": weight, "diffusion_val_loss": diffusion, "mock_ar_val_loss": mock,
                         "train_seconds": seconds})

    print("| mock-AR weight | diffusion val loss | mock-AR val loss | training s |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['mock_ar_weight']:g} | {row['diffusion_val_loss']:.4f} | {row['mock_ar_val_loss']:.4f} "
              f"| {row['train_seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
