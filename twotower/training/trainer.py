"""The training loop for both stages.

Stage 1 trains one Nemotron-H tower as a causal LM (next-token cross-entropy). Stage 2 copies a
stage-1 tower into both towers of a ``TwoTowerForCausalLM``, freezes the context tower and trains
the denoiser and its time conditioning with ``diffusion_loss`` (plus ``mock_ar_weight`` times
``mock_ar_loss``).

Every random draw of a step derives from ``(seed, step)``: the batch offsets come from a generator
seeded with ``seed * 1_000_003 + step`` and the diffusion noise of each micro-batch from one seeded
with that value and the micro-batch index. A resumed run therefore reads the same batches and noise
as an uninterrupted one, and the global batch does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twotower.config import NemotronHConfig
from twotower.data import TokenDataset, load_meta
from twotower.model import NemotronHForCausalLM
from twotower.training import checkpointing
from twotower.training.distributed import (
    DistributedContext,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    init_distributed,
    shard_with_fsdp,
    shutdown,
    wrap_with_ddp,
)
from twotower.training.objective import diffusion_loss, mock_ar_loss
from twotower.training.schedule import WarmupStableDecay
from twotower.checkpoint import list_shards
from twotower.two_tower import TwoTowerForCausalLM

logger = logging.getLogger("twotower.training")

STEP_SEED_MULTIPLIER = 1_000_003
VALIDATION_NOISE_SEED = 20_240_601
METRICS_FILE = "metrics.jsonl"


def demo_model_config(vocab_size: int = 4096) -> NemotronHConfig:
    """The demo tower: about 7.7M parameters with all four layer types (Mamba-2, attention, MoE, MLP)."""
    return NemotronHConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        hybrid_override_pattern="M*EM-EM*E",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=8,
        mamba_head_dim=64,
        ssm_state_size=32,
        n_groups=2,
        conv_kernel=4,
        chunk_size=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=256,
        n_group=1,
        topk_group=1,
        intermediate_size=768,
        max_position_embeddings=4096,
    )


MODEL_PRESETS = {"demo": demo_model_config, "tiny": NemotronHConfig.tiny}


@dataclass
class TrainConfig:
    """Settings of one training run; the command-line options map one to one onto these fields."""

    stage: int = 1
    data_dir: str = "data/corpus"
    run_dir: str = "runs/stage1"
    # Stage 1: a preset name ("demo", "tiny") or a config.json path, used when init_path is unset.
    model_config: str = "demo"
    # Stage 1: optional single-tower checkpoint to continue from. Stage 2: the stage-1 tower (required
    # unless the run resumes from its own checkpoint).
    init_path: str | None = None
    resume: bool = True

    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 1000
    stop_at_step: int | None = None  # end this invocation early (with a checkpoint); the schedule still spans max_steps

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0

    block_size: int = 16
    mock_ar_weight: float = 0.0

    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 200
    keep_checkpoints: int = 2
    log_interval: int = 10

    seed: int = 0
    threads: int | None = 1
    device: str = "auto"
    bf16: str = "auto"  # "auto" (on for CUDA with bf16 support), "on" or "off"
    progress: bool = True
    distributed: str = "auto"

    def validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: {rule}")

        if self.stage not in (1, 2):
            fail("stage", "expected 1 (causal LM) or 2 (denoiser)")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints", "log_interval"):
            if getattr(self, name) < 1:
                fail(name, "expected a positive integer")
        if self.stage == 2 and (self.block_size < 1 or self.seq_len % self.block_size):
            fail("seq_len", f"stage 2 needs a multiple of block_size={self.block_size}")
        if self.bf16 not in ("auto", "on", "off"):
            fail("bf16", "expected auto, on or off")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            fail("stop_at_step", f"expected a step in [1, max_steps={self.max_steps}]")
        if self.mock_ar_weight < 0:
            fail("mock_ar_weight", "expected >= 0")


# ---------------------------------------------------------------------- losses


class TrainingObjective(nn.Module):
    """Wraps the model so that one ``forward`` computes the stage's loss (the unit DDP and FSDP2 wrap)."""

    def __init__(self, model: nn.Module, stage: int, block_size: int, mock_ar_weight: float):
        super().__init__()
        self.model = model
        self.stage = stage
        self.block_size = block_size
        self.mock_ar_weight = mock_ar_weight

    def forward(self, input_ids: torch.Tensor, noise_seed: int) -> torch.Tensor:
        if self.stage == 1:
            logits = self.model(input_ids[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
        generator = torch.Generator().manual_seed(noise_seed)
        loss, _ = diffusion_loss(self.model, input_ids, self.block_size, generator)
        if self.mock_ar_weight > 0:
            loss = loss + self.mock_ar_weight * mock_ar_loss(self.model, input_ids)
        return loss


# ---------------------------------------------------------------------- model and optimizer


def resolve_model_config(spec: str) -> NemotronHConfig:
    if spec in MODEL_PRESETS:
        return MODEL_PRESETS[spec]()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"model config {spec!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a config.json file"
        )
    return NemotronHConfig.from_json_file(path)


def is_two_tower_checkpoint(path: str | Path) -> bool:
    return any(name.startswith("denoiser_tower.") for name in list_shards(path))


def build_model(config: TrainConfig, resume_dir: Path | None, meta: dict) -> nn.Module:
    """Create the stage's model on the CPU, from a resumed checkpoint, ``init_path`` or a fresh config."""
    if config.stage == 1:
        if resume_dir is not None:
            return NemotronHForCausalLM.from_pretrained(resume_dir / checkpointing.MODEL_DIR, dtype=torch.float32)
        if config.init_path:
            return NemotronHForCausalLM.from_pretrained(config.init_path, dtype=torch.float32)
        model_config = resolve_model_config(config.model_config)
        if model_config.vocab_size < meta["vocab_size"]:
            raise ValueError(
                f"model vocab_size {model_config.vocab_size} is smaller than the corpus vocabulary {meta['vocab_size']}"
            )
        return NemotronHForCausalLM.from_config(model_config, seed=config.seed)

    if resume_dir is not None:
        model = TwoTowerForCausalLM.from_pretrained(resume_dir / checkpointing.MODEL_DIR, dtype=torch.float32)
    elif config.init_path and is_two_tower_checkpoint(config.init_path):
        # A new run from a trained two-tower model: a fresh optimizer and schedule, same weights.
        model = TwoTowerForCausalLM.from_pretrained(config.init_path, dtype=torch.float32)
    elif config.init_path:
        model = TwoTowerForCausalLM.from_single_tower(config.init_path, dtype=torch.float32, seed=config.seed)
    else:
        raise ValueError("stage 2 needs init_path (a stage-1 tower) or a checkpoint in run_dir to resume from")
    for module in (model.context_tower, model.context_lm_head):
        module.requires_grad_(False)
    return model


def set_train_mode(model: nn.Module, stage: int) -> None:
    model.train()
    if stage == 2:
        model.context_tower.eval()
        model.context_lm_head.eval()


def trainable_towers(model: nn.Module, stage: int) -> list[nn.Module]:
    if stage == 1:
        return [model.backbone]
    return [model.context_tower, model.denoiser_tower]


def build_optimizer(model: nn.Module, config: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad; weight decay only on tensors of 2 or more dims."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps, fused=fused or None
    )


# ---------------------------------------------------------------------- data


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * STEP_SEED_MULTIPLIER + step)


