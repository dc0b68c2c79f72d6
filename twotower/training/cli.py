"""Command-line options of ``python -m twotower.training`` (and ``twotower train``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from twotower.training.trainer import MODEL_PRESETS, TrainConfig, train

DEFAULTS = TrainConfig()


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option for every ``TrainConfig`` field to ``parser``."""
    d = DEFAULTS
    run = parser.add_argument_group("run")
    run.add_argument("--stage", type=int, choices=(1, 2), default=d.stage,
                     help="1: train one tower as a causal LM; 2: train the denoiser of a two-tower model (default: %(default)s)")
    run.add_argument("--data-dir", default=d.data_dir,
                     help="corpus folder with meta.json, train.bin and val.bin (default: %(default)s)")
    run.add_argument("--run-dir", default=d.run_dir,
                     help="folder for checkpoints, metrics.jsonl and train_config.json (default: %(default)s)")
    run.add_argument("--model-config", default=d.model_config,
                     help=f"stage 1 only: preset ({', '.join(MODEL_PRESETS)}) or path to a config.json (default: %(default)s)")
    run.add_argument("--init-path", default=d.init_path,
                     help="stage 1: single-tower checkpoint to continue from; stage 2: the stage-1 tower copied "
                          "into both towers, or a two-tower checkpoint to train further (required unless --run-dir holds a "
                          "checkpoint)")
    run.add_argument("--no-resume", dest="resume", action="store_false",
                     help="ignore checkpoints in --run-dir and start from step 0 (default: resume from the latest)")

    batch = parser.add_argument_group("batch and length")
    batch.add_argument("--seq-len", type=int, default=d.seq_len,
                       help="tokens per training sequence; stage 2 needs a multiple of --block-size (default: %(default)s)")
    batch.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="sequences per micro-batch on each process (default: %(default)s)")
    batch.add_argument("--grad-accum", type=int, default=d.grad_accum,
                       help="micro-batches accumulated per optimizer step (default: %(default)s)")
    batch.add_argument("--max-steps", type=int, default=d.max_steps,
                       help="optimizer steps of the whole run; the LR schedule spans them (default: %(default)s)")
    batch.add_argument("--stop-at-step", type=int, default=d.stop_at_step,
                       help="end this invocation after this optimizer step, with a checkpoint, without changing "
                            "the schedule; a later invocation resumes (default: run to --max-steps)")

    optim = parser.add_argument_group("optimizer and schedule")
    optim.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    optim.add_argument("--min-lr", type=float, default=d.min_lr,
                       help="learning rate at the end of the decay (default: %(default)s)")
    optim.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                       help="optimizer steps of linear warmup (default: %(default)s)")
    optim.add_argument("--decay-fraction", type=float, default=d.decay_fraction,
                       help="fraction of --max-steps, at the end, over which the LR decays to --min-lr (default: %(default)s)")
    optim.add_argument("--decay-shape", choices=("linear", "cosine"), default=d.decay_shape,
                       help="shape of the final decay (default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help="AdamW weight decay, applied to parameters with 2 or more dimensions only (default: %(default)s)")
    optim.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1 (default: %(default)s)")
    optim.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2 (default: %(default)s)")
    optim.add_argument("--adam-eps", type=float, default=d.adam_eps, help="AdamW epsilon (default: %(default)s)")
    optim.add_argument("--grad-clip", type=float, default=d.grad_clip,
                       help="maximum global gradient L2 norm; 0 disables clipping (default: %(default)s)")

    objective = parser.add_argument_group("stage-2 objective")
    objective.add_argument("--block-size", type=int, default=d.block_size,
                           help="tokens per diffusion block (default: %(default)s)")
    objective.add_argument("--mock-ar-weight", type=float, default=d.mock_ar_weight,
                           help="weight of the auxiliary mock-AR loss added to the diffusion loss; 0 disables it (default: %(default)s)")

    logs = parser.add_argument_group("evaluation, checkpoints and logging")
    logs.add_argument("--eval-interval", type=int, default=d.eval_interval,
                      help="optimizer steps between validation runs (default: %(default)s)")
    logs.add_argument("--eval-batches", type=int, default=d.eval_batches,
                      help="micro-batches of --batch-size fixed sequences from val.bin per validation (default: %(default)s)")
    logs.add_argument("--save-interval", type=int, default=d.save_interval,
                      help="optimizer steps between checkpoints; one is always written at the end (default: %(default)s)")
    logs.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                      help="number of newest checkpoints kept in --run-dir (default: %(default)s)")
    logs.add_argument("--log-interval", type=int, default=d.log_interval,
                      help="optimizer steps between log lines and metrics.jsonl records (default: %(default)s)")
    logs.add_argument("--no-progress", dest="progress", action="store_false",
                      help="hide the progress bar (it is shown only when stderr is a terminal)")

    system = parser.add_argument_group("system")
    system.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the initial weights, batch order and diffusion noise (default: %(default)s)")
    system.add_argument("--threads", type=int, default=d.threads,
                        help="CPU threads per process for torch.set_num_threads; 0 keeps torch's default (default: %(default)s)")
    system.add_argument("--device", default=d.device,
                        help="auto, cpu or cuda; with torchrun each process uses cuda:LOCAL_RANK (default: %(default)s)")
    system.add_argument("--bf16", choices=("auto", "on", "off"), default=d.bf16,
                        help="bfloat16 autocast; auto turns it on for CUDA devices that support it (default: %(default)s)")
    system.add_argument("--distributed", choices=("auto", "fsdp", "ddp"), default=d.distributed,
                        help="strategy under torchrun; auto: FSDP2 on CUDA, DDP on CPU (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {field.name for field in TrainConfig.__dataclass_fields__.values()}
    return TrainConfig(**{name: value for name, value in vars(args).items() if name in names})


def configure_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_from_args(args: argparse.Namespace) -> dict:
    """Train with the options parsed by a parser that ``add_train_arguments`` filled."""
    configure_logging()
    summary = train(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":
        final = {
            "step": summary["step"],
            "final_loss": summary["losses"].get(summary["step"]),
            "val_losses": summary["val_losses"],
            "checkpoint": summary["checkpoint"],
        }
        print(json.dumps(final))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m twotower.training",
        description="Train a Nemotron-H tower (stage 1) or the denoiser of a two-tower model (stage 2).",
    )
    return add_train_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    run_from_args(build_parser().parse_args(argv))
    return 0