def noise_seed(seed: int, step: int, chunk: int) -> int:
    return (seed * STEP_SEED_MULTIPLIER + step) * 4099 + chunk


def global_batch_offsets(dataset: TokenDataset, config: TrainConfig, world_size: int, step: int, window: int) -> torch.Tensor:
    """Offsets of the whole global batch of ``step``; micro-batch ``chunk`` is rows chunk*B:(chunk+1)*B."""
    total = config.batch_size * config.grad_accum * world_size
    return dataset.sample_offsets(total, window, generator=step_generator(config.seed, step))


def validation_offsets(dataset: TokenDataset, count: int, window: int) -> np.ndarray:
    """``count`` offsets spread evenly over the file, the same for every run and every step."""
    last = len(dataset) - window
    if last < 0:
        raise ValueError(f"validation file {dataset.path} has {len(dataset)} tokens, fewer than one window of {window}")
    return np.linspace(0, last, count).astype(np.int64)


# ---------------------------------------------------------------------- checkpoint state


def _uses_dcp(context: DistributedContext) -> bool:
    return context.strategy == "fsdp"


def gather_model_state(objective: nn.Module, context: DistributedContext) -> dict[str, torch.Tensor]:
    if _uses_dcp(context):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in state.items()}
    return {k: v.detach().cpu() for k, v in objective.model.state_dict().items()}


def gather_optimizer_state(objective: nn.Module, optimizer, context: DistributedContext) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Keyed by parameter name, so the state loads under any strategy and world size.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(objective, optimizer, options=options)


def load_optimizer_state(objective: nn.Module, optimizer, state: dict, context: DistributedContext) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(objective, optimizer, state, options=StateDictOptions(full_state_dict=True))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(objective: nn.Module, model: nn.Module, val: TokenDataset, config: TrainConfig, context: DistributedContext,
             window: int, autocast) -> float:
    """Mean loss over ``eval_batches`` fixed validation micro-batches (fixed noise in stage 2)."""
    model.eval()
    offsets = validation_offsets(val, config.eval_batches * config.batch_size, window)
    per_rank = math.ceil(config.eval_batches / context.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=context.device)
    for j in range(per_rank):
        chunk = context.rank + j * context.world_size
        real = chunk < config.eval_batches
        # Ranks without a real chunk still run one, with weight 0, so FSDP2 collectives stay matched.
        used = chunk if real else 0
        rows = offsets[used * config.batch_size : (used + 1) * config.batch_size]
        ids = val.batch(rows, window).to(context.device)
        with autocast():
            loss = objective(ids, VALIDATION_NOISE_SEED + used)
        if real:
            total[0] += float(loss)
            total[1] += 1
    all_reduce_sum(total, context)
    set_train_mode(model, config.stage)
    return float(total[0] / total[1])


# ---------------------------------------------------------------------- the loop


def _autocast_factory(config: TrainConfig, device: torch.device):
    if config.bf16 == "on":
        enabled = True
    elif config.bf16 == "off":
        enabled = False
    else:
        enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not enabled:
        return contextlib.nullcontext, False
    return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), True


def _progress_bar(config: TrainConfig, context: DistributedContext, start: int):
    enabled = config.progress and context.is_main and sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=config.max_steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training that ``config`` describes; return a summary with the loss history.

    The summary has ``step`` (completed optimizer steps), ``losses`` (mean train loss of every step
    this invocation ran, by step), ``val_losses`` (step -> validation loss), ``checkpoint`` (the
    last checkpoint folder) and ``run_dir``.
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    context = init_distributed(config.device, config.distributed)
    try:
        summary = _train(config, context)
    except BaseException:
        shutdown(context, synchronize=False)
        raise
    shutdown(context)
    return summary


def _train(config: TrainConfig, context: DistributedContext) -> dict[str, Any]:
    run_dir = Path(config.run_dir)
    data_dir = Path(config.data_dir)
    meta = load_meta(data_dir)
    train_data = TokenDataset(data_dir / meta.get("files", {}).get("train", "train.bin"))
    val_data = TokenDataset(data_dir / meta.get("files", {}).get("val", "val.bin"))
    # Stage 1 reads one extra token per window for the shifted labels.
    window = config.seq_len + 1 if config.stage == 1 else config.seq_len

    resume_dir = checkpointing.latest_checkpoint(run_dir) if config.resume else None
    saved = checkpointing.load_trainer_state(resume_dir) if resume_dir is not None else None

    model = build_model(config, resume_dir, meta)
    model.to(context.device)
    set_train_mode(model, config.stage)
    objective = TrainingObjective(model, config.stage, config.block_size, config.mock_ar_weight)
    wrapped: nn.Module = objective
    if context.strategy == "fsdp":
        wrapped = shard_with_fsdp(objective, trainable_towers(model, config.stage), context.device)
    elif context.strategy == "ddp":
        wrapped = wrap_with_ddp(objective, context.device)

    optimizer = build_optimizer(model, config, fused=context.device.type == "cuda")
    schedule = WarmupStableDecay(
        peak_lr=config.lr, total_steps=config.max_steps, warmup_steps=config.warmup_steps,
        decay_fraction=config.decay_fraction, min_lr=config.min_lr, decay_shape=config.decay_shape,
    )
    step = 0
    if saved is not None:
        load_optimizer_state(objective, optimizer, saved["optimizer"], context)
        restore_rng_state(saved["rng"])
        step = int(saved["step"])
        logger.info("resumed from %s at step %d", resume_dir, step)

    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    autocast, bf16 = _autocast_factory(config, context.device)
    tokens_per_step = config.batch_size * config.grad_accum * context.world_size * config.seq_len
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        logger.info(
            "stage %d: %.2fM parameters, %.2fM trainable; %d tokens a step; bf16 autocast %s; %d processes (%s)",
            config.stage, n_total / 1e6, n_trainable / 1e6, tokens_per_step, "on" if bf16 else "off",
            context.world_size, context.strategy,
        )
    metrics_path = run_dir / METRICS_FILE

    end_step = config.stop_at_step or config.max_steps
    losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    last_checkpoint = resume_dir
    bar = _progress_bar(config, context, step)
    started = time.perf_counter()
    window_start, window_tokens = started, 0

    def save(at_step: int) -> None:
        nonlocal last_checkpoint
        model_state = gather_model_state(objective, context)
        optimizer_state = gather_optimizer_state(objective, optimizer, context)
        if context.is_main:
            state = {
                "step": at_step,
                "optimizer": optimizer_state,
                "rng": rng_state(),
                "data": {"seed": config.seed, "next_step": at_step, "seq_len": config.seq_len},
                "train_config": dataclasses.asdict(config),
            }
            last_checkpoint = checkpointing.save_checkpoint(
                run_dir, at_step, model_state, model.config, config.stage == 2, state, keep=config.keep_checkpoints
            )
        barrier(context)

    while step < end_step:
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = global_batch_offsets(train_data, config, context.world_size, step, window)

        step_loss = 0.0
        for micro in range(config.grad_accum):
            chunk = context.rank * config.grad_accum + micro
            rows = offsets[chunk * config.batch_size : (chunk + 1) * config.batch_size]
            ids = train_data.batch(rows, window).to(context.device, non_blocking=True)
            last_micro = micro == config.grad_accum - 1
            if context.strategy == "ddp" and not last_micro:
                sync = wrapped.no_sync()
            else:
                sync = contextlib.nullcontext()
                if context.strategy == "fsdp":
                    wrapped.set_requires_gradient_sync(last_micro)
            with sync:
                with autocast():
                    loss = wrapped(ids, noise_seed(config.seed, step, chunk))
                (loss / config.grad_accum).backward()
            step_loss += float(loss.detach()) / config.grad_accum

        # An expert that received no token has no gradient. Give it zeros so that AdamW still applies
        # momentum and weight decay to it, as FSDP2 does after reduce-scattering zeros for it.
        for parameter in trainable:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        if config.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        step_loss = all_reduce_mean(step_loss, context)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training loss is {step_loss} at step {step}; lower lr or check the data")
        losses[step] = step_loss
        window_tokens += tokens_per_step
        if bar is not None:
            now = time.perf_counter()
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{window_tokens / max(now - window_start, 1e-9):.0f}")
            bar.update(1)

        if step % config.log_interval == 0 or step == end_step:
            now = time.perf_counter()
            rate = window_tokens / max(now - window_start, 1e-9)
            window_start, window_tokens = now, 0
            if context.is_main:
                record = {
                    "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": step * tokens_per_step, "tokens_per_s": rate, "elapsed_s": now - started,
                }
                _append_metrics(metrics_path, record)
                remaining = (config.max_steps - step) * tokens_per_step / max(rate, 1e-9)
                logger.info(
                    "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tokens/s eta %.1f min",
                    step, config.max_steps, step_loss, lr, grad_norm, rate, remaining / 60,
                )

        if step % config.eval_interval == 0 or step == config.max_steps:
            val_loss = evaluate(wrapped, model, val_data, config, context, window, autocast)
            val_losses[step] = val_loss
            if context.is_main:
                _append_metrics(metrics_path, {"step": step, "val_loss": val_loss})
                logger.info("step %d validation loss %.4f", step, val_loss)

        if step % config.save_interval == 0 or step == end_step:
            save(step)

    if bar is not None:
        bar.close()
    return {
        "step": step,
        "losses": losses,
        "val_losses": val_losses,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "run_dir": str(run_dir),
    }
